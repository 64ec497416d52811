"""Copying checkpoint tensors (Hugging Face names) into a model's parameters.

Models fuse some projections (q|k|v, gate|up) into one `MergedLinear`; each model class lists
those fusions in `packed_modules` and this loader routes a checkpoint tensor such as
`...q_proj.weight` into the `q` slice of `...qkv_proj.weight`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


class WeightLoadError(Exception):
    """Raised with a short description; the caller adds the checkpoint path."""


def load_weights(model: nn.Module, tensors: Iterable[tuple[str, torch.Tensor]],
                 packed_modules: dict[str, tuple[str, str]], ignored_suffixes: tuple[str, ...] = ()) -> None:
    modules = dict(model.named_modules())
    expected = {name for name, _ in model.named_parameters()}
    loaded: set[str] = set()
    for name, tensor in tensors:
        if name.endswith(ignored_suffixes):
            continue
        module_path, _, param_name = name.rpartition(".")
        owner_path, _, leaf = module_path.rpartition(".")
        shard = None
        if leaf in packed_modules:
            fused, shard = packed_modules[leaf]
            module_path = f"{owner_path}.{fused}" if owner_path else fused
        module = modules.get(module_path)
        if module is None or not hasattr(module, param_name) or getattr(module, param_name) is None:
            raise WeightLoadError(f"unexpected tensor {name!r} for this architecture")
        try:
            if hasattr(module, "load_shard"):
                module.load_shard(param_name, tensor, shard)
            else:
                target = getattr(module, param_name).data
                if tuple(target.shape) != tuple(tensor.shape):
                    raise ValueError(f"shape mismatch: checkpoint has {tuple(tensor.shape)}, "
                                     f"model expects {tuple(target.shape)}")
                target.copy_(tensor)
        except ValueError as exc:
            raise WeightLoadError(f"tensor {name!r}: {exc}") from None
        loaded.add(f"{module_path}.{param_name}")
    missing = sorted(expected - loaded)
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise WeightLoadError(f"checkpoint lacks {len(missing)} tensor(s): {shown}")
