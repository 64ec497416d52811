"""Structured output: constrained decoding with a grammar engine behind one small interface.

A request's `StructuredOutputs` (JSON schema, any JSON object, regex, choice, Lark/GBNF grammar)
is compiled once per distinct constraint text (LRU cache) by a `GrammarBackend`; each sequence
gets its own `GrammarMatcher` holding the parse state. Every step the engine asks the backend
for the token bitmasks of the batch's constrained rows (one int32 bit per vocabulary entry, 1 =
allowed) on a worker thread while the forward runs, the sampler sends forbidden tokens to -inf,
and the output processor advances the matcher with the chosen token; a matcher that can take no
further token ends its sequence with finish_reason "stop".

The backend here is llguidance (Rust, no model-specific code; it reads the tokenizer's own
`tokenizer.json` text). Another engine (xgrammar, outlines-core) fits by implementing
`GrammarBackend` and `GrammarMatcher`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

import torch

from lmserve.errors import InvalidParameterError
from lmserve.sampling_params import StructuredOutputs

logger = logging.getLogger("lmserve")

FIELD = "structured_outputs"
CACHE_SIZE = 256  # compiled constraints kept
# JSON is generated in one layout, json.dumps' (`{"a": 1, "b": [2, 3]}`): free whitespace lets a
# small model wander through newlines and spaces. A schema's own "x-guidance" settings win.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarMatcher(Protocol):
    """The parse state of one sequence under its constraint."""

    def accept(self, token_id: int) -> bool:
        """Advance by the sampled token; False if the constraint does not allow it."""

    def is_terminated(self) -> bool:
        """Whether the constraint allows no further token (the output is complete)."""

    def copy(self) -> GrammarMatcher:
        """An independent matcher in the same state."""


class GrammarBackend(Protocol):
    def compile(self, spec: StructuredOutputs) -> GrammarMatcher:
        """A fresh matcher for `spec`; raises InvalidParameterError naming what does not compile."""

    def fill_masks(self, matchers: list[GrammarMatcher], bitmask: torch.Tensor) -> None:
        """Write each matcher's allowed-token bits into the same row of `bitmask` ([N, words] int32)."""


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


_BITS = (torch.ones(32, dtype=torch.int64) << torch.arange(32)).to(torch.int32)  # bit j of a word


def forbidden_tokens(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[N, words] int32 bitmask → [N, vocab_size] bool, True where the token is not allowed."""
    clear = (bitmask.unsqueeze(-1) & _BITS.to(bitmask.device)) == 0
    return clear.view(bitmask.shape[0], -1)[:, :vocab_size]


# ---- llguidance ----------------------------------------------------------------------------------

class _LLGuidanceMatcher:
    def __init__(self, matcher):
        self.matcher = matcher

    def accept(self, token_id: int) -> bool:
        return bool(self.matcher.consume_token(token_id))

    def is_terminated(self) -> bool:
        return bool(self.matcher.is_stopped())

    def copy(self) -> _LLGuidanceMatcher:
        return _LLGuidanceMatcher(self.matcher.deep_copy())


class LLGuidanceBackend:
    """Constraints compiled by llguidance against the model's tokenizer."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: frozenset[int]):
        import llguidance  # imported on first use: most requests never need it

        self._llg = llguidance
        start = time.perf_counter()
        # The tokenizer's own JSON (from tokenizer.json or built from GGUF metadata); vocab_size is
        # the model's logits width, which may exceed the tokenizer's (padding rows stay forbidden).
        self.tokenizer = llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size,
                                                eos_token=sorted(stop_token_ids))
        self.executor = llguidance.LLExecutor()
        self._cache: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.Lock()
        logger.info("structured output: llguidance %s ready in %.2f s", llguidance.get_version(),
                    time.perf_counter() - start)

    def compile(self, spec: StructuredOutputs) -> GrammarMatcher:
        grammar = self._grammar_text(spec)
        with self._lock:
            template = self._cache.get(grammar)
            if template is None:
                template = self._llg.LLMatcher(self.tokenizer, grammar)
                if template.is_error():
                    raise InvalidParameterError(FIELD, f"{_kind(spec)} does not compile: {template.get_error()}")
                self._cache[grammar] = template
                if len(self._cache) > CACHE_SIZE:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(grammar)
            return _LLGuidanceMatcher(template.deep_copy())

    def fill_masks(self, matchers: list[GrammarMatcher], bitmask: torch.Tensor) -> None:
        assert bitmask.dtype == torch.int32 and bitmask.is_contiguous() and bitmask.device.type == "cpu"
        self.executor.unsafe_compute_mask_ptr([(m.matcher, i) for i, m in enumerate(matchers)],
                                              bitmask.data_ptr(), bitmask.shape[1] * 4, bitmask.shape[0])

    def _grammar_text(self, spec: StructuredOutputs) -> str:
        """The llguidance grammar for `spec` (also the cache key)."""
        build = self._llg.LLMatcher
        try:
            if spec.json is not None:
                schema = spec.json if isinstance(spec.json, str) else json.dumps(spec.json)
                json.loads(schema)  # llguidance reports bad JSON text less clearly
                return build.grammar_from_json_schema(schema, defaults=JSON_LAYOUT)
            if spec.json_object:
                return build.grammar_from_json_schema('{"type": "object"}', defaults=JSON_LAYOUT)
            if spec.regex is not None:
                return build.grammar_from_regex(spec.regex)
            if spec.choice is not None:
                return build.grammar_from_lark("start: " + " | ".join(json.dumps(c, ensure_ascii=False)
                                                                      for c in spec.choice))
            from llguidance.gbnf_to_lark import any_to_lark  # GBNF (`root ::= ...`) → Lark; Lark as is
            return build.grammar_from_lark(any_to_lark(spec.grammar))
        except InvalidParameterError:
            raise
        except Exception as exc:  # json.JSONDecodeError, GbnfToLarkError, ValueError from the Rust side
            raise InvalidParameterError(FIELD, f"{_kind(spec)} is invalid: {exc}") from None


