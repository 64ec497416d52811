"""Reading a GGUF file: its header, metadata and tensor infos, every number checked.

The `gguf` package trusts the numbers in a file's header (a flipped array length makes it loop
for hours, a tensor offset near 2**64 wraps around, two tensors may share their bytes) and builds
numpy objects for every element of every array, which takes seconds for a 49k-token vocabulary.
This reader walks the header once over a read-only memory map with every count and length
checked against the bytes that remain: numeric arrays are converted in bulk from one
`np.frombuffer` view, string arrays in one pass over their bytes. It then checks that each tensor
lies inside the data section, aligned as GGUF requires and overlapping no other; a bad file ends
in a `ModelLoadError` that names the value. Tensor data is never touched here: `GGUFTensor.data`
is a numpy view of the memory map, made when asked for. What is allocated grows with the size of
the header only.

The values are those of gguf-py's `GGUFReader` (`ReaderField.contents()`): Python ints, floats,
bools and strs, lists of them for arrays; strings that are not valid UTF-8 are decoded with
U+FFFD in place of the bad bytes. `tests/test_gguf_reader.py` holds the two readers to the same
metadata and tensor infos.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, GGUFValueType

from lmserve.errors import ModelLoadError

SUPPORTED_VERSIONS = (2, 3)
MAX_DIMS = 4  # GGML_MAX_DIMS
# value type -> (struct format, numpy type) of the scalar types
_SCALARS = {GGUFValueType.UINT8: ("B", np.uint8), GGUFValueType.INT8: ("b", np.int8),
            GGUFValueType.BOOL: ("?", np.bool_), GGUFValueType.UINT16: ("H", np.uint16),
            GGUFValueType.INT16: ("h", np.int16), GGUFValueType.UINT32: ("I", np.uint32),
            GGUFValueType.INT32: ("i", np.int32), GGUFValueType.FLOAT32: ("f", np.float32),
            GGUFValueType.UINT64: ("Q", np.uint64), GGUFValueType.INT64: ("q", np.int64),
            GGUFValueType.FLOAT64: ("d", np.float64)}
_SCALAR_SIZES = {value_type: struct.calcsize(fmt) for value_type, (fmt, _) in _SCALARS.items()}
_VALUE_TYPES = {int(value_type): value_type for value_type in GGUFValueType}
_MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, smallest value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # name length, n_dims, one dimension, type, offset
# Tensor types whose data gguf-py shows as typed elements; the others are shown as bytes.
_ELEMENT_TYPES = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
                  GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8,
                  GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
                  GGMLQuantizationType.I64: np.int64}


@dataclass(frozen=True)
class TensorSpan:
    """Where one tensor's bytes lie, relative to the start of the data section."""

    name: str
    dims: tuple[int, ...]  # GGUF order: innermost first
    offset: int
    nbytes: int


@dataclass(frozen=True, eq=False)
class _DataSection:
    """The memory map of a file and the byte where its data section starts."""

    buffer: mmap.mmap
    start: int
    byte_order: str  # "<" or ">"


