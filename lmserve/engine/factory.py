"""Builds an `LLMEngine` from a model name and engine options: the one entry point that the
offline `LLM` class, the CLI and the server share (none of them assembles an engine itself)."""

from __future__ import annotations

import torch

from lmserve.config import EngineConfig
from lmserve.engine.llm_engine import LLMEngine
from lmserve.engine.tensor_parallel import run_torchrun_worker, torchrun_rank
from lmserve.loader import open_checkpoint


def create_engine(model: str | None = None, threads: int | None = None, **engine_kwargs) -> LLMEngine:
    """`model` is None (the embedded default), a short name, a .gguf file or a Hugging Face
    directory; `threads` sets PyTorch's CPU threads; the rest are `EngineConfig` fields. In a
    process of rank > 0 that `torchrun` started for a tensor-parallel engine, this runs that
    rank's part of the model until rank 0 stops, then exits the process."""
    if threads:
        torch.set_num_threads(int(threads))
    if engine_kwargs.get("tensor_parallel_size", 1) > 1 and torchrun_rank():
        run_torchrun_worker()
        raise SystemExit(0)
    return LLMEngine(open_checkpoint(model), EngineConfig(**engine_kwargs))
