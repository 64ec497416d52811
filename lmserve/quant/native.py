"""Builds and loads the native CPU code in `csrc/`: the block-quantized matmul, the fused
Llama decode step and the mixture-of-experts feed-forward block built on it, and the sampler's
per-row argmax and log-sum-exp.

The extension is compiled once per machine with PyTorch's extension builder (ninja + the
system C++ compiler), cached on disk (TORCH_EXTENSIONS_DIR, by default under ~/.cache), and
reused by later processes in about a second. Its vector kernels are written once
(`csrc/isa_kernels.h`) and compiled into every variant whatever CPU builds them: AVX2 + FMA
(256-bit registers) and AVX-512 with VNNI (512-bit registers; `vpdpwssd` multiplies the int16
pairs of 16 weight rows per instruction), each in its own translation unit under
`#pragma GCC target`, while the rest is compiled for the baseline x86-64. So one cached build
runs on any CPU with AVX2, and all variants read the same packed weight layout. `load()` asks
the extension which variants this CPU runs (CPUID, checked again in C++ before a variant can be
used, never assumed from the build machine) and picks the best, or the one named by
`LMSERVE_NATIVE_ISA` (`avx2` forces the 256-bit kernels on an AVX-512 machine, for tests and
benchmarks); `TARGET_ISA` and the `-v` log name the choice. Where AVX2 is missing, the build
fails, or `LMSERVE_NATIVE=0` is set, `load()` returns None and the packed layers fall back to
PyTorch's int4 kernel (and our own `GroupWeight` dequantization for many rows).

Each build is named by a short hash of what it is made from (the contents of `csrc/`, the
compile flags, the PyTorch version and the interpreter), so checkouts and virtualenvs that
differ build once each into their own directory and those that agree share one build; a
finished build (its `inputs.json` written) is imported without running the builder again. A
process holds an exclusive `flock` on the build directory while it builds or loads there, which
the OS releases if the process dies: so a `lock` file that PyTorch's builder left behind from a
build that was killed is known stale whenever that lock is ours, and is removed with a warning
instead of making every later load wait forever. A build in progress says on stderr what it
builds, why and for about how long.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from functools import cache
from pathlib import Path

import torch

logger = logging.getLogger("lmserve")
_CSRC = Path(__file__).parent / "csrc"
_SOURCES = sorted(str(p) for p in _CSRC.glob("*.cpp"))
DISABLE_ENV = "LMSERVE_NATIVE"  # "0" turns the extension off (the PyTorch fallbacks run instead)
ISA_ENV = "LMSERVE_NATIVE_ISA"  # a variant's name (e.g. "avx2") runs it instead of the best this CPU has
TARGET_ISA: str | None = None  # the instruction sets of the kernel variant load() chose, e.g. "AVX-512 VNNI"
# Baseline x86-64: each variant's instruction sets come from `#pragma GCC target` in its own file.
_CFLAGS = ["-O3", "-std=c++20", "-fopenmp"]
_LDFLAGS = ["-fopenmp"]
KERNELS = ("block matmul and dequantize (4-bit and int8 groups)", "fused decoder step",
           "mixture-of-experts feed-forward", "sampler row argmax / log-sum-exp")
BUILD_NAME = "lmserve_block_matmul"  # each build is BUILD_NAME_<key>, in a directory of that name
TORCH_LOCK = "lock"  # the file PyTorch's builder holds for the length of a build
_HOLDER_LOCK = "lmserve.lock"  # the file lmserve processes flock while building or loading
_INPUTS = "inputs.json"  # written once a build has finished: what it was built from


def cpu_features() -> dict[str, bool]:
    """The vector extensions this CPU reports through CPUID."""
    return {"AVX2": torch.cpu._is_avx2_supported(), "AVX-512": torch.cpu._is_avx512_supported(),
            "AVX-512 VNNI": torch.cpu._is_vnni_supported(), "AVX-512 BF16": torch.cpu._is_avx512_bf16_supported()}


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one) and the cores this process may
    use, for benchmark reports."""
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        name = ""
    return f"{name or 'unknown CPU'}, {len(os.sched_getaffinity(0))} cores"


