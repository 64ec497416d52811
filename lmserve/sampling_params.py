"""Per-request sampling parameters (`SamplingParams`), validated at construction.

Every bad value raises :class:`InvalidParameterError` naming the field and its allowed range,
so the CLI and the server can report it to the user as is.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from lmserve.errors import InvalidParameterError

# Temperatures below this are treated as greedy: dividing logits by them overflows float32.
GREEDY_TEMPERATURE = 1e-5
# Above this the distribution is uniform for any practical purpose; larger values are mistakes.
MAX_TEMPERATURE = 100.0
MAX_LOGPROBS = 20
_SEED_RANGE = (-(2**63), 2**63 - 1)


def _integer(field: str, value, allowed: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidParameterError(field, f"must be an integer {allowed}, got {value!r}")
    return int(value)


def _number(field: str, value, allowed: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
        raise InvalidParameterError(field, f"must be a number {allowed}, got {value!r}")
    return float(value)


def _check(field: str, ok: bool, allowed: str, value) -> None:
    if not ok:
        raise InvalidParameterError(field, f"must be {allowed}, got {value!r}")


def _temperature(value) -> float:
    value = _number("temperature", value, ">= 0")
    _check("temperature", 0 <= value < math.inf, "a finite number >= 0", value)
    _check("temperature", value <= MAX_TEMPERATURE, f"at most {MAX_TEMPERATURE:g}", value)
    return value


def _flag(field: str, value) -> bool:
    if not isinstance(value, bool):
        raise InvalidParameterError(field, f"must be true or false, got {value!r}")
    return value


def _stop_strings(value) -> list[str]:
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(s, str) for s in items):
        raise InvalidParameterError("stop", f"must be a string or a list of strings, got {value!r}")
    if any(s == "" for s in items):
        raise InvalidParameterError("stop", "must not contain empty strings")
    return list(items)


def _stop_token_ids(value) -> list[int]:
    if value is None:
        return []
    if not isinstance(value, (list, tuple, set, frozenset)):
        raise InvalidParameterError("stop_token_ids", f"must be a list of integers >= 0, got {value!r}")
    ids = [_integer("stop_token_ids", t, ">= 0") for t in value]
    for t in ids:
        _check("stop_token_ids", t >= 0, "a list of integers >= 0", t)
    return ids


def _logit_bias(value) -> dict[int, float] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidParameterError("logit_bias", f"must be a mapping of token id to bias, got {value!r}")
    bias = {}
    for key, amount in value.items():
        if isinstance(key, str) and key.isascii() and key.isdigit():
            key = int(key)  # JSON object keys are always strings
        if isinstance(key, bool) or not isinstance(key, numbers.Integral) or key < 0:
            raise InvalidParameterError("logit_bias", f"keys must be token ids (integers >= 0), got {key!r}")
        amount = _number("logit_bias", amount, "in [-100, 100]")
        _check("logit_bias", -100 <= amount <= 100, f"in [-100, 100] (token {key})", amount)
        bias[int(key)] = amount
    return bias


@dataclass
class StructuredOutputs:
    """A constraint on what a request may generate; exactly one field is set.

    json: a JSON schema (dict or its JSON text); json_object: any JSON object; regex: a regular
    expression the whole output matches; choice: one of these strings; grammar: a Lark grammar
    (llguidance's dialect) or a GBNF/EBNF one (`root ::= ...`). A constraint that does not
    compile is refused when the request is added (InvalidParameterError naming the problem).
    """

    json: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        field = "structured_outputs"
        self.json_object = _flag(f"{field}.json_object", self.json_object)
        chosen = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        chosen += ["json_object"] if self.json_object else []
        if len(chosen) != 1:
            raise InvalidParameterError(field, "set exactly one of json, json_object, regex, choice, grammar"
                                               f" (got {', '.join(chosen) or 'none'})")
        if self.json is not None and not isinstance(self.json, (dict, str)):
            raise InvalidParameterError(f"{field}.json", f"must be a JSON schema object or its text, got {self.json!r}")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise InvalidParameterError(f"{field}.{name}", f"must be a non-empty string, got {value!r}")
        if self.choice is not None:
            if not isinstance(self.choice, (list, tuple)) or not self.choice \
                    or not all(isinstance(c, str) and c for c in self.choice):
                raise InvalidParameterError(f"{field}.choice", f"must be a non-empty list of non-empty strings, "
                                                               f"got {self.choice!r}")
            self.choice = list(self.choice)


@dataclass
class SamplingParams:
    """How to pick tokens for one request, and when to stop.

    temperature 0 (or below 1e-5) means greedy decoding; top_k 0 or -1 and top_p 1 disable
    those filters; max_tokens None means "up to the model's context limit".
    """

    n: int = 1
    best_of: int | None = None  # sample this many (>= n) and return the n with the best cumulative logprob
    max_tokens: int | None = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    logit_bias: dict[int, float] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    truncate_prompt_tokens: int | None = None  # keep only the last k prompt tokens
    speculative: bool = True  # False: this request opts out of the engine's speculative decoding
    structured: StructuredOutputs | None = None  # constrain the output (JSON schema, regex, choice, grammar)
    xray: bool = False  # record per-token inference details for this request (engine/xray.py)

    def __post_init__(self) -> None:
        self._validate_lengths()
        self._validate_sampling()
        self.stop = _stop_strings(self.stop)
        self.stop_token_ids = _stop_token_ids(self.stop_token_ids)
        self.logit_bias = _logit_bias(self.logit_bias)
        self.ignore_eos = _flag("ignore_eos", self.ignore_eos)
        self.skip_special_tokens = _flag("skip_special_tokens", self.skip_special_tokens)
        self.include_stop_str_in_output = _flag("include_stop_str_in_output", self.include_stop_str_in_output)
        self.speculative = _flag("speculative", self.speculative)
        self.xray = _flag("xray", self.xray)
        if self.structured is not None and not isinstance(self.structured, StructuredOutputs):
            raise InvalidParameterError("structured_outputs", f"must be a StructuredOutputs, got {self.structured!r}")

    def _validate_lengths(self) -> None:
        self.n = _integer("n", self.n, ">= 1")
        _check("n", self.n >= 1, ">= 1", self.n)
        if self.best_of is not None:
            self.best_of = _integer("best_of", self.best_of, f">= n ({self.n})")
            _check("best_of", self.best_of >= self.n, f">= n ({self.n}) (or None)", self.best_of)
        if self.max_tokens is not None:
            self.max_tokens = _integer("max_tokens", self.max_tokens, ">= 1 (or None)")
            _check("max_tokens", self.max_tokens >= 1, ">= 1 (or None for the context limit)", self.max_tokens)
        self.min_tokens = _integer("min_tokens", self.min_tokens, ">= 0")
        _check("min_tokens", self.min_tokens >= 0, ">= 0", self.min_tokens)
        if self.max_tokens is not None:
            _check("min_tokens", self.min_tokens <= self.max_tokens,
                   f"<= max_tokens ({self.max_tokens})", self.min_tokens)
        if self.truncate_prompt_tokens is not None:
            self.truncate_prompt_tokens = _integer("truncate_prompt_tokens", self.truncate_prompt_tokens, ">= 1")
            _check("truncate_prompt_tokens", self.truncate_prompt_tokens >= 1, ">= 1 (or None)",
                   self.truncate_prompt_tokens)
        if self.logprobs is not None:
            self.logprobs = _integer("logprobs", self.logprobs, f"in [0, {MAX_LOGPROBS}]")
            _check("logprobs", 0 <= self.logprobs <= MAX_LOGPROBS, f"in [0, {MAX_LOGPROBS}] (or None)", self.logprobs)
        if self.seed is not None:
            self.seed = _integer("seed", self.seed, "in [-2**63, 2**63 - 1] (or None)")
            _check("seed", _SEED_RANGE[0] <= self.seed <= _SEED_RANGE[1], "in [-2**63, 2**63 - 1] (or None)",
                   self.seed)

    def _validate_sampling(self) -> None:
        self.temperature = _temperature(self.temperature)
        self.top_k = _integer("top_k", self.top_k, ">= 1 (or 0 / -1 to disable)")
        _check("top_k", self.top_k >= -1, ">= 1 (or 0 / -1 to disable)", self.top_k)
        self.top_p = _number("top_p", self.top_p, "in (0, 1]")
        _check("top_p", 0 < self.top_p <= 1, "in (0, 1]", self.top_p)
        self.min_p = _number("min_p", self.min_p, "in [0, 1]")
        _check("min_p", 0 <= self.min_p <= 1, "in [0, 1]", self.min_p)
        self.repetition_penalty = _number("repetition_penalty", self.repetition_penalty, "> 0")
        _check("repetition_penalty", 0 < self.repetition_penalty < math.inf, "a finite number > 0",
               self.repetition_penalty)
        for field in ("frequency_penalty", "presence_penalty"):
            value = _number(field, getattr(self, field), "in [-2, 2]")
            _check(field, -2 <= value <= 2, "in [-2, 2]", value)
            setattr(self, field, value)

    @property
    def num_samples(self) -> int:
        """Sequences generated for the request: best_of, or n."""
        return self.best_of or self.n

    @property
    def greedy(self) -> bool:
        """Whether the request always takes the most likely token (temperature effectively 0)."""
        return self.temperature < GREEDY_TEMPERATURE


@dataclass
class BeamSearchParams:
    """Beam search with transformers' `generate(num_beams=beam_width, do_sample=False)` rules.

    A finished hypothesis scores cum_logprob / (generated tokens ** length_penalty).
    early_stopping: True stops once beam_width hypotheses are finished; False stops when the best
    running beam, scored at its current length, cannot beat the worst finished one; "never"
    scores it at max_tokens when length_penalty > 0. temperature > 0 divides the logits before
    the log-softmax; 0 uses the model's log-probabilities as they are.
    """

    beam_width: int
    max_tokens: int = 16
    length_penalty: float = 1.0
    ignore_eos: bool = False
    temperature: float = 0.0
    early_stopping: bool | str = False

    def __post_init__(self) -> None:
        self.beam_width = _integer("beam_width", self.beam_width, ">= 1")
        _check("beam_width", self.beam_width >= 1, ">= 1", self.beam_width)
        self.max_tokens = _integer("max_tokens", self.max_tokens, ">= 1")
        _check("max_tokens", self.max_tokens >= 1, ">= 1", self.max_tokens)
        self.length_penalty = _number("length_penalty", self.length_penalty, "(finite)")
        _check("length_penalty", math.isfinite(self.length_penalty), "a finite number", self.length_penalty)
        self.ignore_eos = _flag("ignore_eos", self.ignore_eos)
        self.temperature = _temperature(self.temperature)
        _check("early_stopping", isinstance(self.early_stopping, bool) or self.early_stopping == "never",
               'true, false or "never"', self.early_stopping)

    @property
    def n(self) -> int:
        """Sequences returned: the beam_width best hypotheses."""
        return self.beam_width
