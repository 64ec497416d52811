"""Weights held in packed integer form, and the matmul over each.

- `BlockWeight`: our C++ kernel's storage (4-bit or int8 values, group scales and offsets in fp16
  where that is exact, else fp32), computed with fp32 activations; the default wherever the
  extension builds.
- `Int4Weight`: values in groups of 32 along the input dim, packed for PyTorch's CPU
  weight-only kernel `_weight_int4pack_mm_for_cpu` (w = (u - 8) * scale + zero). GGUF Q4_0, Q4_1
  and Q4_K map onto it directly, wider formats with groups of 32 (Q5_0, Q5_1, Q5_K, Q8_0) as two
  nibble planes; exact up to the bf16 scales the kernel takes. int4 quantization at load too.
- `GroupWeight`: 4-bit or int8 values with per-group scales (and offsets) in our own layout,
  without a kernel: formats whose groups are smaller than 32 (Q6_K), quantized embedding tables,
  and the exact dense form of an `Int4Weight`.

PyTorch's CPU kernels (the fallbacks) are fast only with bf16 activations and amortise poorly
over many rows, so a matmul with few rows runs the kernel on bf16 inputs and returns the caller's dtype, while a
matmul with many rows (prefill) dequantizes the weight and runs a dense GEMM in the caller's
dtype, which costs little next to the GEMM itself.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmserve.quant import native
from lmserve.quant.gguf_blocks import GroupQuantized

# Matmuls with at most this many rows use the packed kernels, more rows dequantize and use GEMM
# (PyTorch's int4 kernel; our block kernel against a bf16 GEMM; BlockWeight asks its variant).
KERNEL_MAX_ROWS = 32
# Rows of the int4 kernel's weight are padded to a multiple of its largest row block (32 in
# PyTorch's AVX2 build, 64 in its AVX-512 one), so every block is whole whichever build runs.
_INT4_ROW_MULTIPLE = 64


def _rows_of(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1]


class KernelOrGemmWeight(nn.Module):
    """Base of the packed weights that have a fast kernel for few rows."""

    kernel_max_rows = KERNEL_MAX_ROWS  # 0 forces the dequantize-then-GEMM path (deterministic mode)

    def uses_kernel(self, x: torch.Tensor) -> bool:
        return _rows_of(x) <= self.kernel_max_rows


def _row_blocks(per_row: np.ndarray) -> np.ndarray:
    """[rows, ...] -> [ceil(rows / 8), 8, ...], zero-padding the last block."""
    pad = -per_row.shape[0] % 8
    if pad:
        per_row = np.concatenate([per_row, np.zeros((pad, *per_row.shape[1:]), per_row.dtype)])
    return per_row.reshape(-1, 8, *per_row.shape[1:])


def interleave_blocks(values: np.ndarray, bits: int, group: int) -> np.ndarray:
    """Row-major values [rows, cols] (4-bit as uint8 0-15, else int8) in the kernel's layout
    (`csrc/block_kernels.h`): blocks of 8 rows, group by group, 2 columns of the 8 rows per chunk."""
    blocks = np.ascontiguousarray(_row_blocks(values))
    n = blocks.shape[0]
    # Both layouts move column pairs (2 bytes, one uint16) as units: a transpose of [block, row,
    # column pair] to [block, column pair, row], where numpy copies 2-byte items, not single bytes.
    if bits == 8:
        # block, group, chunk of 2 columns, row, column
        pairs = blocks.view(np.uint16).transpose(0, 2, 1)
        return np.ascontiguousarray(pairs).view(blocks.dtype).reshape(n, -1, group * 8)
    # rows j = 4 * nibble + i; columns 4 * unit + 2 * half + e; byte 8 * half + 2 * i + e
    nibbles = blocks[:, :4] | (blocks[:, 4:] << 4)  # [block, i, column]: row i low, row 4 + i high
    pairs = nibbles.view(np.uint16).transpose(0, 2, 1)
    return np.ascontiguousarray(pairs).view(np.uint8).reshape(n, -1, group * 4)


def _exact_half(a: np.ndarray) -> np.ndarray | None:
    """`a` as fp16 where that holds every value exactly (GGUF's simple formats store fp16
    scales), else None."""
    with np.errstate(over="ignore"):
        half = a.astype(np.float16)
    return half if np.array_equal(half.astype(np.float32), a) else None


def interleave_groups(per_group: np.ndarray) -> np.ndarray:
    """Scales or offsets [rows, groups] -> [ceil(rows / 8), groups, 8] fp32."""
    return np.ascontiguousarray(_row_blocks(per_group.astype(np.float32)).transpose(0, 2, 1))


class BlockWeight(KernelOrGemmWeight):
    """Our C++ kernel's storage (`quant/csrc/block_matmul.cpp`): 4-bit values two per byte, or
    any other format as int8, with scales and offsets per group of 16 or 32 (fp16 where that
    holds them exactly, else fp32), interleaved in blocks of 8 rows. Activations stay fp32, so
    both paths match dequantize-then-matmul in fp32 up to summation order: few rows run the
    kernel, more rows dequantize a slab of rows at a time into a cache-sized scratch buffer and
    multiply it with GEMM."""

    # The slab GEMM's operand type: bfloat16 (`prefill_precision="bf16"`) runs it through
    # oneDNN's bf16 kernels (AVX512-BF16 / AMX), inputs and outputs rounded to bf16; that GEMM is
    # fast enough that only KERNEL_MAX_ROWS rows stay on the kernel (`use_bf16_gemm`).
    gemm_dtype = torch.float32

    def __init__(self, gq: GroupQuantized, native):
        super().__init__()
        self.native = native
        # The crossover with the fp32 slab GEMM of the kernel variant this CPU runs (32 rows for
        # AVX2, 512 for AVX-512 VNNI).
        self.kernel_max_rows = native.kernel_max_rows()
        low, high = gq.levels
        self.out_features, self.in_features = gq.shape
        self.group = gq.group
        if high - low <= 15 and gq.group == 32:
            self.bits = 4
            q = gq.q.astype(np.int8, copy=False)
            values = (q - np.int8(low) if low else q).view(np.uint8)  # 0-15 (int8 arithmetic wraps)
            # Symmetric values in -8..7 (Q4_0) are stored centred, without offsets.
            centred = gq.bias is None and low == -8
            bias = None if centred else low * gq.scale + (gq.bias if gq.bias is not None else 0.0)
        else:
            self.bits, values, bias = 8, gq.q.astype(np.int8, copy=False), gq.bias
        self.register_buffer("q", torch.from_numpy(interleave_blocks(values, self.bits, self.group)))
        per_group = [interleave_groups(gq.scale)] + ([] if bias is None else [interleave_groups(bias)])
        halves = [_exact_half(a) for a in per_group]
        if all(h is not None for h in halves):
            per_group = halves
        self.register_buffer("scale", torch.from_numpy(per_group[0]))
        self.register_buffer("bias", torch.from_numpy(per_group[1]) if len(per_group) == 2 else torch.empty(0))

    def use_bf16_gemm(self) -> None:
        self.gemm_dtype = torch.bfloat16
        self.kernel_max_rows = min(self.kernel_max_rows, KERNEL_MAX_ROWS)

    def _dequantize_into(self, first_row: int, out: torch.Tensor) -> None:
        self.native.block_dequantize(self.q, self.scale, self.bias, self.group, self.bits, self.out_features,
                                     first_row, out)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        out = torch.empty(self.out_features, self.in_features)
        self._dequantize_into(0, out)
        return out.to(dtype)

    def dequantize_rows(self, rows: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The given rows only, dense (token-table lookups): [*rows.shape, in_features]."""
        out = self.native.block_gather_rows(self.q, self.scale, self.bias, self.group, self.bits,
                                            self.out_features, rows.reshape(-1).long())
        return out.to(dtype).view(*rows.shape, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).float()
        if self.uses_kernel(flat):
            out = self.native.block_matmul(flat, self.q, self.scale, self.bias, self.group, self.bits,
                                           self.out_features)
        else:
            out = self.native.block_slab_gemm(flat, self.q, self.scale, self.bias, self.group, self.bits,
                                              self.out_features, self.gemm_dtype == torch.bfloat16)
        return out.to(x.dtype).view(*x.shape[:-1], self.out_features)


