"""Builds an `LLMEngine` from a model name and engine options: the one entry point that the
offline `LLM` class, the CLI and the server share (none of them assembles an engine itself)."""

from __future__ import annotations

import torch

from lmserve.config import EngineConfig
from lmserve.engine.llm_engine import LLMEngine
from lmserve.loader import open_checkpoint


def create_engine(model: str | None = None, threads: int | None = None, **engine_kwargs) -> LLMEngine:
    """`model` is None (the embedded default), a short name, a .gguf file or a Hugging Face
    directory; `threads` sets PyTorch's CPU threads; the rest are `EngineConfig` fields."""
    if threads:
        torch.set_num_threads(int(threads))
    return LLMEngine(open_checkpoint(model), EngineConfig(**engine_kwargs))
