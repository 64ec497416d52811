"""Building the model and sizing its KV cache: the model family's class with its checkpoint
weights (packed or dense, quantized at load when asked), the number of KV blocks and swap
blocks the configured memory holds, and the context limit they allow."""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from contextlib import contextmanager

import torch

from lmserve.config import EngineConfig, ModelConfig
from lmserve.errors import ModelLoadError
from lmserve.layers.linear import Linear
from lmserve.layers.moe import StackedExperts
from lmserve.loader import Checkpoint
from lmserve.models import registry
from lmserve.models.weights import PackedShardLoader, WeightLoadError, load_weights
from lmserve.quant.packed import BlockWeight, KernelOrGemmWeight

logger = logging.getLogger("lmserve")


@contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_model(checkpoint: Checkpoint, engine_config: EngineConfig, max_model_len: int) -> torch.nn.Module:
    cfg = checkpoint.config
    try:
        model_cls = registry.family(cfg.architecture).model_class
    except registry.UnsupportedArchitectureError as exc:
        raise ModelLoadError(checkpoint.path, str(exc)) from None
    with _default_dtype(engine_config.torch_dtype), torch.device(engine_config.torch_device):
        model = model_cls(cfg, max_model_len)
    # The packed kernels are PyTorch's CPU ones; on a GPU quantized files are dequantized.
    keep_packed = engine_config.quantization == "auto" and engine_config.torch_device.type == "cpu"
    try:
        load_weights(model, checkpoint.tensors(keep_packed=keep_packed), model.packed_modules,
                     model.ignored_checkpoint_suffixes)
    except WeightLoadError as exc:
        raise ModelLoadError(checkpoint.path, str(exc)) from None
    if engine_config.quantization in ("int8", "int4"):
        for module in model.modules():
            if isinstance(module, (Linear, StackedExperts)):
                module.quantize_(engine_config.quantization)
    for module in model.modules():
        if isinstance(module, KernelOrGemmWeight):
            if engine_config.deterministic:
                module.kernel_max_rows = 0
            if engine_config.prefill_precision == "bf16" and isinstance(module, BlockWeight):
                module.use_bf16_gemm()
    if engine_config.prefill_precision == "bf16" and not torch.cpu._is_avx512_bf16_supported():
        logger.warning("prefill_precision bf16: this CPU has no AVX512-BF16, so bf16 GEMMs are likely slower "
                       "than fp32 here")
    _log_weight_formats(model)
    return model.eval()


def _log_weight_formats(model: torch.nn.Module) -> None:
    def kind(m) -> str:
        if m.packed is None:
            return "dense"
        if isinstance(m, StackedExperts):
            return f"{type(m.packed[0].gate_up).__name__} experts"
        return type(m.packed).__name__

    kinds = Counter(kind(m) for m in model.modules() if isinstance(m, PackedShardLoader))
    weight_bytes = sum(t.numel() * t.element_size() for t in itertools.chain(model.parameters(), model.buffers()))
    logger.info("weights: %s; %.1f MiB resident", ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())),
                weight_bytes / 2**20)


def common_sliding_window(model: torch.nn.Module) -> int | None:
    """The attention window shared by every layer, or None when any layer attends globally
    (then no block may ever be released early)."""
    windows = {layer.sliding_window for layer in model.attention_layers()}
    return windows.pop() if len(windows) == 1 else None


def num_kv_blocks_for(model_config: ModelConfig, engine_config: EngineConfig) -> int:
    """KV blocks of the device cache: `num_kv_blocks` when set, else as many as `kv_cache_memory` holds."""
    if engine_config.num_kv_blocks is not None:
        return engine_config.num_kv_blocks
    return max(1, engine_config.kv_cache_bytes // _bytes_per_block(model_config, engine_config))


def num_swap_blocks_for(model_config: ModelConfig, engine_config: EngineConfig) -> int:
    """Blocks of the swap tier (0 unless preemption_mode is "swap")."""
    if engine_config.preemption_mode != "swap":
        return 0
    return engine_config.swap_space_bytes // _bytes_per_block(model_config, engine_config)


def _bytes_per_block(model_config: ModelConfig, engine_config: EngineConfig) -> int:
    return model_config.kv_bytes_per_token(engine_config.kv_torch_dtype.itemsize,
                                           engine_config.kv_quantized) * engine_config.block_size


def context_limit(model_config: ModelConfig, engine_config: EngineConfig, num_blocks: int) -> int:
    """The longest sequence the engine accepts: the model's, `max_model_len`, and what the KV cache holds."""
    limit = min(model_config.max_position_embeddings, engine_config.max_model_len or 1 << 62)
    capacity = num_blocks * engine_config.block_size
    if limit > capacity:
        logger.warning("max_model_len lowered from %d to the KV cache capacity of %d tokens", limit, capacity)
        limit = capacity
    return limit


def fused_decoder_for(model_config: ModelConfig):
    """The model family's fused-decoder factory `(model, engine_config) -> decoder | None`, or None."""
    return registry.family(model_config.architecture).fused_decoder
