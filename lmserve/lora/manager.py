"""The engine's LoRA state: the cache of loaded adapters and the current step's adapter rows.

`LoRAManager` loads adapters on first use (`get`) and keeps up to `max_cpu_loras` of them, least
recently used first out; an adapter that a live request still runs with is never evicted, and
one that is removed (`remove`) stays with the requests already running on it until they finish:
they hold the adapter object, only new requests can no longer name it.

`LoRABatch` is shared by every `Linear` of the model: before a forward the runner tells it which
rows of the step's flat token axis belong to which adapter (`begin_step`), and each projection
then adds, per adapter present, `(x[rows] @ A^T) @ B^T` to those rows of its output — one pair of
matmuls per adapter in the step, none per request, nothing for base rows.
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


class LoRABatch:
    """The adapters of one step: [(adapter, its rows on the flat token axis, or None for all)]."""

    def __init__(self):
        self.groups: list[tuple[LoRAAdapter, torch.Tensor | None]] = []

    def begin_step(self, row_adapters: list[tuple[LoRAAdapter | None, int]], device: torch.device) -> bool:
        """`row_adapters`: each scheduled sequence's adapter (None: base) and its token count, in
        step order. Returns whether any row has an adapter."""
        rows: dict[LoRAAdapter, list[range]] = {}
        start = 0
        for adapter, count in row_adapters:
            if adapter is not None:
                rows.setdefault(adapter, []).append(range(start, start + count))
            start += count
        self.groups = []
        for adapter, spans in rows.items():
            if len(spans) == 1 and spans[0] == range(0, start):
                self.groups.append((adapter, None))
            else:
                index = [i for span in spans for i in span]
                self.groups.append((adapter, torch.tensor(index, dtype=torch.long, device=device)))
        return bool(self.groups)

    def apply(self, key: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """`y` (the base projection of `x`, a fresh tensor) plus the LoRA updates of module `key`."""
        for adapter, rows in self.groups:
            factors = adapter.weights.get(key)
            if factors is None:
                continue
            a, b = factors
            if rows is None:
                y = torch.addmm(y, x @ a.t(), b.t())
            else:
                y.index_add_(0, rows, (x.index_select(0, rows) @ a.t()) @ b.t())
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
        logger.info("LoRA adapter %r loaded from %s: rank %d, %d modules, %.1f MiB", adapter.name,
                    request.lora_path, adapter.rank, len(adapter.weights), adapter.nbytes / 2**20)
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
