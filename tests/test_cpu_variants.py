"""What depends on the CPU: PyTorch's int4 fallback under each of PyTorch's CPU builds that this
CPU can run (their packed layouts differ), the same perplexity with the native kernels turned
off, and the `-v` log naming the instruction set and kernels in use."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmserve.quant import native
from tests.tiny_tokenizer import SAMPLE_TEXT

ROOT = Path(__file__).resolve().parent.parent
# PyTorch's CPU builds (ATEN_CPU_CAPABILITY) and whether this CPU can run each.
BUILDS = {"default": lambda: True, "avx2": torch.cpu._is_avx2_supported, "avx512": torch.cpu._is_avx512_supported}

_RUN_UNDER_BUILD = """
import sys, pytest, torch
expected = sys.argv[1].upper() if sys.argv[1] != "default" else "DEFAULT"
got = torch.backends.cpu.get_cpu_capability()
if got != expected:
    sys.exit(f"PyTorch runs its {got} build, not {expected}")
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "tests/test_packed_weights.py",
                      "-k", "torch-int4 or fallback_dequantize"]))
"""


@pytest.mark.parametrize("build", list(BUILDS))
def test_int4_fallback_is_right_under_each_pytorch_cpu_build(build):
    """The fallback's matmul (PyTorch's kernel) and dense weight (ours) against gguf-py's values,
    rerun in a process where PyTorch uses the given CPU build."""
    if not BUILDS[build]():
        pytest.skip(f"this CPU lacks {build.upper()}: PyTorch's {build} int4 kernel cannot run here")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": build}
    result = subprocess.run([sys.executable, "-c", _RUN_UNDER_BUILD, build], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout


def _perplexity(model: Path, text: Path, out: Path, native_on: bool) -> tuple[float, str]:
    env = {**os.environ, native.DISABLE_ENV: "1" if native_on else "0"}
    result = subprocess.run([sys.executable, "-m", "lmserve.entrypoints.cli", "-v", "perplexity",
                             str(model), "--text", str(text), "--ctx", "128", "--json", str(out)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())["perplexity"], result.stderr


def test_perplexity_without_native_kernels_is_within_one_percent(smollm2_path, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(SAMPLE_TEXT * 2, encoding="utf-8")
    fallback, log = _perplexity(smollm2_path, text, tmp_path / "off.json", native_on=False)
    assert "native kernels off" in log and "Int4Weight" in log and "BlockWeight" not in log
    default, log = _perplexity(smollm2_path, text, tmp_path / "on.json", native_on=True)
    if native.load() is None:
        pytest.skip("the native kernels do not build here: both runs took the fallback")
    assert f"compiled for {native.TARGET_ISA}" in log and "BlockWeight" in log
    assert fallback == pytest.approx(default, rel=0.01)