class GroupWeight(nn.Module):
    """Values with per-group scales (and offsets) in a layout we own, without a kernel: formats
    whose groups are smaller than 32 (Q6_K), token tables where our kernel does not build, and
    the exact dense form behind `Int4Weight`. Values spanning at most 16 levels are stored two
    per byte (even column in the low nibble), others as int8; `dequantize` equals
    `GroupQuantized.dequantize` up to fp32 rounding."""

    def __init__(self, gq: GroupQuantized):
        super().__init__()
        self.out_features, self.in_features = gq.shape
        self.group = gq.group
        low, high = gq.levels
        bias = gq.bias
        if high - low <= 15 and self.in_features % 2 == 0:
            self.low = low  # stored values are q - low, its share folded into the offsets
            u = (gq.q.astype(np.int16) - low).astype(np.uint8)
            values = u[:, 0::2] | (u[:, 1::2] << 4)
            bias = low * gq.scale + (bias if bias is not None else 0.0)
        else:
            self.low, values = None, gq.q.astype(np.int8)
        self.register_buffer("values", torch.from_numpy(np.ascontiguousarray(values)))
        self.register_buffer("scale", torch.from_numpy(gq.scale.astype(np.float32)))
        self.register_buffer("bias", None if bias is None else torch.from_numpy(bias.astype(np.float32)))

    def _levels(self, rows) -> torch.Tensor:
        """Stored values of the given rows as integers (uint8 q - low, or int8 q)."""
        values = self.values if rows is None else self.values[rows]
        if self.low is None:
            return values
        return torch.stack([values & 0x0F, values >> 4], dim=-1).view(*values.shape[:-1], self.in_features)

    def dequantize_rows(self, rows: torch.Tensor | slice | None = None,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight, or only the given rows of it (embedding lookups)."""
        q = self._levels(rows)
        scale = self.scale if rows is None else self.scale[rows]
        w = q.to(dtype).view(*q.shape[:-1], -1, self.group) * scale.to(dtype)[..., None]
        if self.bias is not None:
            w = w + (self.bias if rows is None else self.bias[rows]).to(dtype)[..., None]
        return w.view(q.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.dequantize_rows(None, dtype)

    def group_quantized(self) -> GroupQuantized:
        """The same weight as integer values and group scales (for packing it another way)."""
        q = self._levels(None).numpy().astype(np.int16)
        if self.low is not None:
            return GroupQuantized((q + self.low).astype(np.int8), self.scale.numpy(),
                                  self.bias.numpy() - self.low * self.scale.numpy(), self.group,
                                  (self.low, self.low + 15))
        levels = (int(q.min()), int(q.max())) if q.size else (0, 0)
        bias = None if self.bias is None else self.bias.numpy()
        return GroupQuantized(q.astype(np.int8), self.scale.numpy(), bias, self.group, levels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize(x.dtype))


class Int4Weight(KernelOrGemmWeight):
    """Weights of up to 8 bits in groups of 32, run by PyTorch's CPU int4 kernel for few rows.

    4-bit values map directly. Wider values u (up to 255 levels) are split into two nibbles,
    u = 16 * hi + lo, stored side by side along the input dim with scales 16s and s, and the
    input is repeated twice: one kernel call, half the bytes of bf16, exact up to bf16 scales.
    The kernel's packed layout is PyTorch's private business (it differs between its AVX2 and
    AVX-512 builds), so the dense weight for many rows comes from a `GroupWeight` of our own,
    exact in fp32; a tied head passes its table's one so no second copy is kept.
    """

    def __init__(self, gq: GroupQuantized, dense: GroupWeight | None = None):
        super().__init__()
        low, high = gq.levels
        if high - low > 255 or gq.group % 32:
            raise ValueError(f"values {gq.levels} in groups of {gq.group} do not fit the int4 layout")
        rows, cols = gq.shape
        self.out_features, self.in_features, self.group = rows, cols, gq.group
        self.dense = dense if dense is not None else GroupWeight(gq)
        u = gq.q.astype(np.int32) - low
        base = low * gq.scale + (gq.bias if gq.bias is not None else 0.0)  # w = u * scale + base
        if high - low <= 15:
            parts = [(u, gq.scale, base + 8 * gq.scale)]
        else:
            # Centre the high plane on the kernel's -8 offset so the bf16 zero-points stay small.
            centre = ((high - low) // 16 + 1) // 2
            parts = [((u >> 4) - centre + 8, 16 * gq.scale, base + 16 * centre * gq.scale),
                     (u & 15, gq.scale, 8 * gq.scale)]
        self.splits = len(parts)
        padded = -(-rows // _INT4_ROW_MULTIPLE) * _INT4_ROW_MULTIPLE
        values = np.zeros((padded, cols * self.splits), dtype=np.int32)
        values[:rows] = np.concatenate([p[0] for p in parts], axis=1)
        scale_zero = np.zeros((cols * self.splits // gq.group, padded, 2), dtype=np.float32)
        scale_zero[:, :rows, 0] = np.concatenate([p[1] for p in parts], axis=1).T
        scale_zero[:, :rows, 1] = np.concatenate([p[2] for p in parts], axis=1).T
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            torch.from_numpy(values), 1))
        self.register_buffer("scale_zero", torch.from_numpy(scale_zero).to(torch.bfloat16))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.dense.dequantize(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.uses_kernel(x):
            return F.linear(x, self.dequantize(x.dtype))
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        flat = flat.repeat(1, self.splits) if self.splits > 1 else flat.contiguous()
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, self.group, self.scale_zero)
        out = out[:, : self.out_features].to(x.dtype)
        return out.view(*x.shape[:-1], self.out_features)


def quantize_int4(weight: torch.Tensor, group: int = 32) -> GroupQuantized:
    """Asymmetric 4-bit quantization of a dense [out, in] weight in groups of `group` inputs."""
    rows, cols = weight.shape
    w = weight.detach().float().reshape(rows, cols // group, group)
    low, high = w.amin(dim=-1), w.amax(dim=-1)
    scale = ((high - low) / 15).clamp_min(1e-12)
    q = torch.round((w - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int8)
    return GroupQuantized(q.reshape(rows, cols).numpy(), scale.numpy(), low.numpy(), group, (0, 15))


def quantize_int8(weight: torch.Tensor, group: int = 32) -> GroupQuantized:
    """Symmetric 8-bit quantization in groups of `group` inputs (GGUF's Q8_0 scheme)."""
    rows, cols = weight.shape
    w = weight.detach().float().reshape(rows, cols // group, group)
    scale = (w.abs().amax(dim=-1) / 127).clamp_min(1e-12)
    q = torch.round(w / scale[..., None]).clamp(-127, 127).to(torch.int8)
    return GroupQuantized(q.reshape(rows, cols).numpy(), scale.numpy(), None, group, (-127, 127))


def pack_table(gq: GroupQuantized) -> BlockWeight | GroupWeight:
    """A token table: our kernel's layout where it builds (rows are gathered from it, and a tied
    LM head multiplies with the same storage), else `GroupWeight`."""
    ext = native.load()
    if ext is not None and gq.group in (16, 32):
        return BlockWeight(gq, ext)
    return GroupWeight(gq)


def pack(gq: GroupQuantized) -> nn.Module:
    """The fastest packed form that holds `gq`: our kernel when it builds on this machine, else
    PyTorch's int4 kernel (exact up to bf16 scales), else `GroupWeight`."""
    ext = native.load()
    if ext is not None and gq.group in (16, 32):
        return BlockWeight(gq, ext)
    return Int4Weight(gq) if gq.group % 32 == 0 else GroupWeight(gq)
