"""Copying checkpoint tensors (Hugging Face names) into a model's parameters.

Models fuse some projections (q|k|v, gate|up) into one `MergedLinear`; each model class lists
those fusions in `packed_modules` and this loader routes a checkpoint tensor such as
`...q_proj.weight` into the `q` slice of `...qkv_proj.weight`.

Mixture-of-experts blocks keep their experts stacked in one tensor per projection. Their
checkpoint tensors come per expert (`...experts.3.gate_proj.weight`) or already stacked
(`...experts.gate_proj.weight` from GGUF, `...experts.gate_up_proj` from transformers v5); the
first two route to the `experts` module's `load_shard` with the expert index (None: all experts).
What the loader may call on a module is spelled out by the protocols below: a `ShardLoader`
places its own tensors (`load_shard`), a `PackedShardLoader` also takes GGUF tensors still
quantized (`GroupQuantized`; every other module receives them dequantized), and once all tensors
are in each `FinishesLoading` module packs what it collected. Any other module has its tensors
copied into its parameters. A model's `checkpoint_renames` (substring -> replacement) serve
checkpoints that name the same parts differently (Mixtral's `block_sparse_moe.experts.N.w1`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from lmserve.quant.gguf_blocks import GroupQuantized


@runtime_checkable
class ShardLoader(Protocol):
    """A module that places its checkpoint tensors itself: into the rows of one projection of a
    fused weight (`shard`), or of one expert of stacked ones (keyword `expert`)."""

    def load_shard(self, param_name: str, tensor: torch.Tensor | GroupQuantized, shard: str | None = None,
                   **kwargs) -> None: ...


@runtime_checkable
class PackedShardLoader(ShardLoader, Protocol):
    """A ShardLoader that keeps GGUF tensors packed: its `load_shard` takes `GroupQuantized` ones."""

    accepts_packed: bool


@runtime_checkable
class FinishesLoading(Protocol):
    """A module that completes its weights once every checkpoint tensor is in (packs collected shards)."""

    def finish_loading(self) -> None: ...


_EXPERT_RE = re.compile(r"^(?P<experts>.+\.experts)\.(?:(?P<index>\d+)\.)?(?P<proj>\w+)\.weight$")


class WeightLoadError(Exception):
    """Raised with a short description; the caller adds the checkpoint path."""


def load_weights(model: nn.Module, tensors: Iterable[tuple[str, torch.Tensor]],
                 packed_modules: dict[str, tuple[str, str]], ignored_suffixes: tuple[str, ...] = ()) -> None:
    """Copy checkpoint `tensors` (Hugging Face names) into `model`, a `registry.CausalLM`; a tensor
    the model has no place for, a wrong shape or a missing tensor raises WeightLoadError."""
    modules = dict(model.named_modules())
    expected = {name for name, _ in model.named_parameters()}
    renames = model.checkpoint_renames
    loaded: set[str] = set()
    experts_seen: dict[tuple[str, str, str | None], set[int]] = {}  # per-expert tensors of stacked weights
    for name, tensor in tensors:
        if name.endswith(ignored_suffixes):
            continue
        checkpoint_name = name
        for old, new in renames.items():
            name = name.replace(old, new)
        expert_kwargs = {}
        expert_match = _EXPERT_RE.match(name)
        if expert_match:
            module_path = expert_match["experts"]
            param_name, shard = packed_modules.get(expert_match["proj"], (expert_match["proj"], None))
            index = expert_match["index"]
            expert_kwargs = {"expert": int(index) if index is not None else None}
        else:
            module_path, _, param_name = name.rpartition(".")
            owner_path, _, leaf = module_path.rpartition(".")
            shard = None
            if leaf in packed_modules:
                fused, shard = packed_modules[leaf]
                module_path = f"{owner_path}.{fused}" if owner_path else fused
        module = modules.get(module_path)
        if module is None or getattr(module, param_name, None) is None:
            raise WeightLoadError(f"unexpected tensor {checkpoint_name!r} for this architecture")
        if isinstance(tensor, GroupQuantized) and not isinstance(module, PackedShardLoader):
            tensor = torch.from_numpy(tensor.dequantize())
        try:
            if isinstance(module, ShardLoader):
                module.load_shard(param_name, tensor, shard, **expert_kwargs)
            else:
                target = getattr(module, param_name).data
                if tuple(target.shape) != tuple(tensor.shape):
                    raise ValueError(f"shape mismatch: checkpoint has {tuple(tensor.shape)}, "
                                     f"model expects {tuple(target.shape)}")
                target.copy_(tensor)
        except ValueError as exc:
            raise WeightLoadError(f"tensor {checkpoint_name!r}: {exc}") from None
        loaded.add(f"{module_path}.{param_name}")
        if expert_kwargs.get("expert") is not None:
            experts_seen.setdefault((module_path, param_name, shard), set()).add(expert_kwargs["expert"])
    for (module_path, param_name, shard), seen in experts_seen.items():
        absent = sorted(set(range(modules[module_path].num_experts)) - seen)
        if absent:
            part = f"{module_path}.{param_name}" + (f" ({shard})" if shard else "")
            raise WeightLoadError(f"checkpoint lacks expert(s) {absent} of {part}")
    for module in modules.values():
        if isinstance(module, FinishesLoading):
            module.finish_loading()
    missing = sorted(expected - loaded)
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise WeightLoadError(f"checkpoint lacks {len(missing)} tensor(s): {shown}")
