"""Builds and loads the native CPU code in `csrc/`: the block-quantized matmul, the fused
Llama decode step built on it, and the sampler's per-row argmax and log-sum-exp.

The extension is compiled once per machine with PyTorch's extension builder (ninja + the
system C++ compiler), cached on disk (TORCH_EXTENSIONS_DIR, by default under ~/.cache), and
reused by later processes in about a second. It is compiled for one instruction set, AVX2 with
FMA and F16C, whatever CPU builds it, so a cached build runs on any CPU that has AVX2 (AVX-512
ones included). Whether this CPU has it is read from CPUID at run time (through PyTorch's
cpuinfo), never assumed from the build machine. Where AVX2 is missing, the build fails, or
`LMSERVE_NATIVE=0` is set, `load()` returns None and the packed layers fall back to PyTorch's
int4 kernel (and our own `GroupWeight` dequantization for many rows).
"""

from __future__ import annotations

import logging
import os
import time
from functools import cache
from pathlib import Path

import torch

logger = logging.getLogger("lmserve")
_SOURCES = sorted(str(p) for p in (Path(__file__).parent / "csrc").glob("*.cpp"))
DISABLE_ENV = "LMSERVE_NATIVE"  # "0" turns the extension off (the PyTorch fallbacks run instead)
TARGET_ISA = "AVX2+FMA+F16C"  # what every kernel in csrc/ is compiled for
_TARGET_FLAGS = ["-mavx2", "-mfma", "-mf16c"]
KERNELS = ("block matmul and dequantize (4-bit and int8 groups)", "fused Llama decode step",
           "sampler row argmax / log-sum-exp")


def cpu_features() -> dict[str, bool]:
    """The vector extensions this CPU reports through CPUID."""
    return {"AVX2": torch.cpu._is_avx2_supported(), "AVX-512": torch.cpu._is_avx512_supported(),
            "AVX-512 VNNI": torch.cpu._is_vnni_supported(), "AVX-512 BF16": torch.cpu._is_avx512_bf16_supported()}


def describe_cpu() -> str:
    """One line for logs and benchmark reports: which vector extensions this CPU has."""
    features = cpu_features()
    return ", ".join(f"{name} {'yes' if present else 'no'}" for name, present in features.items())


@cache
def load():
    """The compiled module (`block_matmul`, `block_dequantize`, `LlamaDecoder`,
    `argmax_logsumexp`), or None. The Makefile's install step calls this once so the compile
    happens at set-up rather than in a first request."""
    logger.info("CPU: %s; PyTorch's kernels use its %s build", describe_cpu(),
                torch.backends.cpu.get_cpu_capability())
    if os.environ.get(DISABLE_ENV) == "0":
        logger.info("%s=0: native kernels off; quantized layers use PyTorch's int4 kernel", DISABLE_ENV)
        return None
    if not cpu_features()["AVX2"]:
        logger.info("no AVX2 on this CPU: quantized layers use PyTorch's int4 kernel")
        return None
    from torch.utils import cpp_extension

    start = time.perf_counter()
    logger.info("loading the native kernels (compiled on first use, ~1 min)...")
    try:
        module = cpp_extension.load(name="lmserve_block_matmul", sources=_SOURCES,
                                    extra_cflags=["-O3", "-std=c++20", *_TARGET_FLAGS, "-fopenmp"],
                                    extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # no compiler or ninja: the PyTorch kernel path still works
        logger.warning("could not build the native kernels (%s); using PyTorch's int4 kernel",
                       str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return None
    logger.info("native kernels ready in %.1f s, compiled for %s: %s", time.perf_counter() - start,
                TARGET_ISA, "; ".join(KERNELS))
    return module
