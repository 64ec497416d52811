"""lmserve: an LLM inference and serving engine on PyTorch (GGUF and safetensors checkpoints,
paged KV cache, continuous batching)."""

from lmserve.entrypoints.llm import LLM
from lmserve.outputs import BeamSearchOutput, CompletionOutput, RequestOutput
from lmserve.sampling_params import BeamSearchParams, SamplingParams, StructuredOutputs

__all__ = ["LLM", "SamplingParams", "BeamSearchParams", "StructuredOutputs", "RequestOutput", "CompletionOutput",
           "BeamSearchOutput"]
__version__ = "0.1.0"
