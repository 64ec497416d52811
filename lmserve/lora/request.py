"""`LoRARequest`: which adapter a request runs with (vLLM's signature: name, integer id, path)."""

from __future__ import annotations

from dataclasses import dataclass

from lmserve.errors import InvalidParameterError


@dataclass(frozen=True)
class LoRARequest:
    """An adapter by `lora_name`, a positive `lora_int_id` unique per adapter, and `lora_path`, a
    PEFT directory (`adapter_config.json` + `adapter_model.safetensors`)."""

    lora_name: str
    lora_int_id: int
    lora_path: str

    def __post_init__(self):
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise InvalidParameterError("lora_request.lora_name", f"must be a non-empty string, got {self.lora_name!r}")
        if not isinstance(self.lora_int_id, int) or isinstance(self.lora_int_id, bool) or self.lora_int_id < 1:
            raise InvalidParameterError("lora_request.lora_int_id",
                                        f"must be a positive integer, got {self.lora_int_id!r}")
        if not isinstance(self.lora_path, str) or not self.lora_path:
            raise InvalidParameterError("lora_request.lora_path", f"must be a directory path, got {self.lora_path!r}")
