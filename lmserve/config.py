"""Configuration dataclasses: what a checkpoint describes (`ModelConfig`) and how the engine
runs it (`EngineConfig`). Both validate at construction and name the bad field on failure."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lmserve.errors import InvalidParameterError

if TYPE_CHECKING:  # imported where used, so the command line parses its arguments without PyTorch
    import torch

# Server limits: requests queued beyond this many get HTTP 429; a request running longer is aborted.
DEFAULT_MAX_WAITING = 256
DEFAULT_REQUEST_TIMEOUT = 600.0

QUANTIZATION_MODES = ("auto", "none", "int8", "int4")
PREEMPTION_MODES = ("recompute", "swap")
PREFILL_PRECISIONS = ("fp32", "bf16")

_DTYPES = {  # name -> the torch dtype's name
    "float32": "float32", "fp32": "float32", "float": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
}


@dataclass
class ModelConfig:
    """Architecture and hyper-parameters of a decoder-only transformer, independent of file format."""

    architecture: str  # the ModelFamily.architecture of its family (lmserve.models.registry), e.g. "llama"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # HF-style dict with "rope_type" and its parameters
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    name: str = ""
    # Mixture of experts (num_experts == 0: every layer has a dense MLP). A layer is sparse unless
    # listed in mlp_only_layers, and only every decoder_sparse_step-th layer is (Qwen2-MoE's rule).
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0  # 0: no shared expert
    norm_topk_prob: bool = False  # renormalise the top-k routing weights to sum to 1
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    # Per-family details (the defaults are Llama's).
    hidden_act: str = "silu"  # MLP activation, a key of lmserve.layers.activation.ACTIVATIONS
    # "sliding_attention" / "full_attention" per layer; None: every layer uses `sliding_window`.
    layer_types: list[str] | None = None
    rope_local_theta: float | None = None  # RoPE base of sliding-window layers (Gemma 3), when it differs
    rope_local_scaling: dict | None = None
    query_pre_attn_scalar: float | None = None  # queries scaled by its -1/2 power instead of head_dim's
    final_logit_softcapping: float | None = None  # logits = cap * tanh(logits / cap)
    # Gemma's RMSNorm multiplies by (offset + weight) in fp32: Hugging Face checkpoints store w
    # (offset 1), llama.cpp's GGUF stores 1 + w (offset 0). None: Llama's RMSNorm.
    norm_weight_offset: float | None = None
    conv1d_weights: bool = False  # projection weights stored [in, out] (GPT-2's Conv1D) and transposed at load

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise InvalidParameterError(name, f"must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise InvalidParameterError(
                "num_kv_heads", f"must divide num_heads ({self.num_heads}), got {self.num_kv_heads}")
        if self.num_experts:
            self._check_moe()

    def _check_moe(self) -> None:
        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            raise InvalidParameterError("num_experts", f"must be a positive integer, got {self.num_experts!r}")
        if not isinstance(self.num_experts_per_tok, int) or not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise InvalidParameterError("num_experts_per_tok", f"must be in [1, num_experts={self.num_experts}], "
                                                               f"got {self.num_experts_per_tok!r}")
        for name in ("moe_intermediate_size", "decoder_sparse_step"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise InvalidParameterError(name, f"must be a positive integer, got {value!r}")

    def is_moe_layer(self, layer: int) -> bool:
        return (self.num_experts > 0 and layer not in self.mlp_only_layers
                and (layer + 1) % self.decoder_sparse_step == 0)

    def layer_sliding_window(self, layer: int) -> int | None:
        """The attention window of decoder layer `layer` (None: full causal attention)."""
        if self.layer_types is not None and self.layer_types[layer] != "sliding_attention":
            return None
        return self.sliding_window

    def kv_bytes_per_token(self, itemsize: int, quantized: bool = False) -> int:
        """Bytes of K and V cache one token occupies across all layers, with elements of `itemsize`
        bytes; a quantized cache also stores one fp32 scale per token and head."""
        per_head = self.head_dim * itemsize + (4 if quantized else 0)
        return 2 * self.num_layers * self.num_kv_heads * per_head


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """Map a user dtype name ("auto", "float32", "bf16", ...) to a torch dtype for `device`."""
    import torch

    if isinstance(dtype, torch.dtype):
        resolved = dtype
    elif dtype == "auto":
        resolved = torch.bfloat16 if device.type == "cuda" else torch.float32
    elif dtype in _DTYPES:
        resolved = getattr(torch, _DTYPES[dtype])
    else:
        raise InvalidParameterError("dtype", f"must be one of auto, {', '.join(sorted(_DTYPES))}; got {dtype!r}")
    if resolved == torch.float16 and device.type == "cpu":
        raise InvalidParameterError("dtype", "float16 is supported on GPU only; use float32 or bfloat16 on CPU")
    return resolved


def parse_bytes(value: int | str, field_name: str) -> int:
    """Accept a byte count as an int or a string such as '2GiB', '512MB'."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise InvalidParameterError(field_name, f"must be positive, got {value}")
        return value
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}
    text = str(value).strip().lower()
    for suffix, scale in units.items():
        if text.endswith(suffix):
            number = text[: -len(suffix)].strip()
            break
    else:
        number, scale = text, 1
    try:
        result = int(float(number) * scale)
    except ValueError:
        raise InvalidParameterError(field_name, f"must be a byte count such as 2GiB or 536870912, got {value!r}") from None
    if result <= 0:
        raise InvalidParameterError(field_name, f"must be positive, got {value!r}")
    return result


