"""What the command line imports: `lmserve --help`, `lmserve <command> --help` and `lmserve info`
run without PyTorch (checked in a fresh interpreter), and `info` reports what the file says."""

import json
import math
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import gguf
import pytest
import torch

from lmserve.entrypoints.cli import COMMANDS
from lmserve.loader.safetensors import read_header
from lmserve.models import registry

_REPO = Path(__file__).resolve().parents[1]

# Runs the command line's main on argv (JSON), then fails if PyTorch was imported.
_RUN_WITHOUT_TORCH = """
import json, sys
from lmserve.entrypoints.cli import main
try:
    code = main(json.loads(sys.argv[1]))
except SystemExit as exc:  # --help
    code = exc.code
assert "torch" not in sys.modules, "PyTorch was imported"
sys.exit(code)
"""


def _run_without_torch(*argv: str) -> str:
    """Stdout of `lmserve argv...` run in a fresh interpreter that must not import PyTorch."""
    done = subprocess.run([sys.executable, "-c", _RUN_WITHOUT_TORCH, json.dumps(argv)], cwd=_REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _info(model: str) -> dict[str, str]:
    """`lmserve info model`, torch-free, as {field: value}."""
    lines = _run_without_torch("info", model).splitlines()
    return dict(re.split(r"\s{2,}", line, maxsplit=1) for line in lines)


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_does_not_import_torch(command):
    usage = _run_without_torch(*([command] if command else []), "--help")
    assert usage.startswith("usage: lmserve")


def test_info_of_a_gguf_file_does_not_import_torch_and_reports_its_metadata(smollm2_path):
    info = _info(str(smollm2_path))
    reader = gguf.GGUFReader(str(smollm2_path))
    arch = reader.fields["general.architecture"].contents()

    def meta(key):
        return reader.fields[f"{arch}.{key}"].contents()

    heads, kv_heads, layers = meta("attention.head_count"), meta("attention.head_count_kv"), meta("block_count")
    head_dim = meta("embedding_length") // heads
    kv_bytes = 2 * layers * kv_heads * head_dim
    types = Counter(tensor.tensor_type.name for tensor in reader.tensors)
    assert info["format"] == "gguf" and info["architecture"] == arch
    assert info["parameters"] == f"{sum(int(tensor.n_elements) for tensor in reader.tensors):,}"
    assert info["tensor types"] == ", ".join(f"{name} x{count}" for name, count in sorted(types.items()))
    assert info["layers"] == str(layers) and info["hidden size"] == str(meta("embedding_length"))
    assert info["heads (q / kv)"] == f"{heads} / {kv_heads}, head_dim {head_dim}"
    assert info["vocab size"] == str(len(reader.fields["tokenizer.ggml.tokens"].contents()))
    assert info["context length"] == str(meta("context_length"))
    assert info["rope"] == f"theta {meta('rope.freq_base'):g}, scaling none"
    assert info["KV cache bytes/token"] == f"{kv_bytes * 4:,} (float32), {kv_bytes * 2:,} (bfloat16)"
    assert info["chat template"] == ("yes" if "tokenizer.chat_template" in reader.fields else "no")


def test_info_of_a_hf_directory_does_not_import_torch_and_reports_its_config(tiny_model_factory):
    directory, _ = tiny_model_factory("mistral_sliding")
    info = _info(str(directory))
    config = json.loads((directory / "config.json").read_text())
    header = read_header(directory / "model.safetensors")
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    kv_bytes = 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim
    assert info["format"] == "safetensors" and info["architecture"] == "mistral"
    assert info["parameters"] == f"{sum(math.prod(shape) for _, shape in header.values()):,}"
    assert info["layers"] == str(config["num_hidden_layers"]) and info["vocab size"] == str(config["vocab_size"])
    assert info["heads (q / kv)"] == (f"{config['num_attention_heads']} / {config['num_key_value_heads']}, "
                                      f"head_dim {head_dim}")
    assert info["context length"] == str(config["max_position_embeddings"])
    assert info["sliding window"] == str(config["sliding_window"])
    assert info["KV cache bytes/token"] == f"{kv_bytes * 4:,} (float32), {kv_bytes * 2:,} (bfloat16)"


def test_info_lists_the_registry_families_whose_descriptors_name_their_model_classes(smollm2_path):
    families = registry.families()
    assert _info(str(smollm2_path))["supported architectures"] == ", ".join(f.architecture for f in families)
    for family in families:  # imported only here: the descriptors name them by path
        model_class = family.model_class
        assert issubclass(model_class, torch.nn.Module), family.architecture
        assert callable(model_class.compute_logits) and callable(model_class.attention_layers)
