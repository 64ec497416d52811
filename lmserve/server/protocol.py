"""The OpenAI wire format: request bodies (validated strictly, their text as valid Unicode), their
`SamplingParams`, response and stream-chunk bodies, logprob blocks and the error body."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from lmserve.errors import InvalidParameterError
from lmserve.sampling_params import BeamSearchParams, SamplingParams, StructuredOutputs

logger = logging.getLogger("lmserve.server")

MAX_N = 128
TokenText = Callable[[int], str]
# The finish reasons OpenAI's clients know. The engine's own "abort" (a request ended by the
# server: its time limit, a shutdown) is reported as "length": the output was cut short by a
# server-side limit, which is what "length" tells a client (the stream ends with an error event
# when the server is shutting down; a non-streamed request over its time limit gets a 504).
FINISH_REASONS = frozenset({"stop", "length", "tool_calls", "content_filter", "function_call"})


def error_body(message: str, type_: str, param: str | None = None, code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# ---- requests ---------------------------------------------------------------------------------

def _unicode(text: str) -> str:
    """JSON can carry a lone surrogate (\\udc80), which no tokenizer or UTF-8 encoder accepts."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"must be valid Unicode text: U+{ord(text[exc.start]):04X} at position {exc.start} "
                         f"is a lone surrogate") from None
    return text


Text = Annotated[str, AfterValidator(_unicode)]


_UNKNOWN_FIELDS_LOGGED: set[str] = set()
_UNKNOWN_FIELDS_LIMIT = 1000  # distinct names remembered (and logged); a client inventing names cannot grow it
_unknown_lock = threading.Lock()


def _warn_unknown_fields(where: str, names) -> None:
    """Log each unknown request field once per process (per object kind and name), at warning level."""
    for name in names:
        key = f"{where}.{name}"
        with _unknown_lock:
            if key in _UNKNOWN_FIELDS_LOGGED or len(_UNKNOWN_FIELDS_LOGGED) > _UNKNOWN_FIELDS_LIMIT:
                continue
            _UNKNOWN_FIELDS_LOGGED.add(key)
            last = len(_UNKNOWN_FIELDS_LOGGED) > _UNKNOWN_FIELDS_LIMIT
        logger.warning("ignoring unknown field %r in %s (logged once per field name%s)", name, where,
                       "; no further unknown fields are logged" if last else "")


class _Request(BaseModel):
    """Known fields are validated strictly. `null` for an optional field means its default, as in
    OpenAI's API. Unknown fields are accepted and ignored, each name logged once (warning)."""
    model_config = ConfigDict(strict=True, extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data):
        if isinstance(data, dict) and None in data.values():
            fields = cls.model_fields
            return {k: v for k, v in data.items()
                    if not (v is None and k in fields and not fields[k].is_required())}
        return data

    @model_validator(mode="after")
    def _log_unknown_fields(self):
        if self.model_extra:
            _warn_unknown_fields(type(self).__name__, self.model_extra)
        return self


class StreamOptions(_Request):
    include_usage: bool = False


