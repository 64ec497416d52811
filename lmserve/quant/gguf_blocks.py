"""Decoding GGUF quantized blocks into integer values and per-group scales.

Every supported block format is an affine code per group of consecutive elements along a row:
`w = q * scale + bias`, with small integer `q` (int8) and fp32 `scale`/`bias` per group (bias
absent for symmetric formats). `decode` returns that form for a whole [rows, cols] tensor so the
packed layers can choose a kernel; it is exact: `q * scale + bias` equals gguf-py's dequantization.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import Q4_K

QK_K = 256


@dataclass
class GroupQuantized:
    """Rows quantized in groups of `group` columns: w[r, c] = q[r, c] * scale[r, c // group] (+ bias).
    A stack of matrices (GGUF's experts, [E, rows, cols]) has the same leading dims in every array."""

    q: np.ndarray  # int8 [..., rows, cols]
    scale: np.ndarray  # float32 [..., rows, cols // group]
    bias: np.ndarray | None  # float32 [..., rows, cols // group]
    group: int
    levels: tuple[int, int]  # smallest and largest value q can take in this format

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape

    def map_rows(self, fn) -> "GroupQuantized":
        """The same weight with `fn` (a permutation of rows) applied to every per-row array."""
        bias = None if self.bias is None else fn(self.bias)
        return GroupQuantized(fn(self.q), fn(self.scale), bias, self.group, self.levels)

    def dequantize(self) -> np.ndarray:
        grouped = self.q.reshape(*self.scale.shape, self.group).astype(np.float32) * self.scale[..., None]
        if self.bias is not None:
            grouped += self.bias[..., None]
        return grouped.reshape(self.q.shape)


def _f16(raw: np.ndarray) -> np.ndarray:
    return raw.view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[n, 16] bytes -> [n, 32] values: low nibbles are elements 0-15, high nibbles 16-31."""
    out = np.empty((qs.shape[0], 32), np.uint8)
    np.bitwise_and(qs, 0x0F, out=out[:, :16])
    np.right_shift(qs, 4, out=out[:, 16:])
    return out


def _fifth_bits(qh: np.ndarray) -> np.ndarray:
    """[n, 4] bytes of a little-endian uint32 -> [n, 32] bits (element j is bit j)."""
    bits = qh.copy().view(np.uint32)
    return ((bits >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)


def _q4_0(b):
    return _nibbles(b[:, 2:]).view(np.int8) - np.int8(8), _f16(b[:, :2]), None


def _q4_1(b):
    return _nibbles(b[:, 4:]).view(np.int8), _f16(b[:, :2]), _f16(b[:, 2:4])


def _q5_0(b):
    q = _nibbles(b[:, 6:]) | (_fifth_bits(b[:, 2:6]) << 4)
    return q.astype(np.int8) - 16, _f16(b[:, :2]), None


def _q5_1(b):
    q = _nibbles(b[:, 8:]) | (_fifth_bits(b[:, 4:8]) << 4)
    return q.astype(np.int8), _f16(b[:, :2]), _f16(b[:, 2:4])


def _q8_0(b):
    return b[:, 2:].copy().view(np.int8), _f16(b[:, :2]), None


def _k_scales(b):
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = Q4_K.get_scale_min(b[:, 4:16].copy())
    return d * sc.astype(np.float32), -dmin * mn.astype(np.float32)


def _q4_k(b):
    n = b.shape[0]
    qs = b[:, 16:].reshape(n, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    scale, bias = _k_scales(b)
    return (qs & 0x0F).reshape(n, QK_K).astype(np.int8), scale, bias


def _q5_k(b):
    n = b.shape[0]
    low = b[:, 48:].reshape(n, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    high = b[:, 16:48].reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
    q = (low & 0x0F).reshape(n, 8, 32) | ((high & 1) << 4)
    scale, bias = _k_scales(b)
    return q.reshape(n, QK_K).astype(np.int8), scale, bias


def _q6_k(b):
    n = b.shape[0]
    low = b[:, :128].reshape(n, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    low = (low & 0x0F).reshape(n, 2, 4, 32)
    high = b[:, 128:192].reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    q = (low | ((high & 3) << 4)).astype(np.int8) - 32
    scale = _f16(b[:, 208:210]) * b[:, 192:208].copy().view(np.int8).astype(np.float32)
    return q.reshape(n, QK_K), scale, None


# type -> (decoder, elements per scale group, value range)
_DECODERS = {
    "Q4_0": (_q4_0, 32), "Q4_1": (_q4_1, 32), "Q5_0": (_q5_0, 32), "Q5_1": (_q5_1, 32),
    "Q8_0": (_q8_0, 32), "Q4_K": (_q4_k, 32), "Q5_K": (_q5_k, 32), "Q6_K": (_q6_k, 16),
}
_LEVELS = {"Q4_0": (-8, 7), "Q4_1": (0, 15), "Q4_K": (0, 15), "Q5_0": (-16, 15), "Q5_1": (0, 31),
           "Q5_K": (0, 31), "Q8_0": (-128, 127), "Q6_K": (-32, 31)}
PACKABLE_TYPES = tuple(_DECODERS)


def decode(raw: np.ndarray, type_name: str, shape: tuple[int, ...]) -> GroupQuantized:
    """Decode a GGUF tensor's raw bytes (any shape whose total is the tensor's byte size) of
    logical shape [..., rows, cols] into its integer form."""
    decoder, group = _DECODERS[type_name]
    block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    blocks = np.ascontiguousarray(raw).reshape(-1, block_bytes)
    q, scale, bias = decoder(blocks)
    as_rows = lambda a: np.ascontiguousarray(a.reshape(*shape[:-1], -1).astype(a.dtype, copy=False))  # noqa: E731
    return GroupQuantized(as_rows(q), as_rows(scale.astype(np.float32)),
                          None if bias is None else as_rows(bias.astype(np.float32)), group, _LEVELS[type_name])
