"""Our GGUF reader (`lmserve.loader.gguf_layout.read_gguf`) against gguf-py's `GGUFReader`, the
reference: the same metadata (keys in file order, values and their Python types, value types),
the same tensor infos (names, types, dimensions, element and byte counts, data offsets) and the
same tensor data views, for both embedded models and for GGUF files written the way the tests
write them (tiny Llama / Qwen / MoE checkpoints in every tensor type the loader tests use, a
`lmserve quantize` output, metadata of every value type, big-endian files, strings that are not
UTF-8)."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest

from lmserve.default_model import resolve_embedded
from lmserve.loader.gguf_layout import read_gguf
from lmserve.loader.gguf_metadata import read_gguf_metadata
from tests.test_bad_input import _write_gguf as write_bad_input_gguf
from tests.test_gguf_loader import write_gguf
from tests.test_hostile_files import SEEDS, write_tiny_gguf
from tests.tiny_models import build_tiny_model

Q = gguf.GGMLQuantizationType
V = gguf.GGUFValueType


def _same_value(ours, theirs) -> bool:
    """Equal with the same Python types (NaN equal to NaN), lists item by item."""
    if isinstance(theirs, list):
        return isinstance(ours, list) and len(ours) == len(theirs) and all(map(_same_value, ours, theirs))
    if type(ours) is not type(theirs):
        return False
    if isinstance(theirs, float) and math.isnan(theirs):
        return math.isnan(ours)
    return ours == theirs


def assert_same_as_gguf_py(path: Path) -> None:
    ours = read_gguf(path)
    reference = gguf.GGUFReader(str(path))
    expected = read_gguf_metadata(reference)  # field.contents(), lossy where a string is not UTF-8
    assert list(ours.metadata) == list(expected)
    for key, value in expected.items():
        assert _same_value(ours.metadata[key], value), key
        types = reference.fields[key].types
        value_type, item_type = ours.value_types[key]
        assert value_type == types[0], key
        if value_type == V.ARRAY and len(types) > 1:  # gguf-py records no item type for an empty array
            assert item_type == types[-1], key
    assert (ours.alignment, ours.data_offset) == (reference.alignment, reference.data_offset)
    assert [t.name for t in ours.tensors] == [t.name for t in reference.tensors]
    for mine, theirs in zip(ours.tensors, reference.tensors):
        assert mine.tensor_type == theirs.tensor_type, mine.name
        assert mine.dims == tuple(theirs.shape.tolist()), mine.name
        assert (mine.n_elements, mine.nbytes) == (theirs.n_elements, theirs.n_bytes), mine.name
        assert ours.data_offset + mine.offset == theirs.data_offset, mine.name
        data = mine.data
        assert (data.shape, data.dtype) == (theirs.data.shape, theirs.data.dtype), mine.name
        assert np.array_equal(data.view(np.uint8), theirs.data.view(np.uint8)), mine.name


# ---- the embedded models ---------------------------------------------------------------------

def test_smollm2(smollm2_path):
    assert_same_as_gguf_py(Path(smollm2_path))


def test_gemma3():
    assert_same_as_gguf_py(Path(resolve_embedded("gemma3-270m")))


# ---- files the tests write -------------------------------------------------------------------

def test_tiny_llama_and_fuzz_seed(tmp_path):
    assert_same_as_gguf_py(write_tiny_gguf(tmp_path / "tiny.gguf"))
    assert_same_as_gguf_py(SEEDS / "tiny_llama.gguf")


@pytest.mark.parametrize("kind, arch, linear_type, per_expert", [
    ("llama_gqa", "llama", Q.F32, False), ("llama_gqa", "llama", Q.Q8_0, False),
    ("llama_mqa_tied", "llama", Q.Q4_0, False), ("qwen2", "qwen2", Q.Q4_1, False), ("qwen3", "qwen3", Q.F16, False),
    ("llama_gqa", "llama", Q.BF16, False), ("qwen2", "qwen2", Q.Q5_0, False), ("qwen2_moe", "qwen2moe", Q.Q8_0, False),
    ("mixtral", "llama", Q.Q8_0, True),
])
def test_loader_test_files(kind, arch, linear_type, per_expert, tmp_path):
    hf_model = build_tiny_model(kind, tmp_path / "hf")  # write_gguf changes its weights: not a shared one
    path = tmp_path / f"{kind}.gguf"
    write_gguf(hf_model, path, arch, linear_type, per_expert_names=per_expert)
    assert_same_as_gguf_py(path)


def test_quantize_output(tmp_path):
    from lmserve.quant.gguf_writer import quantize_model

    for type_name in ("q4_k", "q5_0", "f16"):
        out = tmp_path / f"{type_name}.gguf"
        quantize_model(str(SEEDS / "tiny_llama.gguf"), str(out), type_name)
        assert_same_as_gguf_py(out)


def test_unknown_tensor_type_file(tmp_path):
    path = tmp_path / "iq.gguf"
    write_bad_input_gguf(path, tensor_type=Q.IQ2_XXS)
    assert_same_as_gguf_py(path)


def _write_every_value_type(path: Path, endianess=gguf.GGUFEndian.LITTLE) -> Path:
    writer = gguf.GGUFWriter(str(path), "llama", endianess=endianess)
    scalars = {V.UINT8: 200, V.INT8: -100, V.UINT16: 60000, V.INT16: -30000, V.UINT32: 4_000_000_000,
               V.INT32: -2_000_000_000, V.UINT64: 2**64 - 1, V.INT64: -2**63, V.FLOAT32: 0.1,
               V.FLOAT64: 1e300, V.BOOL: True, V.STRING: "héllo 🙂"}
    for value_type, value in scalars.items():
        writer.add_key_value(f"t.{value_type.name.lower()}", value, value_type)
        if value_type != V.STRING:
            items = [value, type(value)(0), value] if value_type != V.BOOL else [True, False, True]
            writer.add_key_value(f"t.{value_type.name.lower()}s", items, V.ARRAY, sub_type=value_type)
    writer.add_key_value("t.nan", float("nan"), V.FLOAT32)
    writer.add_key_value("t.words", ["a", "", "ß", "🙂" * 40], V.ARRAY, sub_type=V.STRING)
    writer.add_uint32("general.alignment", 64)
    writer.add_tensor("norm.weight", np.arange(64, dtype=np.float32))
    writer.add_tensor("table.weight", np.arange(8 * 32, dtype=np.float16).reshape(8, 32))
    writer.add_tensor("ids.weight", np.arange(5, dtype=np.int32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("endianess", [gguf.GGUFEndian.LITTLE, gguf.GGUFEndian.BIG])
def test_every_value_type(tmp_path, endianess):
    path = _write_every_value_type(tmp_path / "types.gguf", endianess)
    assert_same_as_gguf_py(path)
    meta = read_gguf(path).metadata
    assert meta["t.uint64"] == 2**64 - 1 and meta["t.int64s"] == [-2**63, 0, -2**63]
    assert meta["t.bools"] == [True, False, True] and meta["t.words"][2] == "ß"
    assert np.array_equal(read_gguf(path).tensors[0].data, np.arange(64, dtype=np.float32))


def _raw_gguf(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A GGUF v3 file without tensors whose metadata entries are (key, value type, encoded value)."""
    out = b"GGUF" + struct.pack("<IQQ", 3, 0, len(entries))
    for key, value_type, value in entries:
        out += struct.pack("<Q", len(key)) + key.encode() + struct.pack("<I", value_type) + value
    return out


def _string(raw: bytes) -> bytes:
    return struct.pack("<Q", len(raw)) + raw


def test_strings_that_are_not_utf8_and_an_empty_array(tmp_path):
    path = tmp_path / "raw.gguf"
    tokens = [b"ok", b"\xff\xfe", "é".encode()[:1], b"", "日本".encode()]
    path.write_bytes(_raw_gguf([
        ("general.architecture", V.STRING, _string(b"llama")),
        ("t.bad", V.STRING, _string(b"caf\xc3")),
        ("t.tokens", V.ARRAY, struct.pack("<IQ", V.STRING, len(tokens)) + b"".join(map(_string, tokens))),
        ("t.empty", V.ARRAY, struct.pack("<IQ", V.UINT32, 0)),
    ]))
    assert_same_as_gguf_py(path)
    meta = read_gguf(path).metadata
    assert meta["t.tokens"] == ["ok", "\ufffd\ufffd", "\ufffd", "", "日本"] and meta["t.bad"] == "caf\ufffd"
    assert meta["t.empty"] == [] and read_gguf(path).value_types["t.empty"] == (V.ARRAY, V.UINT32)
