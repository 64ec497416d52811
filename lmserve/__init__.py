"""lmserve: an LLM inference and serving engine on PyTorch (GGUF and safetensors checkpoints,
paged KV cache, continuous batching)."""

from lmserve.lora import LoRARequest
from lmserve.outputs import BeamSearchOutput, CompletionOutput, RequestOutput
from lmserve.sampling_params import BeamSearchParams, SamplingParams, StructuredOutputs

__all__ = ["LLM", "LoRARequest", "SamplingParams", "BeamSearchParams", "StructuredOutputs", "RequestOutput", "CompletionOutput",
           "BeamSearchOutput"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # `LLM` brings in PyTorch, so it is imported when first asked for: `import lmserve` and the
    # command line (its --help, and what it does before loading a model) stay light.
    if name == "LLM":
        from lmserve.entrypoints.llm import LLM

        globals()["LLM"] = LLM
        return LLM
    raise AttributeError(f"module 'lmserve' has no attribute {name!r}")
