"""The model families: one `ModelFamily` descriptor per `ModelConfig.architecture`, exported as
`FAMILIES` by the family's file in `lmserve.models.families`, and the lookups the loaders, the
quantize writer and the engine use to find a family by the name a checkpoint gives it. None of
them imports PyTorch: a descriptor names its model class, which is imported when a model is built.

A descriptor says which checkpoints the family serves (Hugging Face `architectures` /
`model_type`, GGUF `general.architecture`), how their names and hyper-parameters differ from the
common (Llama) reading (hooks returning `ModelConfig` fields), and what the engine builds from it.
`CausalLM` is what a model class gives the engine and the weight loader.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from lmserve.config import EngineConfig, ModelConfig
from lmserve.errors import LmserveError

if TYPE_CHECKING:
    import torch

    from lmserve.layers.attention import AttentionMetadata, PagedAttention

# key(name, default=None, required=False): the GGUF metadata value `<general.architecture>.<name>`
GgufKey = Callable[..., Any]


class CausalLM(Protocol):
    """A model as the engine and `models.weights.load_weights` use it (besides being a torch
    `nn.Module` whose parameter names follow the family's Hugging Face checkpoints)."""

    config: ModelConfig
    # checkpoint projection -> (fused module, its shard), e.g. "q_proj" -> ("qkv_proj", "q")
    packed_modules: Mapping[str, tuple[str, str]]
    # substring -> replacement applied to checkpoint names that call parts differently ({} for most)
    checkpoint_renames: Mapping[str, str]

    def __init__(self, cfg: ModelConfig, max_model_len: int) -> None: ...

    @property
    def ignored_checkpoint_suffixes(self) -> tuple[str, ...]:
        """Checkpoint tensors the model has no place for (rotary caches, a tied LM head)."""

    def attention_layers(self) -> list[PagedAttention]:
        """One paged attention per decoder layer, in order; the runner binds their KV caches."""

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Final-normed hidden states [tokens, hidden] of the flattened batch."""

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits [rows, vocab] of the given hidden states."""


@dataclass(frozen=True)
class GgufTensorNames:
    """How llama.cpp names a family's tensors: `blk.N.<kind>` is `<layer_prefix>.N.<layer_names[kind]>`,
    any other tensor `<global_names[base]>` (both keep the `.weight` / `.bias` suffix)."""

    layer_prefix: str
    layer_names: Mapping[str, str]
    global_names: Mapping[str, str]


@dataclass(frozen=True)
class ModelFamily:
    """Everything lmserve knows about one model family; hooks return `ModelConfig` fields that
    replace the common reading of a checkpoint's config."""

    architecture: str  # its ModelConfig.architecture
    model_class_path: str  # "module:Class" of its model, built as model_class(config, max_model_len)
    hf_architectures: tuple[str, ...] = ()  # config.json `architectures` entries it answers to
    hf_model_types: tuple[str, ...] = ()  # config.json `model_type`s, for configs without `architectures`
    hf_common_keys: Callable[[dict], dict] | None = None  # config.json with its own key names renamed to Llama's
    config_from_hf: Callable[[dict], dict] | None = None  # (config.json) -> ModelConfig fields
    gguf_architectures: tuple[str, ...] = ()  # GGUF `general.architecture` values it answers to
    gguf_tensor_names: GgufTensorNames | None = None
    gguf_metadata_defaults: Mapping[str, Any] = field(default_factory=dict)  # for keys its files may leave out
    gguf_qk_interleaved: bool = False  # llama.cpp interleaves the rotary halves of q/k rows in these files
    config_from_gguf: Callable[[GgufKey, ModelConfig], dict] | None = None  # (key, common config) -> fields
    chat_template: str | None = None  # for checkpoints that carry none
    quantize_gguf_arch: str | None = None  # what `lmserve quantize` writes it as from a HF directory (None: cannot)
    # (model, engine config) -> the native step for the model runner, or None where it cannot run
    # (`native_fused_decoder` for a model class that describes its layout with `fused_model()`)
    fused_decoder: Callable[[torch.nn.Module, EngineConfig], Any] | None = None
    tensor_parallel: bool = False  # whether its layers split across ranks (lmserve.parallel)

    @property
    def model_class(self) -> type[CausalLM]:
        module, _, name = self.model_class_path.partition(":")
        return getattr(importlib.import_module(module), name)


def native_fused_decoder(model: torch.nn.Module, engine_config: EngineConfig):
    """`models.fused_decoder.build_fused_decoder`, imported when called (it needs PyTorch)."""
    from lmserve.models.fused_decoder import build_fused_decoder

    return build_fused_decoder(model, engine_config)


class UnsupportedArchitectureError(LmserveError):
    """No family answers to a checkpoint's architecture name; the message lists those that do."""


@functools.cache
def families() -> tuple[ModelFamily, ...]:
    """Every family: the `FAMILIES` of each module of `lmserve.models.families`, by module name."""
    import lmserve.models.families as package

    modules = [importlib.import_module(f"{package.__name__}.{info.name}")
               for info in pkgutil.iter_modules(package.__path__)]
    return tuple(family for module in modules for family in vars(module).get("FAMILIES", ()))


# The names a checkpoint or a config may call a family by, per kind of name.
_NAMES: dict[str, Callable[[ModelFamily], tuple[str, ...]]] = {
    "architecture": lambda family: (family.architecture,), "hf": lambda family: family.hf_architectures,
    "hf_model_type": lambda family: family.hf_model_types, "gguf": lambda family: family.gguf_architectures}


@functools.cache
def _by_name(kind: str) -> dict[str, ModelFamily]:
    return {name: family for family in families() for name in _NAMES[kind](family)}


def _unsupported(name: object, kind: str) -> UnsupportedArchitectureError:
    return UnsupportedArchitectureError(f"unsupported architecture {name!r} (supported: {', '.join(_by_name(kind))})")


def _find(kind: str, name: str | None) -> ModelFamily:
    found = _by_name(kind).get(name)
    if found is None:
        raise _unsupported(name, kind)
    return found


def family(architecture: str) -> ModelFamily:
    """The family of a `ModelConfig.architecture`."""
    return _find("architecture", architecture)


def family_for_hf(architectures: list[str], model_type: str | None) -> ModelFamily:
    """The family of a config.json: by its first `architectures` entry that one answers to, or by
    `model_type` when the config lists no architectures."""
    by_name = _by_name("hf")
    found = next((by_name[name] for name in architectures if name in by_name), None)
    if found is None and not architectures:
        found = _by_name("hf_model_type").get(model_type)
    if found is None:
        raise _unsupported(architectures or model_type, "hf")
    return found


def family_for_gguf(arch: str | None) -> ModelFamily:
    """The family of a GGUF file's `general.architecture`."""
    return _find("gguf", arch)
