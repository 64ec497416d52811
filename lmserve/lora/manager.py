"""The engine's LoRA state: the cache of loaded adapters and the current step's adapter rows.

`LoRAManager` loads adapters on first use (`get`) and keeps up to `max_cpu_loras` of them, least
recently used first out; an adapter that a live request still runs with is never evicted, and
one that is removed (`remove`) stays with the requests already running on it until they finish:
they hold the adapter object, only new requests can no longer name it.

`LoRABatch` is shared by every `Linear` of the model on the module path: before a forward the
runner lays the step's tokens out grouped by adapter and tells it which span of rows belongs to
which adapter (`begin_step`); each projection then adds `(x[span] @ A^T) @ B^T` to those rows of
its output, in place — one pair of matmuls per adapter in the step, none per request, nothing for
base rows.
The fused native decoder takes the same spans (`adapter_spans`) and does the same in C++.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

from lmserve.errors import InvalidParameterError
from lmserve.layers.linear import Linear
from lmserve.lora.adapter import LoRAAdapter, load_adapter
from lmserve.lora.request import LoRARequest

logger = logging.getLogger("lmserve")


def adapter_spans(row_adapters: list[tuple[LoRAAdapter | None, int]]) -> list[tuple[LoRAAdapter, int, int]]:
    """[(adapter, first row, end row)] on a step's flat token axis, one per run of sequences with
    the same adapter; `row_adapters`: each scheduled sequence's adapter (None: base) and its token
    count, in the order of the step's tokens."""
    spans: list[tuple[LoRAAdapter, int, int]] = []
    start = 0
    for adapter, count in row_adapters:
        if adapter is not None:
            if spans and spans[-1][0] is adapter and spans[-1][2] == start:
                spans[-1] = (adapter, spans[-1][1], start + count)
            else:
                spans.append((adapter, start, start + count))
        start += count
    return spans


def lora_dtype(engine_config, model: nn.Module) -> torch.dtype:
    """What adapter factors are stored as (`EngineConfig.lora_dtype`): "auto" is bfloat16 when the
    base's projections are packed (quantized) — their error dwarfs bf16's, and a step then reads
    half the bytes per adapter — else the compute dtype. Products are computed in the compute dtype."""
    if engine_config.lora_torch_dtype is not None:
        return engine_config.lora_torch_dtype
    packed = any(isinstance(m, Linear) and m.packed is not None for m in model.modules())
    return torch.bfloat16 if packed else engine_config.torch_dtype


class LoRABatch:
    """The adapters of one step: [(adapter, first row, end row)] on the step's flat token axis,
    whose rows the runner lays out grouped by adapter so that each adapter's rows are one span."""

    def __init__(self):
        self.spans: list[tuple[LoRAAdapter, int, int]] = []

    def begin_step(self, row_adapters: list[tuple[LoRAAdapter | None, int]]) -> None:
        self.spans = adapter_spans(row_adapters)

    def end_step(self) -> None:
        self.spans = []

    def apply(self, key: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """`y` (the base projection of `x`, a fresh tensor) plus the LoRA updates of module `key`,
        written into y's rows in place: two matmuls per adapter span."""
        for adapter, start, end in self.spans:
            factors = adapter.weights.get(key)
            if factors is not None:
                a, b = factors
                y[start:end].addmm_(x[start:end] @ a.t().to(x.dtype), b.t().to(x.dtype))
        return y


class LoRAManager:
    def __init__(self, model: nn.Module, max_loras: int, max_lora_rank: int, max_cpu_loras: int,
                 dtype: torch.dtype, in_use: Callable[[], set[LoRAAdapter]]):
        """`in_use()` answers the adapters that live requests run with (never evicted)."""
        self.model = model
        self.max_loras = max_loras
        self.max_lora_rank = max_lora_rank
        self.max_cpu_loras = max_cpu_loras
        self.dtype = dtype
        self.in_use = in_use
        self.loaded: OrderedDict[str, LoRAAdapter] = OrderedDict()  # by name, least recently used first
        self.batch = LoRABatch()
        for path, module in model.named_modules():
            if isinstance(module, Linear):
                module.lora, module.lora_key = self.batch, path

    def get(self, request: LoRARequest) -> LoRAAdapter:
        """The adapter of `request`, loaded now if it is not in the cache."""
        adapter = self.loaded.get(request.lora_name)
        if adapter is not None and adapter.request == request:
            self.loaded.move_to_end(request.lora_name)
            return adapter
        for other in self.loaded.values():
            if other.int_id == request.lora_int_id and other.name != request.lora_name:
                raise InvalidParameterError("lora_request.lora_int_id", f"{request.lora_int_id} is already the "
                                                                       f"id of adapter {other.name!r}")
        adapter = load_adapter(request, self.model, self.max_lora_rank, self.dtype)
        self.loaded[request.lora_name] = adapter  # a changed request for a name replaces the old adapter
        self.loaded.move_to_end(request.lora_name)
        logger.info("LoRA adapter %r loaded from %s: rank %d, %d modules, %.1f MiB as %s", adapter.name,
                    request.lora_path, adapter.rank, len(adapter.weights), adapter.nbytes / 2**20,
                    str(self.dtype).removeprefix("torch."))
        self._evict()
        return adapter

    def remove(self, name: str) -> bool:
        """Drop adapter `name` from the cache (requests running on it finish with it)."""
        return self.loaded.pop(name, None) is not None

    def _evict(self) -> None:
        busy = self.in_use()
        for name in list(self.loaded):
            if len(self.loaded) <= self.max_cpu_loras:
                return
            if self.loaded[name] not in busy:
                del self.loaded[name]
                logger.info("LoRA adapter %r evicted (max_cpu_loras=%d)", name, self.max_cpu_loras)