def _kind(spec: StructuredOutputs) -> str:
    if spec.json is not None:
        return "the JSON schema"
    if spec.json_object:
        return "the JSON object constraint"
    return {"regex": "the regex", "choice": "the choice list"}.get(
        next(n for n in ("regex", "choice", "grammar") if getattr(spec, n) is not None), "the grammar")


# ---- per-step masks ------------------------------------------------------------------------------

class StructuredOutputManager:
    """Compiles constraints for new sequences and computes a step's bitmasks off the main thread."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: frozenset[int]):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = stop_token_ids
        self._backend: GrammarBackend | None = None
        self._worker: ThreadPoolExecutor | None = None
        self.mask_seconds = 0.0  # time spent computing masks (on the worker thread)
        self.num_masks = 0  # sequence masks computed
        self.num_batches = 0  # mask batches computed (one per step with constrained rows, plus forks)
        self.wait_seconds = 0.0  # time the engine thread waited for a submitted batch (not hidden by the forward)

    @property
    def backend(self) -> GrammarBackend:
        if self._backend is None:
            if self.tokenizer is None:
                raise InvalidParameterError(FIELD, "this model has no tokenizer, so output cannot be constrained")
            self._backend = LLGuidanceBackend(self.tokenizer, self.vocab_size, self.stop_token_ids)
        return self._backend

    def compile(self, spec: StructuredOutputs) -> GrammarMatcher:
        return self.backend.compile(spec)

    def submit(self, matchers: list[GrammarMatcher]) -> Future:
        """Start computing the bitmasks of `matchers` (rows in that order) on the worker thread."""
        if self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmserve-grammar")
        return self._worker.submit(self.masks, matchers)

    def result(self, future: Future) -> torch.Tensor:
        """The bitmask `submit` started, waiting for it if the worker is not done (counted in wait_seconds)."""
        start = time.perf_counter()
        bitmask = future.result()
        self.wait_seconds += time.perf_counter() - start
        return bitmask

    def masks(self, matchers: list[GrammarMatcher]) -> torch.Tensor:
        start = time.perf_counter()
        bitmask = torch.zeros(len(matchers), bitmask_words(self.vocab_size), dtype=torch.int32)
        if matchers:
            self.backend.fill_masks(matchers, bitmask)
        self.mask_seconds += time.perf_counter() - start
        self.num_masks += len(matchers)
        self.num_batches += 1
        return bitmask