class JsonSchemaFormat(_Request):
    name: Text | None = None
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = None
    description: Text | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class _SamplingRequest(_Request):
    model: Text | None = None
    n: int = 1
    best_of: int | None = None  # sample this many per prompt, return the n with the best cumulative logprob
    temperature: float = 1.0
    top_p: float = 1.0
    stop: Text | list[Text] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[Text, float] | None = None
    user: Text | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # extensions
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    truncate_prompt_tokens: int | None = None
    use_beam_search: bool = False  # the n choices are the n best beams
    length_penalty: float = 1.0  # beam search only
    speculative: bool = True  # false: this request opts out of the server's speculative decoding
    xray: bool = False  # per-token inference records in the response (`xray` fields; README "Playground")
    # structured output: OpenAI's response_format, or one of vLLM's guided_* extension fields
    response_format: ResponseFormat | None = None
    guided_json: dict | Text | None = None  # a JSON schema (object or its JSON text)
    guided_regex: Text | None = None
    guided_choice: list[Text] | None = None
    guided_grammar: Text | None = None  # Lark, or GBNF / EBNF (`root ::= ...`)
    # OpenAI fields accepted without effect here (bookkeeping, or nothing to tune on this model)
    store: Any = None
    metadata: Any = None
    service_tier: Any = None
    safety_identifier: Any = None
    prompt_cache_key: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    prediction: Any = None  # predicted outputs only save latency; the output is the same without them

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def structured(self) -> StructuredOutputs | None:
        """The output constraint the request asks for, if any: `response_format` json_object /
        json_schema or one `guided_*` field; two of them → 400 naming both."""
        given: list[tuple[str, StructuredOutputs]] = []

        def constraint(field: str, **spec) -> None:
            try:
                given.append((field, StructuredOutputs(**spec)))
            except InvalidParameterError as exc:  # named by the request's field, not the engine's
                raise InvalidParameterError(field, str(exc).partition(": ")[2]) from None

        fmt = self.response_format
        if fmt is not None and fmt.type == "json_object":
            constraint("response_format", json_object=True)
        elif fmt is not None and fmt.type == "json_schema":
            if fmt.json_schema is None:
                raise InvalidParameterError("response_format", 'type "json_schema" needs a "json_schema" object '
                                                               'holding the "schema"')
            schema = fmt.json_schema.schema_
            constraint("response_format", **({"json_object": True} if schema is None else {"json": schema}))
        if self.guided_json is not None:
            constraint("guided_json", json=self.guided_json)
        if self.guided_regex is not None:
            constraint("guided_regex", regex=self.guided_regex)
        if self.guided_choice is not None:
            constraint("guided_choice", choice=list(self.guided_choice))
        if self.guided_grammar is not None:
            constraint("guided_grammar", grammar=self.guided_grammar)
        if len(given) > 1:
            raise InvalidParameterError(given[1][0], f"{given[0][0]} and {given[1][0]} both constrain the output; "
                                                     f"send at most one of them")
        return given[0][1] if given else None

    def _sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams | BeamSearchParams:
        for field, value in (("n", self.n), ("best_of", self.best_of)):
            if value is not None and value > MAX_N:
                raise InvalidParameterError(field, f"must be at most {MAX_N}, got {value}")
        structured = self.structured()
        if self.use_beam_search:
            if structured is not None:
                raise InvalidParameterError("use_beam_search", "is not supported with structured output "
                                                               "(response_format / guided_*)")
            if self.best_of is not None:
                raise InvalidParameterError("best_of", "is not supported with use_beam_search (n beams are kept)")
            if max_tokens is None:
                raise InvalidParameterError("max_tokens", "is required with use_beam_search")
            return BeamSearchParams(beam_width=self.n, max_tokens=max_tokens, length_penalty=self.length_penalty,
                                    ignore_eos=self.ignore_eos, temperature=self.temperature)
        return SamplingParams(
            n=self.n, best_of=self.best_of, max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
            top_k=self.top_k, min_p=self.min_p, repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty, seed=self.seed,
            stop=self.stop, ignore_eos=self.ignore_eos, logprobs=logprobs, logit_bias=self.logit_bias,
            truncate_prompt_tokens=self.truncate_prompt_tokens, speculative=self.speculative, structured=structured,
            xray=self.xray)


class CompletionRequest(_SamplingRequest):
    prompt: Text | list[Text] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # 0: nothing generated (with echo: the prompt and its logprobs)
    logprobs: int | None = None
    echo: bool = False
    suffix: Text | None = None  # known, not supported: 400 when not empty

    def prompts(self) -> list[str | list[int]]:
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            return [prompt]
        if not prompt:
            raise InvalidParameterError("prompt", "must not be empty")
        return list(prompt)

    def sampling_params(self) -> SamplingParams:
        """The engine's parameters; with max_tokens 0 (nothing to generate) those of one token,
        so that every other field is still checked."""
        if self.suffix:
            raise InvalidParameterError("suffix", "is not supported (this server does not insert text)")
        return self._sampling_params(1 if self.max_tokens == 0 else self.max_tokens, self.logprobs)


class TextPart(_Request):
    type: Literal["text"]
    text: Text


class FunctionCall(_Request):
    name: Text
    arguments: Text  # a JSON object as text


class ToolCall(_Request):
    """A call in an assistant message of the history."""
    id: Text | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]  # developer: OpenAI's newer name for system
    content: Text | list[TextPart] | None = None
    name: Text | None = None
    tool_calls: list[ToolCall] | None = None  # assistant: the calls it made (content may then be null)
    tool_call_id: Text | None = None  # tool: the call this message answers

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, content):
        """Name the first part that is not text (an image, audio, a file), rather than the union's errors."""
        if isinstance(content, list):
            for i, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if isinstance(kind, str) and kind != "text":
                    raise ValueError(f"content part {i} has type {kind!r}, which this server does not support "
                                     f"(only \"text\" parts)")
        return content

    def as_dict(self) -> dict:
        content = self.content
        if isinstance(content, list):
            content = "\n".join(part.text for part in content)
        message = {"role": "system" if self.role == "developer" else self.role, "content": content or ""}
        if self.tool_calls:
            message["tool_calls"] = [call.model_dump(include={"id", "type", "function"}) for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.name is not None and self.role == "tool":
            message["name"] = self.name
        return message


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    # tool calling (checked by server/tools.py): [{"type": "function", "function": {...}}], "none" |
    # "auto" | "required" | {"type": "function", "function": {"name": ...}}
    tools: list[dict] | None = None
    tool_choice: Text | dict | None = None
    parallel_tool_calls: bool | None = None
    # known, not supported: 400 when asked for
    audio: Any = None
    modalities: Any = None
    web_search_options: Any = None

    def message_dicts(self) -> list[dict]:
        if not self.messages:
            raise InvalidParameterError("messages", "must be a non-empty list of {role, content} objects")
        return [m.as_dict() for m in self.messages]

    def sampling_params(self) -> SamplingParams:
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidParameterError("top_logprobs", "requires logprobs to be true")
        if self.audio is not None:
            raise InvalidParameterError("audio", "audio output is not supported")
        if self.modalities is not None and self.modalities != ["text"]:
            raise InvalidParameterError("modalities", f'only ["text"] is supported, got {self.modalities!r}')
        if self.web_search_options is not None:
            raise InvalidParameterError("web_search_options", "web search is not supported")
        return self._sampling_params(max_tokens, (self.top_logprobs or 0) if self.logprobs else None)


class TokenizeRequest(_Request):
    model: Text | None = None
    prompt: Text | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Request):
    model: Text | None = None
    tokens: list[int]


