"""Reads a PEFT LoRA adapter directory into the low-rank factors of the base model's projections.

PEFT saves `adapter_config.json` (rank `r`, `lora_alpha`, `use_rslora`, `target_modules`, per-
module `rank_pattern` / `alpha_pattern`) and `adapter_model.safetensors` with, for each targeted
projection, `base_model.model.<module>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r]. The
update to that projection is `scaling * B @ A @ x`, `scaling = alpha / r` (`alpha / sqrt(r)`
with rsLoRA).

Checkpoint names map onto lmserve's modules the way base weights do (`packed_modules`,
`checkpoint_renames`): a target on `q_proj` lands in the q rows of the fused `qkv_proj`. For a
fused projection the shards' factors are combined into one pair, their A matrices stacked along
the rank and B block-diagonal (each shard's rows, its rank columns), so the update is two
matmuls whatever the number of shards targeted, and touches only the targeted shards' rows.
`scaling` is folded into B. Anything this does not serve (DoRA, embedding or LM-head targets,
`modules_to_save`, trained biases, a rank over `max_lora_rank`, a shape that does not fit)
is refused with an `InvalidParameterError` naming the adapter and the part.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lmserve.errors import InvalidParameterError
from lmserve.layers.linear import Linear
from lmserve.lora.request import LoRARequest

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_TENSOR_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.[\w-]+)?\.weight$")


@dataclass(eq=False)
class LoRAAdapter:
    """A loaded adapter: per lmserve module path, (A [R, in], scaling * B [out, R]) stored as the
    engine's `lora_dtype` (`manager.lora_dtype`). `cache_salt` separates its prefix-cache entries
    from the base model's and from another version of the same directory."""

    request: LoRARequest
    rank: int  # the largest rank of any module
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(repr=False)
    cache_salt: str = ""

    @property
    def name(self) -> str:
        return self.request.lora_name

    @property
    def int_id(self) -> int:
        return self.request.lora_int_id

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.weights.values())


def load_adapter(request: LoRARequest, model: nn.Module, max_rank: int, dtype: torch.dtype) -> LoRAAdapter:
    """Read `request.lora_path` for `model` (a `registry.CausalLM`)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(request.lora_path)

    def fail(problem: str) -> InvalidParameterError:
        return InvalidParameterError("lora_path", f"adapter {request.lora_name!r} ({directory}): {problem}")

    if not directory.is_dir():
        raise fail("no such directory")
    config = _read_config(directory, fail)
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        other = " (adapter_model.bin is not read: save with safe_serialization)" \
            if (directory / "adapter_model.bin").exists() else ""
        raise fail(f"missing {WEIGHTS_FILE}{other}")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise fail(f"{WEIGHTS_FILE} is not a readable safetensors file ({exc})") from None
    embeddings = sorted({name.removeprefix(_PREFIX).partition(".lora_embedding_")[0]
                         for name in tensors if ".lora_embedding_" in name})
    if embeddings:
        raise fail(f"it targets the embedding {embeddings[0]!r}: adapters on embeddings and the LM head are not served")
    factors: dict[str, dict[str, torch.Tensor]] = {}
    others = []  # full weights saved with the adapter (PEFT does that for tied or resized embeddings)
    for name, tensor in tensors.items():
        match = _TENSOR_RE.match(name.removeprefix(_PREFIX))
        if match is None:
            others.append(name)
        else:
            factors.setdefault(match["module"], {})[match["factor"]] = tensor
    if not factors:
        raise fail(f"{WEIGHTS_FILE} holds no LoRA factors")
    modules = dict(model.named_modules())
    fused: dict[str, list[tuple[str | None, torch.Tensor, torch.Tensor]]] = {}
    rank = 0
    for hf_module, pair in factors.items():
        if set(pair) != {"A", "B"}:
            raise fail(f"module {hf_module!r} has lora_{next(iter(pair))} without its pair")
        a, b = pair["A"], pair["B"]
        path, shard = _module_of(hf_module, model)
        layer = modules.get(path)
        if not isinstance(layer, Linear):
            raise fail(f"target module {hf_module!r} is not a linear projection of this "
                       f"{model.config.architecture} model (embeddings, the LM head and MoE experts are not served)")
        r = a.shape[0]
        rows = layer.shard_rows(shard)
        expected_a, expected_b = (r, layer.in_features), (rows.stop - rows.start, r)
        if a.dim() != 2 or tuple(a.shape) != expected_a or tuple(b.shape) != expected_b:
            raise fail(f"module {hf_module!r}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not fit the "
                       f"base model (expected {expected_a} and {expected_b})")
        if r > max_rank:
            raise fail(f"module {hf_module!r} has rank {r}, over max_lora_rank ({max_rank})")
        rank = max(rank, r)
        scale = _scaling(config, hf_module, r)
        fused.setdefault(path, []).append((shard, a.to(torch.float32), b.to(torch.float32) * scale))
    if others:
        raise fail(f"tensor {others[0]!r} is not a LoRA factor (only lora_A / lora_B of linear layers are served)")
    weights = {path: _combine(modules[path], parts, dtype) for path, parts in fused.items()}
    stat = weights_path.stat()
    salt = f"lora:{request.lora_int_id}:{directory.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    return LoRAAdapter(request, rank, weights, salt)


def _read_config(directory: Path, fail) -> dict:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise fail(f"missing {CONFIG_FILE}")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise fail(f"{CONFIG_FILE} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise fail(f"{CONFIG_FILE} is not a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise fail(f"peft_type is {config.get('peft_type')!r}; only LORA adapters are served")
    if config.get("use_dora"):
        raise fail("DoRA adapters (use_dora) are not served")
    if config.get("modules_to_save"):
        raise fail(f"modules_to_save {config['modules_to_save']} would replace whole base modules, "
                   f"which is not served; merge the adapter into the model instead")
    if config.get("bias", "none") != "none":
        raise fail(f"bias={config['bias']!r}: adapters that train biases are not served")
    for key in ("r", "lora_alpha"):
        value = config.get(key, 8)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise fail(f"{key} must be a positive number, got {value!r}")
    return config


def _module_of(hf_module: str, model: nn.Module) -> tuple[str, str | None]:
    """The lmserve module path and shard of a checkpoint module name (`model.layers.0.self_attn.q_proj`)."""
    for old, new in model.checkpoint_renames.items():
        hf_module = hf_module.replace(old, new)
    owner, _, leaf = hf_module.rpartition(".")
    if leaf in model.packed_modules:
        fused, shard = model.packed_modules[leaf]
        return f"{owner}.{fused}" if owner else fused, shard
    return hf_module, None


def _pattern_value(patterns: dict, hf_module: str, default):
    """PEFT's per-module override: the pattern that matches the end of the module's name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", hf_module):
            return value
    return default


def _scaling(config: dict, hf_module: str, rank: int) -> float:
    alpha = _pattern_value(config.get("alpha_pattern"), hf_module, config.get("lora_alpha", 8))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _combine(layer: Linear, parts: list[tuple[str | None, torch.Tensor, torch.Tensor]],
             dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """One (A, B) pair for a projection: the shards' A stacked along the rank, B block-diagonal."""
    parts = sorted(parts, key=lambda p: layer.shard_rows(p[0]).start)
    a = torch.cat([p[1] for p in parts])
    b = torch.zeros(layer.out_features, a.shape[0])
    column = 0
    for shard, shard_a, shard_b in parts:
        b[layer.shard_rows(shard), column: column + shard_a.shape[0]] = shard_b
        column += shard_a.shape[0]
    return a.to(dtype).contiguous(), b.to(dtype).contiguous()
