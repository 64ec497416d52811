"""Bad files and bad parameters end with one clear message naming the problem."""

import json
import shutil

import numpy as np
import pytest

from lmserve import LLM
from lmserve.config import EngineConfig
from lmserve.entrypoints.cli import main
from lmserve.errors import InvalidParameterError, ModelLoadError


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(ModelLoadError, match="no such file") as err:
        LLM(str(missing))
    assert str(missing) in str(err.value)


def test_truncated_gguf(tmp_path, smollm2_path):
    truncated = tmp_path / "truncated.gguf"
    with open(smollm2_path, "rb") as src:
        truncated.write_bytes(src.read(2_000_000))
    with pytest.raises(ModelLoadError) as err:
        LLM(str(truncated))
    assert str(truncated) in str(err.value) and "truncated" in str(err.value)


def test_not_a_model_file(tmp_path):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"hello world" * 10)
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        LLM(str(junk))


def _write_gguf(path, arch="llama", tensor_type=None):
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_embedding_length(32)
    writer.add_feed_forward_length(64)
    writer.add_head_count(4)
    writer.add_context_length(64)
    if tensor_type is None:
        writer.add_tensor("token_embd.weight", np.zeros((16, 32), dtype=np.float32))
    else:
        _, block_bytes = gguf.GGML_QUANT_SIZES[tensor_type]
        writer.add_tensor("token_embd.weight", np.zeros((16, block_bytes), dtype=np.uint8), raw_dtype=tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_unknown_architecture_gguf(tmp_path):
    path = tmp_path / "arch.gguf"
    _write_gguf(path, arch="mamba9000")
    with pytest.raises(ModelLoadError, match="unsupported architecture 'mamba9000'") as err:
        LLM(str(path))
    assert "llama" in str(err.value)


def test_unknown_tensor_type_gguf(tmp_path):
    import gguf

    path = tmp_path / "iq.gguf"
    _write_gguf(path, tensor_type=gguf.GGMLQuantizationType.IQ2_XXS)
    with pytest.raises(ModelLoadError, match="unsupported tensor type.*IQ2_XXS"):
        LLM(str(path))


def test_unknown_architecture_hf(tmp_path, tiny_model_factory):
    directory, _ = tiny_model_factory("llama_gqa")
    bad = tmp_path / "bad"
    shutil.copytree(directory, bad)
    config = json.loads((bad / "config.json").read_text())
    config["architectures"] = ["FancyNewForCausalLM"]
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="unsupported architecture.*FancyNewForCausalLM"):
        LLM(str(bad))


def test_corrupt_safetensors(tmp_path, tiny_model_factory):
    directory, _ = tiny_model_factory("llama_gqa")
    bad = tmp_path / "corrupt"
    shutil.copytree(directory, bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(ModelLoadError) as err:
        LLM(str(bad))
    assert "model.safetensors" in str(err.value) and "corrupt" in str(err.value)


def test_missing_config_json(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="config.json: file not found"):
        LLM(str(tmp_path))


@pytest.mark.parametrize("kwargs, field", [
    ({"block_size": 0}, "block_size"), ({"dtype": "int3"}, "dtype"), ({"kv_cache_memory": "lots"}, "kv_cache_memory"),
    ({"num_kv_blocks": -2}, "num_kv_blocks"), ({"device": "tpu:9"}, "device"), ({"max_num_seqs": 0}, "max_num_seqs"),
])
def test_bad_engine_config(kwargs, field):
    with pytest.raises(InvalidParameterError) as err:
        EngineConfig(**kwargs)
    assert str(err.value).startswith(field)


def test_cli_reports_bad_value_without_traceback(capsys):
    assert main(["generate", "hi", "--temperature", "-1", "--max-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: temperature") and "Traceback" not in err


def test_cli_reports_missing_model(capsys, tmp_path):
    assert main(["info", str(tmp_path / "missing.gguf")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_cli_info_describes_default_model(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "llama" in out and "Q4_1" in out and "8192" in out and "KV cache bytes/token" in out
