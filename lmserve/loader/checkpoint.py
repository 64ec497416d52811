"""The format-independent result of opening a checkpoint."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lmserve.config import ModelConfig

if TYPE_CHECKING:
    import torch


@dataclass
class Checkpoint:
    """A model's configuration, tokenizer and a lazy stream of its tensors under Hugging Face names."""

    path: str
    format: str  # "gguf" or "safetensors"
    config: ModelConfig
    tokenizer: object | None  # lmserve.tokenizer.Tokenizer
    tensor_types: dict[str, int]  # storage type name -> number of tensors
    num_params: int
    _iter_tensors: Callable[[], Iterator[tuple[str, torch.Tensor]]] = field(repr=False, default=None)

    def tensors(self, keep_packed: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) pairs; with `keep_packed`, GGUF block-quantized matrices come as
        `lmserve.quant.gguf_blocks.GroupQuantized` instead of dense tensors."""
        if keep_packed and self.format == "gguf":
            return self._iter_tensors(keep_packed=True)
        return self._iter_tensors()
