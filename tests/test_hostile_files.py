"""Hostile checkpoints: files whose metadata is consistent in itself but absurd, or whose layout
lies (offsets outside the file, misaligned or shared, counts larger than the file), are refused
with a `ModelLoadError` naming the file and the bad value before anything large is allocated; and
a bounded fuzz run over mutations of the small valid files in tests/fuzz_seeds/ gets nothing but
lmserve's own errors out of the loaders, within a memory bound.

The tiny files are written here (GGUF with gguf-py's GGUFWriter, safetensors with the safetensors
package) from random weights of a 2-layer Llama; `write_seeds()` rewrites tests/fuzz_seeds/.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import struct
import tempfile
import time
import tracemalloc
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf.quants import quantize
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmserve.entrypoints.cli import main
from lmserve.errors import LmserveError, ModelLoadError
from lmserve.loader import open_checkpoint

Q = gguf.GGMLQuantizationType
SEEDS = Path(__file__).parent / "fuzz_seeds"
VOCAB, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, LAYERS = 48, 32, 2, 1, 16, 64, 2
# Reading a ~10 KB checkpoint may allocate this much (tokenizer, dequantized tensors) and no more.
MEMORY_BOUND = 64 * 2**20


def _tiny_weights() -> dict[str, np.ndarray]:
    """Hugging Face names -> fp32 arrays of the tiny Llama."""
    rng = np.random.default_rng(0)

    def w(*shape):
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    weights = {"model.embed_tokens.weight": w(VOCAB, HIDDEN), "model.norm.weight": 1 + w(HIDDEN)}
    for i in range(LAYERS):
        prefix = f"model.layers.{i}"
        weights |= {f"{prefix}.input_layernorm.weight": 1 + w(HIDDEN),
                    f"{prefix}.self_attn.q_proj.weight": w(HEADS * HEAD_DIM, HIDDEN),
                    f"{prefix}.self_attn.k_proj.weight": w(KV_HEADS * HEAD_DIM, HIDDEN),
                    f"{prefix}.self_attn.v_proj.weight": w(KV_HEADS * HEAD_DIM, HIDDEN),
                    f"{prefix}.self_attn.o_proj.weight": w(HIDDEN, HEADS * HEAD_DIM),
                    f"{prefix}.post_attention_layernorm.weight": 1 + w(HIDDEN),
                    f"{prefix}.mlp.gate_proj.weight": w(FFN, HIDDEN), f"{prefix}.mlp.up_proj.weight": w(FFN, HIDDEN),
                    f"{prefix}.mlp.down_proj.weight": w(HIDDEN, FFN)}
    return weights


_GGUF_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "input_layernorm": "attn_norm",
               "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def _gguf_name(hf_name: str) -> str:
    base = hf_name.removesuffix(".weight")
    if base in _GGUF_NAMES:
        return f"{_GGUF_NAMES[base]}.weight"
    _, _, layer, module = base.split(".", 3)
    return f"blk.{layer}.{_GGUF_NAMES[module]}.weight"


def write_tiny_gguf(path: Path, **meta) -> Path:
    """A valid 2-layer Llama GGUF (Q8_0 embedding, Q4_0 projections, F32 norms); `meta` overrides
    block_count, embedding_length, vocab_size, head_count, feed_forward_length or the bos / eos /
    padding token ids written in the metadata (the tensors stay those of the tiny model)."""
    meta = {"block_count": LAYERS, "embedding_length": HIDDEN, "vocab_size": VOCAB, "head_count": HEADS,
            "feed_forward_length": FFN, "bos": 0, "eos": 1, "padding": 1, **meta}
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(meta["block_count"])
    writer.add_context_length(64)
    writer.add_embedding_length(meta["embedding_length"])
    writer.add_feed_forward_length(meta["feed_forward_length"])
    writer.add_head_count(meta["head_count"])
    writer.add_head_count_kv(KV_HEADS)
    writer.add_key_length(HEAD_DIM)
    writer.add_value_length(HEAD_DIM)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(meta["vocab_size"])
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([chr(0x100 + i) for i in range(VOCAB - 1)] + ["\u0100\u0101"])
    writer.add_token_types([1] * VOCAB)
    writer.add_token_merges(["\u0100 \u0101"])
    writer.add_bos_token_id(meta["bos"])
    writer.add_eos_token_id(meta["eos"])
    writer.add_pad_token_id(meta["padding"])
    for name, array in _tiny_weights().items():
        qtype = Q.F32 if array.ndim == 1 else Q.Q8_0 if "embed" in name else Q.Q4_0
        stored = array if qtype == Q.F32 else quantize(array, qtype)
        writer.add_tensor(_gguf_name(name), stored, raw_dtype=None if qtype == Q.F32 else qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_tiny_hf(directory: Path, **config) -> Path:
    """The same model as a Hugging Face directory (config.json + model.safetensors); `config`
    overrides config.json entries."""
    from safetensors.numpy import save_file

    directory.mkdir(parents=True, exist_ok=True)
    base = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB,
            "hidden_size": HIDDEN, "intermediate_size": FFN, "num_hidden_layers": LAYERS,
            "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "max_position_embeddings": 64,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "bos_token_id": 0, "eos_token_id": 1}
    (directory / "config.json").write_text(json.dumps({**base, **config}))
    save_file(_tiny_weights(), str(directory / "model.safetensors"))
    return directory


def write_seeds() -> None:
    """Rewrite the fuzz corpus in tests/fuzz_seeds/."""
    SEEDS.mkdir(exist_ok=True)
    write_tiny_gguf(SEEDS / "tiny_llama.gguf")
    write_tiny_hf(SEEDS / "tiny_llama_hf")


# ---- patching helpers --------------------------------------------------------------------------

def _patch_gguf(path: Path, edit) -> None:
    """Edit a GGUF file in place through the `gguf` reader's writable memory map."""
    reader = gguf.GGUFReader(str(path), "r+")
    edit(reader)
    reader.data.flush()
    del reader


