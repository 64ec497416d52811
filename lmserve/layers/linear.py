"""Linear layers behind one interface.

Models only ask for a `Linear` (or a `MergedLinear` that fuses several projections into one
matmul); how the weight is stored is this module's business. Checkpoint tensors arrive through
`load_shard`: a dense tensor is copied into its slice of the fused weight, a quantized one
(`GroupQuantized`, from a GGUF file) is kept until every shard has arrived and then packed
(`lmserve.quant.packed`), so the dense weight is never materialised. `quantize_` packs a dense
weight after loading (weight-only int8/int4 at load).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmserve.quant.gguf_blocks import GroupQuantized
from lmserve.quant.packed import pack, quantize_int4, quantize_int8

logger = logging.getLogger("lmserve")


class Linear(nn.Module):
    """y = x W^T (+ b); W dense, or packed once quantized shards have loaded."""

    accepts_packed = True

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        # torch.empty does not touch its pages, so a weight that arrives packed costs no memory.
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.packed: nn.Module | None = None
        self._pending: dict[str | None, GroupQuantized] = {}
        # Set by the engine's LoRA manager when adapters are enabled: the step's adapter rows
        # (`lmserve.lora.manager.LoRABatch`) and this module's path, its key in an adapter.
        self.lora = None
        self.lora_key = ""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            y = F.linear(x, self.weight, self.bias)
        else:
            y = self.packed(x)
            if self.bias is not None:
                y = y + self.bias
        if self.lora is not None and self.lora.spans:
            y = self.lora.apply(self.lora_key, x, y)
        return y

    def shard_names(self) -> list[str | None]:
        return [None]

    def shard_rows(self, shard: str | None) -> slice:
        return slice(0, self.out_features)

    def load_shard(self, param_name: str, tensor, shard: str | None = None) -> None:
        if isinstance(tensor, GroupQuantized):
            if param_name != "weight":
                tensor = torch.from_numpy(tensor.dequantize())
            else:
                _check_shape(self.shard_rows(shard), self.in_features, tensor.shape, f"weight[{shard}]")
                self._pending[shard] = tensor
                if set(self._pending) == set(self.shard_names()):
                    self.finish_loading()  # packed now, so the unpacked shards of all layers never pile up
                return
        target = getattr(self, param_name).data
        if shard is not None:
            target = target[self.shard_rows(shard)]
        copy_checked(target, tensor, f"{param_name}[{shard}]" if shard else param_name)

    def finish_loading(self) -> None:
        """Pack the quantized shards once all have arrived (a fused weight whose shards came
        partly dense is dequantized instead)."""
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        if set(pending) in ({None}, set(self.shard_names())):
            order = [None] if None in pending else self.shard_names()
            self.packed = pack(_merge_rows([pending[s] for s in order]))
            del self.weight
            self.weight = None
            return
        for shard, gq in pending.items():
            self.weight.data[self.shard_rows(shard)].copy_(torch.from_numpy(gq.dequantize()))

    def quantize_(self, mode: str) -> None:
        """Weight-only quantization of a dense weight in groups of 32 inputs: "int8" (symmetric,
        like GGUF Q8_0) or "int4" (asymmetric, like Q4_1)."""
        if self.packed is not None:
            return
        if self.in_features % 32:
            logger.info("%s needs input sizes divisible by 32; %d-wide layer kept dense", mode, self.in_features)
            return
        quantize = quantize_int4 if mode == "int4" else quantize_int8
        self.packed = pack(quantize(self.weight.data))
        del self.weight
        self.weight = None


class MergedLinear(Linear):
    """Several projections of the same input fused along the output dim (q|k|v or gate|up)."""

    def __init__(self, in_features: int, output_sizes: dict[str, int], bias: bool = False):
        super().__init__(in_features, sum(output_sizes.values()), bias)
        self.shard_slices: dict[str, slice] = {}
        offset = 0
        for name, size in output_sizes.items():
            self.shard_slices[name] = slice(offset, offset + size)
            offset += size

    def shard_names(self) -> list[str | None]:
        return list(self.shard_slices)

    def shard_rows(self, shard: str | None) -> slice:
        return self.shard_slices[shard] if shard is not None else slice(0, self.out_features)

    def split(self, y: torch.Tensor) -> list[torch.Tensor]:
        sizes = [s.stop - s.start for s in self.shard_slices.values()]
        return list(y.split(sizes, dim=-1))


def _merge_rows(parts: list[GroupQuantized]) -> GroupQuantized:
    """Stack quantized shards along rows in a common group size and value range."""
    if len(parts) == 1:
        return parts[0]
    group = min(p.group for p in parts)
    spans = [p.levels[1] - p.levels[0] for p in parts]
    shift = max(spans) <= 15  # shift every shard's values to start at 0 so they fit int4 together
    qs, scales, biases = [], [], []
    for p, span in zip(parts, spans):
        repeat = p.group // group
        scale = np.repeat(p.scale, repeat, axis=1)
        bias = np.repeat(p.bias, repeat, axis=1) if p.bias is not None else np.zeros_like(scale)
        q = p.q
        if shift and p.levels[0]:
            q = (q.astype(np.int16) - p.levels[0]).astype(np.int8)
            bias = bias + p.levels[0] * scale
        qs.append(q)
        scales.append(scale)
        biases.append(bias)
    levels = (0, max(spans)) if shift else (min(p.levels[0] for p in parts), max(p.levels[1] for p in parts))
    return GroupQuantized(np.concatenate(qs), np.concatenate(scales), np.concatenate(biases), group, levels)


def _check_shape(rows: slice, cols: int, shape: tuple[int, ...], what: str) -> None:
    expected = (rows.stop - rows.start, cols)
    if tuple(shape) != expected:
        raise ValueError(f"shape mismatch for {what}: checkpoint has {tuple(shape)}, model expects {expected}")


def copy_checked(target: torch.Tensor, tensor: torch.Tensor, what: str) -> None:
    if tuple(target.shape) != tuple(tensor.shape):
        raise ValueError(f"shape mismatch for {what}: checkpoint has {tuple(tensor.shape)}, "
                         f"model expects {tuple(target.shape)}")
    target.copy_(tensor)
