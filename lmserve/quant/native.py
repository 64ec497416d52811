"""Builds and loads the native CPU code in `csrc/`: the block-quantized matmul, the fused
Llama decode step built on it, and the sampler's per-row argmax and log-sum-exp.

The extension is compiled once per machine with PyTorch's extension builder (ninja + the
system C++ compiler), cached on disk (TORCH_EXTENSIONS_DIR, by default under ~/.cache), and
reused by later processes in about a second. It needs AVX2 and FMA; where they are missing or
the build fails, `load()` returns None and the packed layers fall back to PyTorch's int4 kernel.
"""

from __future__ import annotations

import logging
import time
from functools import cache
from pathlib import Path

import torch

logger = logging.getLogger("lmserve")
_SOURCES = sorted(str(p) for p in (Path(__file__).parent / "csrc").glob("*.cpp"))


@cache
def load():
    """The compiled module (`block_matmul`, `block_dequantize`, `LlamaDecoder`,
    `argmax_logsumexp`), or None. The Makefile's install step calls this once so the compile happens at set-up rather than in a first request."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        logger.info("no AVX2 on this CPU: quantized layers use PyTorch's int4 kernel")
        return None
    from torch.utils import cpp_extension

    start = time.perf_counter()
    logger.info("loading the block-quantized matmul extension (compiled on first use, ~1 min)...")
    try:
        module = cpp_extension.load(name="lmserve_block_matmul", sources=_SOURCES,
                                    extra_cflags=["-O3", "-std=c++20", "-mavx2", "-mfma", "-mf16c", "-fopenmp"],
                                    extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # no compiler or ninja: the PyTorch kernel path still works
        logger.warning("could not build the block-quantized matmul (%s); using PyTorch's int4 kernel",
                       str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return None
    logger.info("block-quantized matmul ready in %.1f s", time.perf_counter() - start)
    return module