def _set_tensor_offset(reader, name: str, offset: int) -> None:
    tensor = next(t for t in reader.tensors if t.name == name)
    tensor.field.parts[5][0] = offset  # [name length, name, n_dims, dims, type, offset]


def _tensor_offset(reader, name: str) -> int:
    return int(next(t for t in reader.tensors if t.name == name).field.parts[5][0])


def _field_position(reader, key: str, part: int) -> int:
    """Byte position in the file of part `part` of metadata field `key`."""
    field = reader.fields[key]
    return field.offset + sum(int(p.nbytes) for p in field.parts[:part])


def _patch_safetensors_header(file: Path, edit) -> None:
    raw = file.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + length])
    edit(header)
    text = json.dumps(header).encode()
    file.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + length:])


def _refused(path, *fragments: str) -> str:
    """Open `path`; it must be refused quickly with a message naming it and holding `fragments`."""
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as err:
        open_checkpoint(str(path))
    message = str(err.value)
    assert str(path) in message or Path(err.value.path).parent == Path(path), message
    for fragment in fragments:
        assert fragment in message, message
    assert time.perf_counter() - start < 10
    return message


@pytest.fixture
def tiny_gguf(tmp_path):
    return write_tiny_gguf(tmp_path / "tiny.gguf")


@pytest.fixture
def tiny_hf(tmp_path):
    return write_tiny_hf(tmp_path / "tiny_hf")


# ---- valid files still load -------------------------------------------------------------------

@pytest.mark.parametrize("path", ["written", SEEDS / "tiny_llama.gguf", SEEDS / "tiny_llama_hf"])
def test_tiny_files_load(path, tiny_gguf, tiny_hf):
    paths = [tiny_gguf, tiny_hf] if path == "written" else [path]
    for path in paths:
        checkpoint = open_checkpoint(str(path))
        assert checkpoint.config.num_layers == LAYERS and checkpoint.config.vocab_size == VOCAB
        assert sum(1 for _ in checkpoint.tensors()) == len(_tiny_weights())


# ---- GGUF: consistent but absurd metadata ------------------------------------------------------

