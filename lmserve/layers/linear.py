"""Linear layers behind one interface.

Models only ask for a `Linear` (or a `MergedLinear` that fuses several projections into one
matmul); how the weight is stored is this module's business. Checkpoint tensors arrive through
`load_shard`: a dense tensor is copied into its slice of the fused weight, a quantized one
(`GroupQuantized`, from a GGUF file) is kept until every shard has arrived and then packed
(`lmserve.quant.packed`), so the dense weight is never materialised. `quantize_` packs a dense
weight after loading (weight-only int8/int4 at load).
"""

from __future__ import annotations

import itertools
import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmserve import parallel
from lmserve.quant.gguf_blocks import GroupQuantized
from lmserve.quant.packed import pack, quantize_int4, quantize_int8

logger = logging.getLogger("lmserve")


class Linear(nn.Module):
    """y = x W^T (+ b); W dense, or packed once quantized shards have loaded.

    Under tensor parallelism a layer holds part of the checkpoint's weight: `checkpoint_rows`
    (column-parallel: the output rows of each shard this rank computes) or `checkpoint_cols`
    (row-parallel: the input columns it receives; its partial outputs are summed across the
    ranks before the bias is added). Both default to the whole weight."""

    accepts_packed = True

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 checkpoint_rows: slice | None = None, checkpoint_cols: slice | None = None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        split = parallel.current().size > 1
        self.checkpoint_rows: dict[str | None, slice] | None = {None: checkpoint_rows} \
            if split and checkpoint_rows is not None else None
        self.checkpoint_cols = checkpoint_cols if split else None
        self.reduce_group = parallel.current() if self.checkpoint_cols is not None else None
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
        if self.reduce_group is not None:  # row-parallel: the bias once, after the sum
            y = F.linear(x, self.weight) if self.packed is None else self.packed(x)
            y = self.reduce_group.all_reduce(y)
            if self.bias is not None:
                y = y + self.bias
        elif self.packed is None:
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
        tensor = self._local_part(param_name, tensor, shard)
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

    def _local_part(self, param_name: str, tensor, shard: str | None):
        """The part of a checkpoint tensor this rank holds (all of it without tensor parallelism)."""
        if self.checkpoint_rows is not None:
            if shard is None and None not in self.checkpoint_rows:  # fused shards in one checkpoint tensor
                offsets = itertools.accumulate(self.checkpoint_sizes.values(), initial=0)
                index = np.concatenate([np.arange(offset + rows.start, offset + rows.stop) for offset, rows
                                        in zip(offsets, self.checkpoint_rows.values())])
                tensor = _take_rows(tensor, index)
            else:
                tensor = _take_rows(tensor, self.checkpoint_rows[shard])
        if self.checkpoint_cols is not None and param_name == "weight":
            tensor = take_cols(tensor, self.checkpoint_cols)
        return tensor

    def finish_loading(self) -> None:
        """Pack the quantized shards once all have arrived (a fused weight whose shards came
        partly dense is dequantized instead)."""
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        if set(pending) in ({None}, set(self.shard_names())):
            order = [None] if None in pending else self.shard_names()
            self.packed = pack(merge_rows([pending[s] for s in order]))
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
    """Several projections of the same input fused along the output dim (q|k|v or gate|up).
    Column-parallel, `checkpoint_rows` gives each shard's rows this rank keeps (`output_sizes`
    are then those parts' sizes) and `checkpoint_sizes` the shards' sizes in the checkpoint,
    for checkpoints that store them fused (Phi-3's qkv_proj, GPT-2's c_attn)."""

    def __init__(self, in_features: int, output_sizes: dict[str, int], bias: bool = False,
                 checkpoint_rows: dict[str, slice] | None = None, checkpoint_sizes: dict[str, int] | None = None):
        super().__init__(in_features, sum(output_sizes.values()), bias)
        self.checkpoint_rows = checkpoint_rows if parallel.current().size > 1 else None
        self.checkpoint_sizes = checkpoint_sizes or output_sizes
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


def _take_rows(tensor, rows: slice | np.ndarray):
    """Rows of a dense weight or bias, or of a quantized weight."""
    if isinstance(tensor, GroupQuantized):
        return tensor.map_rows(lambda array: array[rows])
    return tensor[torch.from_numpy(rows) if isinstance(rows, np.ndarray) else rows]


def take_cols(tensor, cols: slice):
    """Input columns of a dense or quantized weight; a quantized one is cut at whole groups."""
    if not isinstance(tensor, GroupQuantized):
        return tensor[:, cols]
    if cols.start % tensor.group or cols.stop % tensor.group:
        raise ValueError(f"columns {cols.start}:{cols.stop} do not fall on the quantization groups of "
                         f"{tensor.group}; this tensor-parallel split cannot keep the weight packed")
    groups = slice(cols.start // tensor.group, cols.stop // tensor.group)
    bias = None if tensor.bias is None else tensor.bias[:, groups]
    return GroupQuantized(tensor.q[:, cols], tensor.scale[:, groups], bias, tensor.group, tensor.levels)


def merge_rows(parts: list[GroupQuantized]) -> GroupQuantized:
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