def describe_cpu() -> str:
    """One line for logs and benchmark reports: which vector extensions this CPU has, and which
    native kernel variant runs (once `load()` has chosen one)."""
    features = ", ".join(f"{name} {'yes' if present else 'no'}" for name, present in cpu_features().items())
    return features if TARGET_ISA is None else f"{features}; native kernels: {TARGET_ISA}"


def build_inputs(files: Iterable[Path], flags: Iterable[str], torch_version: str = torch.__version__,
                 python: str = f"{sys.executable} {sys.version}") -> dict:
    """What a build is made from: each file's content hash, the compile and link flags, the
    PyTorch version and the interpreter."""
    return {"sources": {Path(f).name: hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in sorted(files)},
            "flags": list(flags), "torch": torch_version, "python": python}


def build_key(inputs: dict) -> str:
    """A short hash naming the build of `inputs` (see `build_inputs`)."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:12]


@contextlib.contextmanager
def build_lock(build_dir: Path) -> Iterator[None]:
    """Hold `build_dir`'s lmserve lock while building or loading there (waiting, with a note on
    stderr, while another process holds it). The OS drops the lock of a process that dies, and
    every live builder holds it; so a PyTorch `lock` file found once it is ours was left by an
    interrupted build, and would block PyTorch's builder forever: it is removed with a warning."""
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir / _HOLDER_LOCK, "a") as holder:
        try:
            fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"lmserve: waiting for another process building the native kernels in {build_dir}",
                  file=sys.stderr)
            fcntl.flock(holder, fcntl.LOCK_EX)
        stale = build_dir / TORCH_LOCK
        if stale.exists():
            logger.warning("removing %s, left by a native-kernel build that was interrupted", stale)
            stale.unlink(missing_ok=True)
        yield  # closing the file releases the lock


def _why_build(build_dir: Path, inputs: dict) -> str:
    """Why `build_dir` has no finished build: nothing built before, or what differs from the
    latest earlier build."""
    earlier = sorted((p for p in build_dir.parent.glob(f"{BUILD_NAME}_*/{_INPUTS}") if p.parent != build_dir),
                     key=lambda p: p.stat().st_mtime)
    if not earlier:
        return "first use on this machine"
    try:
        previous = json.loads(earlier[-1].read_text())
    except (OSError, ValueError):
        previous = {}
    changes = {"sources": "the sources changed", "flags": "the compile flags changed",
               "torch": f"PyTorch {previous.get('torch')} -> {inputs['torch']}", "python": "another Python interpreter"}
    return ", ".join(text for key, text in changes.items() if previous.get(key) != inputs[key]) or "a new build"


def _import_built(name: str, build_dir: Path):
    """The finished build in `build_dir`, imported the way PyTorch's builder imports it."""
    spec = importlib.util.spec_from_file_location(name, build_dir / f"{name}.so")  # the builder's LIB_EXT on POSIX
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def default_build_root() -> Path:
    """PyTorch's `cpp_extension.get_default_build_root()`, computed without importing the builder
    (and setuptools with it, ~0.15 s) when a finished build only needs loading."""
    from torch import _appdirs

    return Path(os.path.realpath(_appdirs.user_cache_dir(appname="torch_extensions")))


