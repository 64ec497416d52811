"""Open a checkpoint by path or short name: GGUF file, Hugging Face directory or embedded model."""

from __future__ import annotations

from pathlib import Path

from lmserve.default_model import DEFAULT_MODEL, resolve_embedded
from lmserve.errors import ModelLoadError
from lmserve.loader.checkpoint import Checkpoint


def open_checkpoint(model: str | None) -> Checkpoint:
    """`model` is None (the default embedded model), a short name, a .gguf file or a HF directory."""
    name = DEFAULT_MODEL if model is None else str(model)
    path = Path(resolve_embedded(name) or name).expanduser()
    if not path.exists():
        raise ModelLoadError(path, "no such file or directory")
    if path.is_dir():
        from lmserve.loader.safetensors import load_hf_directory
        return load_hf_directory(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        from lmserve.loader.gguf import load_gguf
        return load_gguf(path)
    raise ModelLoadError(path, "not a GGUF file (bad magic) and not a Hugging Face model directory")


__all__ = ["Checkpoint", "open_checkpoint"]
