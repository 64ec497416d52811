"""The CPU KV cache costs resident memory only as its blocks are used: loading SmolLM2 with a
4 GiB cache grows the process by the weights and tokenizer only, none of the cache's pages are
resident before a request, and after one short request only the pages of its blocks are. Run in
a subprocess so the figures are the engine's alone."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from lmserve.engine.model_runner import zeros_on_demand

_PROBE = r"""
import json, mmap, sys

import numpy as np

from lmserve import LLM, SamplingParams  # imports PyTorch, before the first figure


def rss_kib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def resident_kib(tensors):
    # Pages of `tensors` that are resident: bit 63 of their /proc/self/pagemap entries.
    total = 0
    with open("/proc/self/pagemap", "rb") as f:
        for t in tensors:
            first = t.data_ptr() // mmap.PAGESIZE
            last = (t.data_ptr() + t.numel() * t.element_size() - 1) // mmap.PAGESIZE
            f.seek(first * 8)
            entries = np.frombuffer(f.read((last - first + 1) * 8), dtype=np.uint64)
            total += int(np.count_nonzero(entries >> np.uint64(63))) * mmap.PAGESIZE // 1024
    return total


start = rss_kib()
llm = LLM(sys.argv[1], kv_cache_memory=sys.argv[2])
caches = llm.engine.runner.kv_caches
loaded, idle = rss_kib(), resident_kib(caches)
output = llm.generate(["Hello there"], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))[0]
print(json.dumps({"cache_kib": sum(t.numel() * t.element_size() for t in caches) // 1024,
                  "load_growth_kib": loaded - start, "idle_kib": idle, "used_kib": resident_kib(caches),
                  "growth_kib": rss_kib() - start, "tokens": len(output.outputs[0].token_ids)}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/pagemap")
def test_kv_cache_memory_follows_use(smollm2_path):
    result = subprocess.run([sys.executable, "-c", _PROBE, str(smollm2_path), "4GiB"],
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    cache = figures["cache_kib"]
    assert cache > 3.9 * 2**20 and figures["tokens"] == 16, figures
    assert figures["idle_kib"] == 0, figures  # nothing of the cache is resident before a request
    # Loading costs the packed weights (110 MiB), the tokenizer and the loader's leftovers (~170 MiB
    # in all, PyTorch having been imported before), not the cache.
    assert figures["load_growth_kib"] < 400 * 1024, figures
    # One request of ~20 tokens makes the pages of its 2 blocks resident in each layer (12 KiB each of
    # K and V per block in SmolLM2): far less than the cache, with room for transparent huge pages.
    assert 0 < figures["used_kib"] < cache / 8, figures
    assert figures["growth_kib"] < 400 * 1024 + cache / 8, figures


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_zeros_on_demand(dtype):
    t = zeros_on_demand((2, 4096, 3, 64), dtype, torch.device("cpu"))
    assert t.shape == (2, 4096, 3, 64) and t.dtype == dtype and t.is_contiguous()
    assert not t.any()
    t[1, 17] = 3
    assert int(t.float().sum()) == 3 * 3 * 64 and t[1, 17].eq(3).all()
    empty = zeros_on_demand((2, 0, 3, 64), dtype, torch.device("cpu"))
    assert empty.shape == (2, 0, 3, 64)