def test_gguf_billion_layers_refused_by_info_and_load(tmp_path, capsys):
    path = write_tiny_gguf(tmp_path / "layers.gguf", block_count=10**9)
    _refused(path, "llama.block_count is 1000000000", "only 2 layer(s) have tensors", "blk.2.*")
    assert main(["info", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "block_count is 1000000000" in err and "Traceback" not in err


def test_gguf_layer_missing_or_extra(tmp_path):
    _refused(write_tiny_gguf(tmp_path / "more.gguf", block_count=3), "llama.block_count is 3", "blk.2.*")
    _refused(write_tiny_gguf(tmp_path / "fewer.gguf", block_count=1), "llama.block_count is 1",
             "tensor 'blk.1.", "belongs to layer 1")


@pytest.mark.parametrize("meta, fragments", [
    ({"embedding_length": 10**6}, ["tensor 'token_embd.weight' has shape [48, 32]", "hidden_size 1000000"]),
    ({"vocab_size": 10**9}, ["tensor 'token_embd.weight' has shape [48, 32]", "vocab_size 1000000000"]),
    ({"head_count": 64}, ["tensor 'blk.0.attn_q.weight' has shape [32, 32]", "num_heads 64 x head_dim 16"]),
    ({"feed_forward_length": 10**7}, ["tensor 'blk.0.ffn_gate.weight' has shape [64, 32]",
                                      "intermediate_size 10000000"]),
])
def test_gguf_sizes_that_disagree_with_the_tensors(tmp_path, meta, fragments):
    _refused(write_tiny_gguf(tmp_path / "sizes.gguf", **meta), *fragments)


@pytest.mark.parametrize("token", ["bos", "eos", "padding"])
def test_gguf_special_token_outside_vocabulary(tmp_path, token):
    path = write_tiny_gguf(tmp_path / "token.gguf", **{token: 10**9})
    _refused(path, f"tokenizer.ggml.{token}_token_id is 1000000000", "outside the vocabulary of 48 tokens")


def test_gguf_metadata_of_the_wrong_kind(tiny_gguf):
    # block_count's value type UINT32 -> FLOAT32: same bytes, now a float
    _patch_gguf(tiny_gguf, lambda r: r.fields["llama.block_count"].parts[2].__setitem__(0, gguf.GGUFValueType.FLOAT32))
    _refused(tiny_gguf, "'llama.block_count' must be a positive integer")


# ---- GGUF: layout ------------------------------------------------------------------------------

def test_gguf_offset_that_wraps(tiny_gguf):
    _patch_gguf(tiny_gguf, lambda r: _set_tensor_offset(r, "blk.1.ffn_down.weight", 2**64 - 32))
    _refused(tiny_gguf, "tensor 'blk.1.ffn_down.weight'", f"data offset {2**64 - 32}", "outside the data section")


def test_gguf_offset_shifted_by_one_byte(tiny_gguf):
    _patch_gguf(tiny_gguf, lambda r: _set_tensor_offset(
        r, "blk.0.attn_q.weight", _tensor_offset(r, "blk.0.attn_q.weight") + 1))
    _refused(tiny_gguf, "tensor 'blk.0.attn_q.weight' has data offset", "not a multiple of the alignment 32")


def test_gguf_tensors_sharing_an_offset(tiny_gguf):
    _patch_gguf(tiny_gguf, lambda r: _set_tensor_offset(
        r, "blk.0.attn_v.weight", _tensor_offset(r, "blk.0.attn_k.weight")))
    _refused(tiny_gguf, "tensors 'blk.0.attn_k.weight'", "'blk.0.attn_v.weight'", "overlap")


def test_gguf_array_length_beyond_the_file(tiny_gguf):
    # The gguf package would loop over 2**60 phantom items of the token-type array.
    reader = gguf.GGUFReader(str(tiny_gguf))
    position = _field_position(reader, "tokenizer.ggml.token_type", 4)  # [key len, key, type, item type, length]
    del reader
    with open(tiny_gguf, "r+b") as f:
        f.seek(position)
        f.write(struct.pack("<Q", 2**60))
    _refused(tiny_gguf, "the length of array metadata 'tokenizer.ggml.token_type' is 1152921504606846976",
             "bytes left in the file")


def test_gguf_tensor_count_beyond_the_file(tiny_gguf):
    with open(tiny_gguf, "r+b") as f:
        f.seek(8)
        f.write(struct.pack("<Q", 2**40))
    _refused(tiny_gguf, "the tensor count is 1099511627776")


def test_gguf_duplicate_tensor_name(tiny_gguf):
    data = tiny_gguf.read_bytes().replace(b"blk.0.attn_v.weight", b"blk.0.attn_k.weight", 1)
    tiny_gguf.write_bytes(data)
    _refused(tiny_gguf, "duplicate tensor name 'blk.0.attn_k.weight'")


def test_gguf_truncated_header(tiny_gguf):
    tiny_gguf.write_bytes(tiny_gguf.read_bytes()[:300])
    _refused(tiny_gguf, "truncated GGUF header")


# ---- safetensors -------------------------------------------------------------------------------

def test_safetensors_offsets_beyond_the_file(tiny_hf):
    def edit(header):
        entry = header["model.layers.1.mlp.down_proj.weight"]
        begin, end = entry["data_offsets"]
        entry["data_offsets"] = [2**64 - 32 + begin - end, 2**64 - 32]
    _patch_safetensors_header(tiny_hf / "model.safetensors", edit)
    _refused(tiny_hf, "model.safetensors", "tensor 'model.layers.1.mlp.down_proj.weight' has data_offsets",
             "beyond the")


def test_safetensors_tensors_sharing_bytes(tiny_hf):
    def edit(header):
        header["model.layers.0.self_attn.v_proj.weight"]["data_offsets"] = \
            header["model.layers.0.self_attn.k_proj.weight"]["data_offsets"]
    _patch_safetensors_header(tiny_hf / "model.safetensors", edit)
    _refused(tiny_hf, "model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.v_proj.weight", "overlap")


def test_safetensors_shape_and_byte_count_disagree(tiny_hf):
    _patch_safetensors_header(tiny_hf / "model.safetensors",
                              lambda header: header["model.norm.weight"].update(shape=[10**6]))
    _refused(tiny_hf, "tensor 'model.norm.weight': F32 [1000000] takes 4000000 bytes", "span 128")


def test_safetensors_unknown_dtype_and_duplicate_key(tiny_hf):
    file = tiny_hf / "model.safetensors"
    _patch_safetensors_header(file, lambda header: header["model.norm.weight"].update(dtype="Q4"))
    _refused(tiny_hf, "tensor 'model.norm.weight' has unknown dtype 'Q4'")
    raw = file.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    text = raw[8:8 + length].replace(b'"dtype": "Q4"', b'"dtype": "F32", "dtype": "F32"')
    file.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + length:])
    _refused(tiny_hf, "not valid JSON", "duplicate key 'dtype'")


