"""Model families by architecture name, and construction of a model with its weights."""

from __future__ import annotations

from lmserve.models.gemma3 import GEMMA_CHAT_TEMPLATE, Gemma3ForCausalLM
from lmserve.models.gpt2 import GPT2LMHeadModel
from lmserve.models.llama import LlamaForCausalLM
from lmserve.models.llama_moe import LlamaMoeForCausalLM

# Keys are ModelConfig.architecture values; loaders map checkpoint architecture names onto them.
MODEL_REGISTRY = {
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
    "qwen3": LlamaForCausalLM,
    "phi3": LlamaForCausalLM,  # Llama with q|k|v and gate|up fused in the checkpoint too, long-RoPE
    "gemma3": Gemma3ForCausalLM,
    "gpt2": GPT2LMHeadModel,
    "mixtral": LlamaMoeForCausalLM,
    "qwen2_moe": LlamaMoeForCausalLM,
    "qwen3_moe": LlamaMoeForCausalLM,
}

# Chat templates of families whose checkpoints may carry none (llama.cpp writes no template into
# Gemma GGUF files); loaders fall back to these.
DEFAULT_CHAT_TEMPLATES = {"gemma3": GEMMA_CHAT_TEMPLATE}
