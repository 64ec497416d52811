"""GGUF key/value metadata as plain Python values (str, int, float, bool and lists of them),
so the config and tokenizer builders never touch the `gguf` package's numpy-backed fields."""

from __future__ import annotations

from gguf import GGUFReader, GGUFValueType
from gguf.gguf_reader import ReaderField


def read_gguf_metadata(reader: GGUFReader) -> dict[str, object]:
    """Every metadata field of `reader`, keyed by its GGUF name."""
    return {name: _field_value(field) for name, field in reader.fields.items()}


def _field_value(field: ReaderField) -> object:
    try:
        return field.contents()
    except UnicodeDecodeError:
        # A few converters wrote token strings that are not valid UTF-8 (lone bytes of a
        # multibyte character); keep the field usable rather than failing the whole load.
        return _lossy_strings(field)


def _lossy_strings(field: ReaderField) -> object:
    def decode(index: int) -> str:
        return field.parts[index].tobytes().decode("utf-8", errors="replace")

    if field.types[0] == GGUFValueType.ARRAY:
        return [decode(index) for index in field.data]
    return decode(len(field.parts) - 1)