def test_safetensors_header_length_beyond_the_file(tiny_hf):
    file = tiny_hf / "model.safetensors"
    file.write_bytes((2**62).to_bytes(8, "little") + file.read_bytes()[8:])
    _refused(tiny_hf, "header length 4611686018427387904")


@pytest.mark.parametrize("config, fragments", [
    ({"num_hidden_layers": 10**9}, ["num_hidden_layers is 1000000000", "model.layers.2.*"]),
    ({"num_hidden_layers": 1}, ["num_hidden_layers is 1", "belongs to layer 1"]),
    ({"hidden_size": 10**6, "head_dim": HEAD_DIM}, ["'model.embed_tokens.weight' has shape [48, 32]",
                                                    "hidden_size 1000000"]),
    ({"intermediate_size": 10**7}, ["'model.layers.0.mlp.", "intermediate_size 10000000"]),
    ({"eos_token_id": 10**9}, ["eos_token_id is 1000000000, outside the vocabulary of 48 tokens"]),
    ({"eos_token_id": [1, 10**9]}, ["eos_token_id[1] is 1000000000"]),
    ({"pad_token_id": 48}, ["pad_token_id is 48"]),
    ({"num_attention_heads": "many"}, ["num_attention_heads must be a positive integer, got 'many'"]),
])
def test_hf_config_that_disagrees_with_the_tensors(tmp_path, config, fragments):
    _refused(write_tiny_hf(tmp_path / "hf", **config), *fragments)


# ---- bounded fuzzing (benchmarks/fuzz_loaders.py runs the same strategies longer) -------------

_WORDS = [0, 1, 2, 31, 32, 2**31, 2**32 - 1, 2**63, 2**64 - 1, 2**64 - 32]
_JSON_VALUES = [-1, 0, 1, 2**31, 2**63, 2**64, 10**30, 1.5, "F32", "X", None, [], [0], [0, 0, 0], {}]


@functools.cache
def _gguf_seed() -> tuple[bytes, int, list[tuple[int, int]]]:
    """The GGUF seed, where its data section starts, and (position, size) of every number in its
    header: metadata values and lengths, value types, tensor dimensions, types and offsets."""
    path = SEEDS / "tiny_llama.gguf"
    reader = gguf.GGUFReader(path)
    numbers = []
    for field in [*reader.fields.values(), *(tensor.field for tensor in reader.tensors)]:
        position = field.offset
        for part in field.parts:
            if part.size == 1:
                numbers.append((position, int(part.nbytes)))
            position += int(part.nbytes)
    return path.read_bytes(), reader.data_offset, numbers


