"""Model families by architecture name, and construction of a model with its weights."""

from __future__ import annotations

from lmserve.models.llama import LlamaForCausalLM

# Keys are ModelConfig.architecture values; loaders map checkpoint architecture names onto them.
MODEL_REGISTRY = {
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
    "qwen3": LlamaForCausalLM,
}
