"""LoRA adapters served on one base model: a request names its adapter with a `LoRARequest`, the
adapter is read from its PEFT directory (`adapter.load_adapter`), kept in an LRU cache
(`manager.LoRAManager`), and each step adds every token's own low-rank update to the projections
its adapter targets (`manager.LoRABatch`), in one batch with other adapters' and base rows."""

from lmserve.lora.request import LoRARequest

__all__ = ["LoRARequest"]
