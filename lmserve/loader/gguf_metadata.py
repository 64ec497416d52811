"""GGUF key/value metadata as plain Python values (str, int, float, bool and lists of them):
the types of the keys lmserve reads are checked, so a value of the wrong kind is refused by name.
`gguf_layout.read_gguf` reads the metadata of a file; `read_gguf_metadata` converts the fields of
gguf-py's `GGUFReader` the same way (the reference the tests hold our reader to)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from lmserve.errors import ModelLoadError

if TYPE_CHECKING:
    from gguf import GGUFReader
    from gguf.gguf_reader import ReaderField


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _list_of(check: Callable[[object], bool]) -> Callable[[object], bool]:
    return lambda value: isinstance(value, list) and all(map(check, value))


_COUNT = ("a non-negative integer", lambda value: _is_int(value) and value >= 0)
_POSITIVE = ("a positive integer", lambda value: _is_int(value) and value > 0)
_NUMBER = ("a number", _is_number)
_STRING = ("a string", lambda value: isinstance(value, str))
_BOOL = ("a boolean", lambda value: isinstance(value, bool))
# What each key the loader, the families and the tokenizer read must hold.
_GENERAL_TYPES = {
    "general.architecture": _STRING, "general.name": _STRING, "tokenizer.ggml.model": _STRING,
    "tokenizer.ggml.pre": _STRING, "tokenizer.chat_template": _STRING,
    "tokenizer.ggml.tokens": ("a list of strings", _list_of(lambda value: isinstance(value, str))),
    "tokenizer.ggml.merges": ("a list of strings", _list_of(lambda value: isinstance(value, str))),
    "tokenizer.ggml.token_type": ("a list of integers", _list_of(_is_int)),
    "tokenizer.ggml.scores": ("a list of numbers", _list_of(_is_number)),
    "tokenizer.ggml.add_bos_token": _BOOL, "tokenizer.ggml.add_eos_token": _BOOL,
    "tokenizer.ggml.add_space_prefix": _BOOL,
    **{f"tokenizer.ggml.{name}_token_id": _COUNT for name in ("bos", "eos", "unknown", "padding", "eot", "eom")},
}
# Keys under `<general.architecture>.`
_ARCH_TYPES = {
    "block_count": _POSITIVE, "context_length": _POSITIVE, "embedding_length": _POSITIVE,
    "feed_forward_length": _COUNT, "attention.head_count": _POSITIVE, "attention.head_count_kv": _COUNT,
    "attention.key_length": _COUNT, "attention.value_length": _COUNT, "rope.dimension_count": _COUNT,
    "vocab_size": _COUNT, "attention.sliding_window": _COUNT, "expert_count": _COUNT, "expert_used_count": _COUNT,
    "expert_feed_forward_length": _COUNT, "expert_shared_feed_forward_length": _COUNT,
    "expert_weights_norm": _BOOL, "attention.layer_norm_rms_epsilon": _NUMBER,
    "attention.layer_norm_epsilon": _NUMBER, "rope.freq_base": _NUMBER, "rope.freq_base_swa": _NUMBER,
    "rope.scaling.type": _STRING, "rope.scaling.factor": _NUMBER, "rope.scaling.attn_factor": _NUMBER,
    "rope.scaling.original_context_length": _POSITIVE, "final_logit_softcapping": _NUMBER,
    "attention.sliding_window_pattern": ("a positive integer or a list of booleans", lambda value: (
        _is_int(value) and value > 0) or _list_of(lambda flag: isinstance(flag, bool))(value)),
}


def read_gguf_metadata(reader: GGUFReader) -> dict[str, object]:
    """Every metadata field of gguf-py's `reader`, keyed by its GGUF name."""
    return {name: _field_value(field) for name, field in reader.fields.items()}


def check_metadata_types(meta: dict[str, object], path) -> None:
    """Refuse metadata whose keys that lmserve reads hold a value of the wrong kind."""
    arch = meta.get("general.architecture")
    expected = dict(_GENERAL_TYPES)
    if isinstance(arch, str):
        expected |= {f"{arch}.{name}": kind for name, kind in _ARCH_TYPES.items()}
    for key, (description, check) in expected.items():
        if key in meta and not check(meta[key]):
            shown = repr(meta[key])
            raise ModelLoadError(path, f"GGUF metadata {key!r} must be {description}, got "
                                       f"{shown if len(shown) <= 80 else shown[:77] + '...'}")


def _field_value(field: ReaderField) -> object:
    try:
        return field.contents()
    except UnicodeDecodeError:
        # A few converters wrote token strings that are not valid UTF-8 (lone bytes of a
        # multibyte character); keep the field usable rather than failing the whole load.
        return _lossy_strings(field)


def _lossy_strings(field: ReaderField) -> object:
    from gguf import GGUFValueType

    def decode(index: int) -> str:
        return field.parts[index].tobytes().decode("utf-8", errors="replace")

    if field.types[0] == GGUFValueType.ARRAY:
        return [decode(index) for index in field.data]
    return decode(len(field.parts) - 1)