SPECULATIVE_METHODS = ("ngram", "draft")


@dataclass
class SpeculativeConfig:
    """Speculative decoding: a proposer guesses `num_speculative_tokens` tokens per running
    sequence and the model verifies them in the same step. "ngram": prompt lookup, the tokens
    that followed the latest earlier occurrence of the sequence's last `ngram_max` (down to
    `ngram_min`) tokens. "draft": a smaller model `model` with the same vocabulary (loaded with
    `quantization`, by default its file's packed formats) samples them, with a KV cache of its
    own as many tokens long as the target's. A step verifies at most `max_verify_rows` rows (running sequences x
    (1 + proposals)): with more running sequences each gets fewer proposals, and none once one
    each would not fit. Measured with benchmarks/bench_speculative.py on SmolLM2 (2 cores): 1.7-2.2x
    at batch 1, about 1x at 8 sequences with 3-7 rows each, so the default of 16 rows gives 8
    sequences one proposal each and stops at 9; verification rows are nearly free only while the
    block kernel's matmuls stay small (past 32 rows they dequantize their weights)."""

    method: str = "ngram"
    num_speculative_tokens: int = 4
    ngram_max: int = 4
    ngram_min: int = 2
    max_verify_rows: int = 16
    model: str | None = None  # the draft model (method "draft"): a .gguf file, a directory or a short name
    quantization: str = "auto"  # how the draft model's weights are loaded (EngineConfig.quantization)

    def __post_init__(self):
        if self.method not in SPECULATIVE_METHODS:
            raise InvalidParameterError("speculative.method", f"must be one of {', '.join(SPECULATIVE_METHODS)}; "
                                                              f"got {self.method!r}")
        for name, low, high in (("num_speculative_tokens", 1, 16), ("ngram_min", 1, 64), ("ngram_max", 1, 64),
                                ("max_verify_rows", 2, 1 << 20)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise InvalidParameterError(f"speculative.{name}", f"must be an integer in [{low}, {high}], "
                                                                   f"got {value!r}")
        if (self.method == "draft") != (self.model is not None):
            raise InvalidParameterError("speculative.model", "names the draft model, which method \"draft\" "
                                                             "needs and only it takes")
        if self.model is not None and not isinstance(self.model, str):
            raise InvalidParameterError("speculative.model", f"must be a path or model name, got {self.model!r}")
        if self.quantization not in QUANTIZATION_MODES:
            raise InvalidParameterError("speculative.quantization", f"must be one of {', '.join(QUANTIZATION_MODES)};"
                                                                    f" got {self.quantization!r}")
        if self.ngram_min > self.ngram_max:
            raise InvalidParameterError("speculative.ngram_min", f"{self.ngram_min} exceeds ngram_max "
                                                                 f"({self.ngram_max})")

    @classmethod
    def from_options(cls, options: "SpeculativeConfig | dict | None") -> "SpeculativeConfig | None":
        if options is None or isinstance(options, SpeculativeConfig):
            return options
        if not isinstance(options, dict):
            raise InvalidParameterError("speculative", f"must be a dict of options, got {type(options).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(options) - known)
        if unknown:
            raise InvalidParameterError("speculative", f"unknown option {unknown[0]!r} "
                                                       f"(known: {', '.join(sorted(known))})")
        return cls(**options)


@dataclass
class EngineConfig:
    """How the engine runs a model: device, precision, KV-cache size and per-step budgets."""

    device: str = "cpu"
    dtype: str | torch.dtype = "auto"
    block_size: int = 16
    kv_cache_memory: int | str = "1GiB"
    num_kv_blocks: int | None = None  # overrides the count computed from kv_cache_memory
    max_model_len: int | None = None  # defaults to the model's context length
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    enable_prefix_caching: bool = True
    # auto (the compute dtype); bfloat16 / float16: K/V stored in 16 bits, attention computed in
    # the compute dtype; int8 or fp8 (e4m3): quantized with one scale per token and head.
    kv_cache_dtype: str = "auto"
    # auto: keep a GGUF file's packed formats on the CPU, dense weights otherwise;
    # none: dequantize everything to `dtype`; int8 / int4: weight-only quantization at load.
    quantization: str = "auto"
    # Packed CPU weights run small batches through the block kernel and large ones as a
    # dequantize-then-GEMM, which round differently, so a request's numerics can depend on the
    # batch it shares; True runs every batch the GEMM way instead (and turns fused decode off).
    deterministic: bool = False
    # Run every step through the PyTorch modules even where the fused native decoder applies.
    enforce_eager: bool = False
    # The GEMMs of many-row steps (prefill) on packed CPU weights: "fp32" (exact, the default) or
    # "bf16" (oneDNN bf16 kernels; ~1.3x prefill on AVX512-BF16 CPUs, KL 0.0009 on SmolLM2).
    prefill_precision: str = "fp32"
    seed: int = 0
    # When KV blocks run out: "recompute" frees a victim's blocks and prefills it again later;
    # "swap" copies them to `swap_space` bytes of host memory (a memory-mapped file for a CPU cache).
    preemption_mode: str = "recompute"
    swap_space: int | str = "1GiB"
    # Speculative decoding (a SpeculativeConfig or a dict of its fields), or None for off.
    speculative: SpeculativeConfig | dict | None = None
    # LoRA adapters (requests name theirs with a LoRARequest): at most `max_loras` different
    # adapters in one step, ranks up to `max_lora_rank`, `max_cpu_loras` kept loaded (default max_loras).
    # Ranks the model is split over (lmserve.parallel): this process and N - 1 it starts.
    tensor_parallel_size: int = 1
    enable_lora: bool = False
    max_loras: int = 4
    max_lora_rank: int = 64
    max_cpu_loras: int | None = None
    # What adapter factors are stored as: "auto" is bfloat16 on a packed (quantized) base, whose
    # steps then read half the bytes per adapter, and the compute dtype otherwise.
    lora_dtype: str = "auto"

    def __post_init__(self):
        import torch

        try:
            self.torch_device = torch.device(self.device)
        except (RuntimeError, TypeError):
            raise InvalidParameterError("device", f"unknown device {self.device!r} (use cpu or cuda)") from None
        if self.torch_device.type == "cuda" and not torch.cuda.is_available():
            raise InvalidParameterError("device", "cuda requested but no CUDA GPU is available")
        self.torch_dtype = resolve_dtype(self.dtype, self.torch_device)
        self.kv_cache_bytes = parse_bytes(self.kv_cache_memory, "kv_cache_memory")
        kv_dtypes = {"auto": self.torch_dtype, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                     "float16": torch.float16, "fp16": torch.float16, "int8": torch.int8, "fp8": torch.float8_e4m3fn}
        if self.kv_cache_dtype not in kv_dtypes:
            raise InvalidParameterError("kv_cache_dtype", f"must be one of {', '.join(kv_dtypes)}; "
                                                          f"got {self.kv_cache_dtype!r}")
        self.kv_torch_dtype = kv_dtypes[self.kv_cache_dtype]
        self.kv_quantized = self.kv_cache_dtype in ("int8", "fp8")
        if self.quantization not in QUANTIZATION_MODES:
            raise InvalidParameterError("quantization", f"must be one of {', '.join(QUANTIZATION_MODES)}; "
                                                        f"got {self.quantization!r}")
        if self.quantization in ("int8", "int4") and self.torch_device.type != "cpu":
            raise InvalidParameterError("quantization", f"{self.quantization} weight-only kernels are CPU-only; "
                                                        "use auto or none on a GPU")
        if self.max_cpu_loras is None:
            self.max_cpu_loras = self.max_loras
        self.lora_torch_dtype = None  # None: auto, chosen once the model is loaded (lora.manager.lora_dtype)
        if self.lora_dtype != "auto":
            allowed = ("float32", "bfloat16", "float16") if self.torch_device.type == "cuda" else ("float32", "bfloat16")
            if _DTYPES.get(self.lora_dtype) not in allowed:
                raise InvalidParameterError("lora_dtype", f"must be auto, {' or '.join(allowed)} on "
                                                          f"{self.torch_device.type}; got {self.lora_dtype!r}")
            self.lora_torch_dtype = getattr(torch, _DTYPES[self.lora_dtype])
        for name, low in (("block_size", 1), ("max_num_seqs", 1), ("max_num_batched_tokens", 1), ("max_loras", 1),
                          ("max_lora_rank", 1), ("max_cpu_loras", 1),
                          ("tensor_parallel_size", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise InvalidParameterError(name, f"must be an integer >= {low}, got {value!r}")
        if self.num_kv_blocks is not None and (not isinstance(self.num_kv_blocks, int) or self.num_kv_blocks < 1):
            raise InvalidParameterError("num_kv_blocks", f"must be an integer >= 1, got {self.num_kv_blocks!r}")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 1):
            raise InvalidParameterError("max_model_len", f"must be an integer >= 1, got {self.max_model_len!r}")
        if self.prefill_precision not in PREFILL_PRECISIONS:
            raise InvalidParameterError("prefill_precision", f"must be one of {', '.join(PREFILL_PRECISIONS)}; "
                                                             f"got {self.prefill_precision!r}")
        if self.preemption_mode not in PREEMPTION_MODES:
            raise InvalidParameterError("preemption_mode", f"must be one of {', '.join(PREEMPTION_MODES)}; "
                                                           f"got {self.preemption_mode!r}")
        self.swap_space_bytes = parse_bytes(self.swap_space, "swap_space")
        self.speculative = SpeculativeConfig.from_options(self.speculative)
        if self.tensor_parallel_size > 1 and self.enable_lora:
            raise InvalidParameterError("enable_lora", "LoRA adapters are not served with tensor_parallel_size > 1")
        if self.max_cpu_loras < self.max_loras:
            raise InvalidParameterError("max_cpu_loras", f"{self.max_cpu_loras} is below max_loras ({self.max_loras})")