def _build_or_import():
    inputs = build_inputs([*_CSRC.glob("*.cpp"), *_CSRC.glob("*.h")], [*_CFLAGS, *_LDFLAGS])
    name = f"{BUILD_NAME}_{build_key(inputs)}"
    build_dir = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or default_build_root()) / name
    with build_lock(build_dir):
        if (build_dir / _INPUTS).exists():
            return _import_built(name, build_dir)
        from torch.utils import cpp_extension

        print(f"lmserve: compiling the native CPU kernels (AVX2 and AVX-512 variants) into {build_dir} "
              f"({_why_build(build_dir, inputs)}); this takes about a minute, once", file=sys.stderr)
        module = cpp_extension.load(name=name, sources=_SOURCES, extra_cflags=_CFLAGS, extra_ldflags=_LDFLAGS,
                                    build_directory=str(build_dir), verbose=False)
        (build_dir / _INPUTS).write_text(json.dumps(inputs, indent=1))
        return module


def _choose_isa(module) -> str | None:
    """Makes the module run the best kernel variant this CPU has, or the one `LMSERVE_NATIVE_ISA`
    names where this CPU runs it; returns the chosen variant's label (None: it runs none)."""
    variants = module.isa_variants()  # (name, label, runs here), best first
    runnable = [(name, label) for name, label, runs in variants if runs]
    if not runnable:
        return None
    wanted = os.environ.get(ISA_ENV)
    chosen = runnable[0]
    if wanted:
        named = [(name, label) for name, label in runnable if name == wanted]
        if named:
            chosen = named[0]
        else:
            logger.warning("%s=%s: not a kernel variant this CPU runs (%s); using %s", ISA_ENV, wanted,
                           ", ".join(name for name, _ in runnable), chosen[0])
    module.use_isa(chosen[0])
    logger.info("native kernel variants: %s; running %s (%s)",
                ", ".join(f"{label} ({'runs here' if runs else 'not on this CPU'})" for _, label, runs in variants),
                chosen[1], f"{ISA_ENV}={wanted}" if chosen[0] == wanted else "the best this CPU runs")
    return chosen[1]


@contextlib.contextmanager
def using_isa(name: str) -> Iterator[None]:
    """Runs the kernel variant `name` (one this CPU runs: see `isa_variants`) inside the block,
    then the previous one again; for tests and benchmarks."""
    module = load()
    previous = module.isa()
    module.use_isa(name)
    try:
        yield
    finally:
        module.use_isa(previous)


def isa_variants() -> list[tuple[str, str, bool]]:
    """(name, label, whether this CPU runs it) of every kernel variant built, best first; empty
    without the extension."""
    module = load()
    return [] if module is None else [tuple(v) for v in module.isa_variants()]


@cache
def load():
    """The compiled module (`block_matmul`, `block_dequantize`, `FusedDecoder`, `MoeFeedForward`,
    `argmax_logsumexp`, and `isa_variants` / `use_isa` / `isa` for the kernel variant), or None.
    The Makefile's install step calls this once so the compile happens at set-up rather than in a
    first request."""
    global TARGET_ISA
    logger.info("CPU: %s; PyTorch's kernels use its %s build", describe_cpu(),
                torch.backends.cpu.get_cpu_capability())
    if os.environ.get(DISABLE_ENV) == "0":
        logger.info("%s=0: native kernels off; quantized layers use PyTorch's int4 kernel", DISABLE_ENV)
        return None
    if not cpu_features()["AVX2"]:
        logger.info("no AVX2 on this CPU: quantized layers use PyTorch's int4 kernel")
        return None
    start = time.perf_counter()
    logger.info("loading the native kernels (compiled on first use, ~1 min)...")
    try:
        module = _build_or_import()
    except Exception as exc:  # no compiler or ninja, an unwritable cache: the PyTorch kernel path still works
        logger.warning("could not build the native kernels (%s); using PyTorch's int4 kernel",
                       str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return None
    TARGET_ISA = _choose_isa(module)
    if TARGET_ISA is None:
        logger.info("this CPU runs none of the native kernel variants: quantized layers use PyTorch's int4 kernel")
        return None
    logger.info("native kernels ready in %.1f s, compiled for %s: %s", time.perf_counter() - start,
                TARGET_ISA, "; ".join(KERNELS))
    return module