@dataclass(frozen=True, eq=False)
class GGUFTensor(TensorSpan):
    """A tensor of a `GGUFFile`: its span, its GGML type and a view of its bytes."""

    tensor_type: GGMLQuantizationType
    section: _DataSection = field(repr=False)

    @property
    def n_elements(self) -> int:
        elements = 1
        for dim in self.dims:
            elements *= dim
        return elements

    @property
    def data(self) -> np.ndarray:
        """A read-only view of the tensor in the file, shaped as gguf-py's `ReaderTensor.data`:
        elements [outermost, ..., innermost] for float and integer types, bytes with the last
        dimension counted in bytes for block-quantized types."""
        shape = self.dims[::-1]
        dtype = _ELEMENT_TYPES.get(self.tensor_type)
        if dtype is None:
            block_size, type_size = GGML_QUANT_SIZES[self.tensor_type]
            dtype, shape = np.dtype(np.uint8), (*shape[:-1], shape[-1] // block_size * type_size)
        else:
            dtype = np.dtype(dtype).newbyteorder(self.section.byte_order)
        count = self.nbytes // dtype.itemsize
        if count == 0:
            return np.empty(shape, dtype)
        return np.frombuffer(self.section.buffer, dtype, count, self.section.start + self.offset).reshape(shape)

    def release(self) -> None:
        """Unmap the pages of this tensor's bytes from the process (they stay in the OS's page
        cache, and are read again if the data is used again), so that a file whose tensors have
        been converted does not stay resident next to the weights made from it."""
        if self.nbytes and hasattr(mmap, "MADV_DONTNEED"):
            start = self.section.start + self.offset
            page_start = start // mmap.PAGESIZE * mmap.PAGESIZE
            self.section.buffer.madvise(mmap.MADV_DONTNEED, page_start, start + self.nbytes - page_start)


@dataclass(eq=False)
class GGUFFile:
    """A GGUF file read by `read_gguf`: metadata (plain Python values, with gguf-py's names
    `GGUF.version`, `GGUF.tensor_count` and `GGUF.kv_count` for the header's numbers), each key's
    value type (and item type for arrays), the tensors in file order, and where the data starts.
    The tensors hold the file's memory map, not this object, so the metadata can go once read."""

    path: Path
    byte_order: str  # "<" or ">"
    metadata: dict[str, object] = field(default_factory=dict)
    value_types: dict[str, tuple[GGUFValueType, GGUFValueType | None]] = field(default_factory=dict)
    tensors: list[GGUFTensor] = field(default_factory=list)
    alignment: int = GGUF_DEFAULT_ALIGNMENT
    data_offset: int = 0

    @property
    def spans(self) -> list[TensorSpan]:
        return [TensorSpan(t.name, t.dims, t.offset, t.nbytes) for t in self.tensors]


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

    def string(self, what: str) -> str:
        """A string value; bytes that are not UTF-8 become U+FFFD (a few converters wrote token
        strings that split a multibyte character)."""
        start = self.skip_string(what)
        return self.data[start:self.pos].decode("utf-8", "replace")

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
            return _VALUE_TYPES[raw]
        except KeyError:
            raise self.fail(f"{what}: unknown value type {raw}") from None

    def value(self, value_type: GGUFValueType, what: str) -> tuple[object, GGUFValueType | None]:
        """A metadata value of type `value_type`, and its item type if it is an array."""
        if value_type == GGUFValueType.STRING:
            return self.string(what), None
        if value_type != GGUFValueType.ARRAY:
            fmt, _ = _SCALARS[value_type]
            return self.unpack(fmt, what), None
        item_type = self.value_type(f"the items of {what}")
        if item_type == GGUFValueType.ARRAY:
            raise self.fail(f"{what} is an array of arrays (llama.cpp refuses those too)")
        if item_type == GGUFValueType.STRING:
            length = self.count(f"the length of array {what}", 8)  # a string takes at least its 8-byte length
            return self.strings(length, what), item_type
        _, dtype = _SCALARS[item_type]
        item_size = _SCALAR_SIZES[item_type]
        length = self.count(f"the length of array {what}", item_size)
        items = np.frombuffer(self.data, np.dtype(dtype).newbyteorder(self.order), length, self.pos).tolist() \
            if length else []
        self.pos += length * item_size
        return items, item_type

    def strings(self, length: int, what: str) -> list[str]:
        """`length` strings in one pass over their bytes (each one's 8-byte length, then its bytes)."""
        data, pos, size = self.data, self.pos, self.size
        unpack = struct.Struct(self.order + "Q").unpack_from
        items = [""] * length
        for index in range(length):
            if size - pos < 8:
                self.pos = pos
                self.need(8, f"the length of a string of {what}")
            (count,) = unpack(data, pos)
            pos += 8
            if count > size - pos:
                self.pos = pos
                self.need(count, f"a string of {what}")
            items[index] = data[pos:pos + count].decode("utf-8", "replace")
            pos += count
        self.pos = pos
        return items


def read_gguf(path: Path) -> GGUFFile:
    """Read the header, metadata and tensor infos of the GGUF file at `path`, checking its layout;
    a `ModelLoadError` naming the first bad value."""
    path = Path(path)
    with open(path, "rb") as f:
        try:
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # an empty file cannot be mapped
            raise ModelLoadError(path, "truncated GGUF file (it is empty)") from None
    return _scan(_Header(data, path))


def check_gguf_layout(path: Path) -> list[TensorSpan]:
    """Check the header and tensor layout of the GGUF file at `path`; its tensors' spans in the
    data section, or a `ModelLoadError` naming the first bad value."""
    return read_gguf(path).spans


def _scan(header: _Header) -> GGUFFile:
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
    gguf = GGUFFile(header.path, header.order)
    meta, types = gguf.metadata, gguf.value_types
    for key, value, value_type in (("GGUF.version", version, GGUFValueType.UINT32),  # the names gguf-py gives these
                                   ("GGUF.tensor_count", tensor_count, GGUFValueType.UINT64),
                                   ("GGUF.kv_count", kv_count, GGUFValueType.UINT64)):
        meta[key], types[key] = value, (value_type, None)
    for _ in range(kv_count):
        key = header.name("a metadata key")
        if key in meta:
            raise header.fail(f"duplicate metadata key {key!r}")
        value_type = header.value_type(f"metadata {key!r}")
        if key == "general.alignment":
            alignment = header.unpack("I", key) if value_type == GGUFValueType.UINT32 else 0
            if alignment == 0 or alignment & (alignment - 1):
                raise header.fail(f"general.alignment must be a power of two stored as UINT32, got "
                                  f"{alignment if value_type == GGUFValueType.UINT32 else value_type.name}")
            gguf.alignment, meta[key], types[key] = alignment, alignment, (value_type, None)
            continue
        value, item_type = header.value(value_type, f"metadata {key!r}")
        meta[key], types[key] = value, (value_type, item_type)
    if tensor_count * _MIN_TENSOR_INFO_BYTES > header.size - header.pos:
        raise header.fail(f"the tensor count is {tensor_count}, more than the {header.size - header.pos} bytes "
                          f"left in the file can hold (a truncated or corrupt file)")
    infos = [_tensor_info(header) for _ in range(tensor_count)]
    names = set()
    for name, *_ in infos:
        if name in names:
            raise header.fail(f"duplicate tensor name {name!r}")
        names.add(name)
    gguf.data_offset = -(-header.pos // gguf.alignment) * gguf.alignment
    gguf.tensors = _check_spans(header, infos, gguf)
    return gguf


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


def _check_spans(header: _Header, infos, gguf: GGUFFile) -> list[GGUFTensor]:
    data_start, alignment = gguf.data_offset, gguf.alignment
    data_size = max(header.size - data_start, 0)
    section = _DataSection(header.data, data_start, header.order)
    tensors = []
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
        tensors.append(GGUFTensor(name, dims, offset, nbytes, tensor_type, section))
    previous = None
    for span in sorted((t for t in tensors if t.nbytes), key=lambda t: t.offset):
        if previous is not None and span.offset < previous.offset + previous.nbytes:
            raise header.fail(f"tensors {previous.name!r} (data bytes {previous.offset}-"
                              f"{previous.offset + previous.nbytes}) and {span.name!r} (from byte {span.offset}) "
                              f"overlap")
        previous = span
    return tensors