class LoadLoRAAdapterRequest(_Request):
    lora_name: Text
    lora_path: Text


class UnloadLoRAAdapterRequest(_Request):
    lora_name: Text
    lora_int_id: int | None = None  # accepted as vLLM's clients send it; the name decides


# ---- responses and stream chunks ----------------------------------------------------------------
# The non-streamed bodies and the server-sent chunks of /v1/completions and /v1/chat/completions.
# A completions stream chunk has the shape of the completions response; chat has a chunk model of
# its own. In a stream, `usage` is null in every chunk but the last when the client asked for
# usage (`stream_options.include_usage`) and absent otherwise: the app leaves it out when dumping.

def _omitted_when_none():
    return Field(None, exclude_if=lambda value: value is None)


class _Body(BaseModel):
    # Non-finite floats (logprobs) are written as json.dumps writes them, not as null.
    model_config = ConfigDict(ser_json_inf_nan="constants")


class Usage(_Body):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class _Response(_Body):
    id: str
    object: str
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str | None = None  # the serving configuration (model, weights, engine build)
    xray: dict | None = _omitted_when_none()  # extension ("xray": true): the prompt's record, first chunk only


def openai_finish_reason(reason: str | None) -> str | None:
    """The engine's finish reason as one OpenAI's clients know (see FINISH_REASONS)."""
    return reason if reason is None or reason in FINISH_REASONS else "length"


class _Choice(_Body):
    index: int
    logprobs: dict | None = None
    finish_reason: Annotated[str | None, AfterValidator(openai_finish_reason)] = None
    xray: list[dict] | None = _omitted_when_none()  # extension ("xray": true): per generated token records


class CompletionChoice(_Choice):
    text: str


class CompletionResponse(_Response):
    """A /v1/completions response, and each chunk of its stream."""
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatMessageOut(_Body):
    role: Literal["assistant"] = "assistant"
    content: str | None  # null when the whole output was tool calls
    tool_calls: list[dict] | None = _omitted_when_none()  # [{"id", "type": "function", "function": {...}}]


class ChatChoice(_Choice):
    message: ChatMessageOut


class ChatCompletionResponse(_Response):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(_Body):
    """The role in a choice's first chunk, then its new text; either is left out when None."""
    role: Literal["assistant"] | None = _omitted_when_none()
    content: str | None = _omitted_when_none()
    tool_calls: list[dict] | None = _omitted_when_none()  # [{"index", "id"?, "type"?, "function": {...}}]


class ChatChunkChoice(_Choice):
    delta: ChatDelta


class ChatCompletionChunk(_Response):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


# ---- logprobs ---------------------------------------------------------------------------------

def completion_logprobs(token_ids: list[int], logprobs: list[dict[int, float] | None], token_text: TokenText,
                        text_offset: int) -> dict:
    """The legacy completions block: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens, offsets = [], []
    for token in token_ids:
        tokens.append(token_text(token))
        offsets.append(text_offset)
        text_offset += len(tokens[-1])
    return {"tokens": tokens,
            "token_logprobs": [None if entry is None else entry[t] for t, entry in zip(token_ids, logprobs)],
            "top_logprobs": [None if entry is None else {token_text(t): lp for t, lp in entry.items()}
                             for entry in logprobs],
            "text_offset": offsets}


def joined_logprobs(first: dict | None, second: dict | None) -> dict | None:
    """Two legacy completions blocks (the echoed prompt's, then the completion's) as one."""
    if first is None or second is None:
        return first if second is None else second
    return {key: first[key] + second[key] for key in first}


def chat_logprobs(token_ids: list[int], logprobs: list[dict[int, float]], token_text: TokenText,
                  top_n: int) -> dict:
    """The chat block: per token its text, logprob, UTF-8 bytes and the `top_n` best alternatives."""
    def item(token: int, logprob: float) -> dict:
        text = token_text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    content = []
    for token, entry in zip(token_ids, logprobs):
        best = sorted(entry.items(), key=lambda kv: -kv[1])[:top_n]
        content.append({**item(token, entry[token]), "top_logprobs": [item(t, lp) for t, lp in best]})
    return {"content": content}
