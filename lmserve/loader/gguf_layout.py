"""A GGUF file's binary layout, checked before the `gguf` package reads it.

The `gguf` package trusts the numbers in a file's header: a flipped array length makes it loop
for hours, a tensor offset near 2**64 wraps around, two tensors may share their bytes. This scan
walks the header once with every count and length checked against the bytes that remain, then
checks that each tensor lies inside the data section, aligned as GGUF requires and overlapping no
other; a bad file ends in a `ModelLoadError` that names the value. It reads the header only
(tensor data is never touched), with allocations bounded by the header's own size.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

from gguf.constants import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, GGUFValueType

from lmserve.errors import ModelLoadError

SUPPORTED_VERSIONS = (2, 3)
MAX_DIMS = 4  # GGML_MAX_DIMS
_SCALAR_SIZES = {GGUFValueType.UINT8: 1, GGUFValueType.INT8: 1, GGUFValueType.BOOL: 1, GGUFValueType.UINT16: 2,
                 GGUFValueType.INT16: 2, GGUFValueType.UINT32: 4, GGUFValueType.INT32: 4, GGUFValueType.FLOAT32: 4,
                 GGUFValueType.UINT64: 8, GGUFValueType.INT64: 8, GGUFValueType.FLOAT64: 8}
_MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, smallest value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # name length, n_dims, one dimension, type, offset


@dataclass(frozen=True)
class TensorSpan:
    """Where one tensor's bytes lie, relative to the start of the data section."""

    name: str
    dims: tuple[int, ...]  # GGUF order: innermost first
    offset: int
    nbytes: int


class _Header:
    """A cursor over the file's bytes whose every read is bounds-checked."""

    def __init__(self, data, path: Path):
        self.data, self.path, self.pos, self.size = data, path, 0, len(data)
        self.order = "<"

    def fail(self, problem: str) -> ModelLoadError:
        return ModelLoadError(self.path, problem)

    def need(self, count: int, what: str) -> None:
        if count > self.size - self.pos:
            raise self.fail(f"truncated GGUF header: {what} at byte {self.pos} needs {count} bytes, "
                            f"the file has {self.size - self.pos} left")

    def unpack(self, fmt: str, what: str) -> int:
        size = struct.calcsize(fmt)
        self.need(size, what)
        (value,) = struct.unpack_from(self.order + fmt, self.data, self.pos)
        self.pos += size
        return value

    def skip_string(self, what: str) -> int:
        """Step over a string; its start."""
        length = self.unpack("Q", f"the length of {what}")
        self.need(length, what)
        self.pos += length
        return self.pos - length

    def name(self, what: str) -> str:
        raw = self.data[self.skip_string(what):self.pos]
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} at byte {self.pos - len(raw)} is not valid UTF-8: {raw[:64]!r}") from None

    def count(self, what: str, min_bytes: int) -> int:
        """A count of items of at least `min_bytes` each, refused when they cannot fit in the file."""
        value = self.unpack("Q", what)
        if value * min_bytes > self.size - self.pos:
            raise self.fail(f"{what} is {value}, more than the {self.size - self.pos} bytes left in the file "
                            f"can hold (a truncated or corrupt file)")
        return value

    def value_type(self, what: str) -> GGUFValueType:
        raw = self.unpack("I", f"the value type of {what}")
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise self.fail(f"{what}: unknown value type {raw}") from None

    def skip_value(self, value_type: GGUFValueType, what: str) -> None:
        if value_type == GGUFValueType.STRING:
            self.skip_string(what)
        elif value_type == GGUFValueType.ARRAY:
            item_type = self.value_type(f"the items of {what}")
            if item_type == GGUFValueType.ARRAY:
                raise self.fail(f"{what} is an array of arrays (llama.cpp refuses those too)")
            item_size = _SCALAR_SIZES.get(item_type, 8)  # a string takes at least its 8-byte length
            length = self.count(f"the length of array {what}", item_size)
            if item_type == GGUFValueType.STRING:
                for _ in range(length):
                    self.skip_string(f"a string of {what}")
            else:
                self.pos += length * item_size
        else:
            self.need(_SCALAR_SIZES[value_type], what)
            self.pos += _SCALAR_SIZES[value_type]


def check_gguf_layout(path: Path) -> list[TensorSpan]:
    """Check the header and tensor layout of the GGUF file at `path`; its tensors' spans in the
    data section, or a `ModelLoadError` naming the first bad value."""
    with open(path, "rb") as f:
        try:
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # an empty file cannot be mapped
            raise ModelLoadError(path, "truncated GGUF file (it is empty)") from None
    with data:
        return _scan(_Header(data, path))


