"""Streaming text out of generated tokens.

:class:`IncrementalDetokenizer` turns each new token id into the text it adds, never splitting
a UTF-8 character, at constant cost per token. :class:`StopStringMatcher` cuts the text stream
at the first stop string, holding back only what could still turn out to begin one.
"""

from __future__ import annotations

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Text deltas for a growing sequence of generated token ids.

    Each step decodes only a short window: the tokens whose text was already emitted last time
    (`prefix`..`read`) plus the new ones (`read`..end), and emits what the new ones add. The
    window starts on the last prompt tokens, so a SentencePiece word-start space on the first
    output token is kept as the continuation of the prompt (`decode` of the output alone would
    strip it). For byte-level vocabularies the deltas concatenate to `tokenizer.decode(output)`.
    """

    PROMPT_CONTEXT = 5  # prompt tokens decoded with the first output tokens
    _COMPACT_AFTER = 256  # drop ids before the window once this many have piled up

    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids = list(prompt_token_ids[-self.PROMPT_CONTEXT:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._prefix_text: str | None = None

    def add(self, token_id: int) -> str:
        """Append one generated token; return the text it completes ('' while a character is
        still incomplete or the token adds no visible text)."""
        self._ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """Text still held back at the end of generation (an unfinished character shows as U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        prefix_text = self._window_prefix_text()
        new_text = self._decode(self._ids[self._prefix_offset:])
        # A trailing U+FFFD is (usually) the first bytes of a character whose rest is coming.
        if len(new_text) <= len(prefix_text) or (new_text.endswith(REPLACEMENT_CHAR) and not final):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self._prefix_text = None
        self._compact()
        return new_text[len(prefix_text):]

    def _window_prefix_text(self) -> str:
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        return self._prefix_text

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def _compact(self) -> None:
        if self._prefix_offset >= self._COMPACT_AFTER:
            del self._ids[:self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0


class StopStringMatcher:
    """Cuts a stream of text deltas at the first stop string; the stop itself is not emitted.

    When several stops occur, the one that completes first in the stream wins (then the one
    starting first), so the result does not depend on how the text was split into deltas.
    """

    def __init__(self, stops: list[str]):
        self.stops = [stop for stop in stops if stop]
        self.max_held = max((len(stop) for stop in self.stops), default=1) - 1
        self.matched: str | None = None  # the stop string that ended the stream
        self._held = ""

    @property
    def stopped(self) -> bool:
        return self.matched is not None

    def feed(self, delta: str) -> tuple[str, bool]:
        """Return (text safe to emit now, whether a stop string was reached)."""
        if self.stopped:
            return "", True
        text = self._held + delta
        match = self._first_match(text)
        if match is not None:
            start, stop = match
            self.matched = stop
            self._held = ""
            return text[:start], True
        keep = self._partial_stop_suffix(text)
        self._held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], False

    def flush(self) -> str:
        """Release the held-back text (generation ended for another reason)."""
        held, self._held = self._held, ""
        return held

    def _first_match(self, text: str) -> tuple[int, str] | None:
        best = None  # (end, start, stop)
        for stop in self.stops:
            start = text.find(stop)
            if start >= 0:
                candidate = (start + len(stop), start, stop)
                best = candidate if best is None or candidate[:2] < best[:2] else best
        return None if best is None else (best[1], best[2])

    def _partial_stop_suffix(self, text: str) -> int:
        """Length of the longest tail of `text` that begins some stop string."""
        for length in range(min(self.max_held, len(text)), 0, -1):
            tail = text[-length:]
            if any(stop.startswith(tail) for stop in self.stops):
                return length
        return 0