def _mutate(draw, data: bytearray, header_end: int, start: int = 0) -> None:
    """One truncation, bit flip or overwritten byte or word at or after byte `start`, in the
    header half of the time."""
    if len(data) <= start:
        return
    where = draw(st.integers(start, max(start, min(header_end, len(data)) - 1)) if draw(st.booleans())
                 else st.integers(start, len(data) - 1))
    kind = draw(st.sampled_from(["flip", "byte", "word", "truncate"]))
    if kind == "flip":
        data[where] ^= 1 << draw(st.integers(0, 7))
    elif kind == "byte":
        data[where] = draw(st.integers(0, 255))
    elif kind == "word":
        size = draw(st.sampled_from([4, 8]))
        word = draw(st.sampled_from(_WORDS) | st.integers(0, 2**64 - 1))
        data[where:where + size] = (word % 2**(8 * size)).to_bytes(size, "little")
    else:
        del data[where:]


@st.composite
def gguf_mutants(draw) -> bytes:
    """The GGUF seed with 1-3 mutations; most set a number of the header (a count, a length, a
    metadata value, a dimension, an offset) to an edge value, a neighbour or a random one."""
    seed, header_end, numbers = _gguf_seed()
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 3))):
        if not data:
            break
        if draw(st.integers(0, 2)):
            position, size = draw(st.sampled_from(numbers))
            old = int.from_bytes(data[position:position + size], "little")
            value = draw(st.sampled_from(_WORDS) | st.integers(0, 2**64 - 1) | st.sampled_from([old - 1, old + 1]))
            data[position:position + size] = (value % 2**(8 * size)).to_bytes(size, "little")
        else:
            _mutate(draw, data, header_end, start=8)  # past the magic and version, which are checked first
    return bytes(data)


@st.composite
def safetensors_mutants(draw) -> bytes:
    """The safetensors seed with one entry of its JSON header edited (a field dropped, set to an odd
    value or taken from another tensor), or with 1-3 byte-level mutations."""
    data = bytearray((SEEDS / "tiny_llama_hf" / "model.safetensors").read_bytes())
    length = int.from_bytes(data[:8], "little")
    if draw(st.booleans()):
        header = json.loads(data[8:8 + length])
        names = sorted(name for name in header if name != "__metadata__")
        entry, field = header[draw(st.sampled_from(names))], draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        action = draw(st.sampled_from(["drop", "copy", "value"]))
        if action == "drop":
            del entry[field]
        elif action == "copy":
            entry[field] = header[draw(st.sampled_from(names))][field]
        else:
            entry[field] = draw(st.lists(st.sampled_from(_JSON_VALUES), max_size=3) if field != "dtype"
                                else st.sampled_from(_JSON_VALUES))
        text = json.dumps(header).encode()
        return len(text).to_bytes(8, "little") + text + bytes(data[8 + length:])
    for _ in range(draw(st.integers(1, 3))):
        if data:
            _mutate(draw, data, 8 + length)
    return bytes(data)


def load_everything(path: Path) -> str:
    """Open a checkpoint and read all its tensors, packed and dequantized. lmserve's own errors
    are the only way out and the Python heap may not grow past MEMORY_BOUND; how it ended:
    'loaded' or the refusal's message with names and numbers blanked (to group refusals)."""
    tracemalloc.start()
    try:
        checkpoint = open_checkpoint(str(path))
        for _ in checkpoint.tensors(keep_packed=True):
            pass
        for _ in checkpoint.tensors():
            pass
        outcome = "loaded"
    except LmserveError as exc:
        outcome = re.sub(r"'[^']*'|\d+", "#", exc.problem if isinstance(exc, ModelLoadError) else str(exc))
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < MEMORY_BOUND, f"reading a {path.stat().st_size}-byte file allocated {peak} bytes"
    return outcome


_FUZZ = settings(max_examples=400, deadline=None, database=None, derandomize=True,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# Dequantizing mutated tensor data makes NaNs; that is no failure.
_NAN_WARNINGS = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


@pytest.fixture(scope="module")
def fuzz_dir():
    """A scratch directory holding a copy of the safetensors seed directory."""
    with tempfile.TemporaryDirectory() as directory:
        directory = Path(directory)
        shutil.copytree(SEEDS / "tiny_llama_hf", directory / "hf")
        yield directory


@_NAN_WARNINGS
@_FUZZ
@given(mutant=gguf_mutants())
def test_fuzz_gguf(fuzz_dir, mutant):
    (fuzz_dir / "fuzz.gguf").write_bytes(mutant)
    load_everything(fuzz_dir / "fuzz.gguf")


@_FUZZ
@given(mutant=safetensors_mutants())
def test_fuzz_safetensors(fuzz_dir, mutant):
    (fuzz_dir / "hf" / "model.safetensors").write_bytes(mutant)
    load_everything(fuzz_dir / "hf")