def _scan(header: _Header) -> list[TensorSpan]:
    header.need(8, "the magic and version")
    if header.data[:4] != b"GGUF":
        raise header.fail("not a GGUF file (bad magic)")
    header.pos = 4
    version = header.unpack("I", "the version")
    if version & 0xFFFF == 0:  # written on a machine of the other byte order
        header.order = ">"
        version = struct.unpack(">I", struct.pack("<I", version))[0]
    if version not in SUPPORTED_VERSIONS:
        raise header.fail(f"GGUF version {version} is not supported (supported: "
                          f"{', '.join(map(str, SUPPORTED_VERSIONS))})")
    tensor_count = header.unpack("Q", "the tensor count")  # checked once the metadata before the tensors is read
    kv_count = header.count("the metadata entry count", _MIN_KV_BYTES)
    alignment = GGUF_DEFAULT_ALIGNMENT
    keys = {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"}  # the names the gguf package gives these
    for _ in range(kv_count):
        key = header.name("a metadata key")
        if key in keys:
            raise header.fail(f"duplicate metadata key {key!r}")
        keys.add(key)
        value_type = header.value_type(f"metadata {key!r}")
        if key == "general.alignment":
            alignment = header.unpack("I", key) if value_type == GGUFValueType.UINT32 else 0
            if alignment == 0 or alignment & (alignment - 1):
                raise header.fail(f"general.alignment must be a power of two stored as UINT32, got "
                                  f"{alignment if value_type == GGUFValueType.UINT32 else value_type.name}")
        else:
            header.skip_value(value_type, f"metadata {key!r}")
    if tensor_count * _MIN_TENSOR_INFO_BYTES > header.size - header.pos:
        raise header.fail(f"the tensor count is {tensor_count}, more than the {header.size - header.pos} bytes "
                          f"left in the file can hold (a truncated or corrupt file)")
    infos = [_tensor_info(header) for _ in range(tensor_count)]
    names = [info[0] for info in infos]
    if len(set(names)) != len(names):
        duplicate = next(name for name in names if names.count(name) > 1)
        raise header.fail(f"duplicate tensor name {duplicate!r}")
    data_start = -(-header.pos // alignment) * alignment
    return _check_spans(header, infos, data_start, alignment)


def _tensor_info(header: _Header) -> tuple[str, GGMLQuantizationType, tuple[int, ...], int]:
    name = header.name("a tensor name")
    n_dims = header.unpack("I", f"the dimension count of tensor {name!r}")
    if not 1 <= n_dims <= MAX_DIMS:
        raise header.fail(f"tensor {name!r} has {n_dims} dimensions (GGUF allows 1 to {MAX_DIMS})")
    dims = tuple(header.unpack("Q", f"a dimension of tensor {name!r}") for _ in range(n_dims))
    raw_type = header.unpack("I", f"the type of tensor {name!r}")
    try:
        tensor_type = GGMLQuantizationType(raw_type)
    except ValueError:
        raise header.fail(f"tensor {name!r} has unknown type id {raw_type}") from None
    block_size, _ = GGML_QUANT_SIZES[tensor_type]
    if dims[0] % block_size:
        raise header.fail(f"tensor {name!r}: row length {dims[0]} is not a multiple of the "
                          f"{tensor_type.name} block size {block_size}")
    offset = header.unpack("Q", f"the offset of tensor {name!r}")
    return name, tensor_type, dims, offset


def _check_spans(header: _Header, infos, data_start: int, alignment: int) -> list[TensorSpan]:
    data_size = max(header.size - data_start, 0)
    spans = []
    for name, tensor_type, dims, offset in infos:
        block_size, type_size = GGML_QUANT_SIZES[tensor_type]
        elements = 1
        for dim in dims:
            elements *= dim
        nbytes = elements // block_size * type_size
        if offset % alignment:
            raise header.fail(f"tensor {name!r} has data offset {offset}, not a multiple of the alignment {alignment}")
        if offset + nbytes > data_size:
            raise header.fail(f"tensor {name!r} ({tensor_type.name} {list(dims)}, {nbytes} bytes at data offset "
                              f"{offset}) lies outside the data section ({data_size} bytes from byte {data_start})")
        spans.append(TensorSpan(name, dims, offset, nbytes))
    previous = None
    for span in sorted((s for s in spans if s.nbytes), key=lambda s: s.offset):
        if previous is not None and span.offset < previous.offset + previous.nbytes:
            raise header.fail(f"tensors {previous.name!r} (data bytes {previous.offset}-"
                              f"{previous.offset + previous.nbytes}) and {span.name!r} (from byte {span.offset}) "
                              f"overlap")
        previous = span
    return spans
