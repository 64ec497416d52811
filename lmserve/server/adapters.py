"""The LoRA adapters a server offers as models of their own.

Each served adapter has a name, which clients put in a request's `model` field, and a path. They
come from `--lora-modules name=path` at start (loaded then, so a bad one stops the start with its
message) and from `POST /v1/load_lora_adapter` / `/v1/unload_lora_adapter` at run time. Loading
and unloading run on the engine thread between steps (`AsyncEngine.call`). An unloaded adapter
takes no new requests (404 for its name); requests already running on it finish with it.
"""

from __future__ import annotations

import asyncio

from lmserve.errors import LmserveError
from lmserve.lora import LoRARequest
from lmserve.server.async_engine import AsyncEngine
from lmserve.server.middleware import ApiError


class ServedAdapters:
    def __init__(self, engine: AsyncEngine, base_model: str):
        self.engine = engine
        self.base_model = base_model
        self.by_name: dict[str, LoRARequest] = {}
        self._lock = asyncio.Lock()  # one load or unload at a time, so a name is checked and taken at once

    def _check_name(self, name: str) -> None:
        if not name or name == self.base_model or name in self.by_name:
            what = "the base model's name" if name == self.base_model else "already loaded" if name else "empty"
            raise ApiError(400, f"lora_name: {name!r} is {what}", param="lora_name")

    def _add(self, name: str, path: str):
        """What loads adapter `name` on the engine thread: under an id that neither this server
        nor the engine (which may serve other apps) has given to another adapter."""
        def add(engine) -> LoRARequest:
            taken = [r.lora_int_id for r in [*self.by_name.values(), *engine.list_loras()]]
            request = LoRARequest(name, max(taken, default=0) + 1, path)
            engine.add_lora(request)
            return request
        return add

    def load_at_start(self, modules: dict[str, str]) -> None:
        """Load `--lora-modules` (name -> path) before the server starts; raises `LmserveError`."""
        for name, path in modules.items():
            self._check_name(name)
            self.by_name[name] = self.engine.call(self._add(name, path)).result()

    async def load(self, name: str, path: str) -> dict:
        async with self._lock:
            self._check_name(name)
            try:
                self.by_name[name] = await asyncio.wrap_future(self.engine.call(self._add(name, path)))
            except LmserveError as exc:
                raise ApiError.of(exc) from None
        return {"object": "lora_adapter", "lora_name": name, "lora_path": path, "status": "loaded"}

    async def unload(self, name: str) -> dict:
        async with self._lock:
            if name not in self.by_name:
                raise ApiError(404, f"lora_name: no adapter {name!r} is loaded", param="lora_name",
                               code="model_not_found")
            del self.by_name[name]
            await asyncio.wrap_future(self.engine.call(lambda engine: engine.remove_lora(name)))
        return {"object": "lora_adapter", "lora_name": name, "status": "unloaded"}

    def cards(self, max_model_len: int) -> list[dict]:
        """The adapters' entries in /v1/models: each a model whose `parent` is the base model."""
        return [{"id": name, "object": "model", "created": 0, "owned_by": "lmserve", "root": request.lora_path,
                 "parent": self.base_model, "max_model_len": max_model_len}
                for name, request in self.by_name.items()]
