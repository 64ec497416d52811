"""The OpenAI wire format: request bodies (validated strictly, their text as valid Unicode), their
`SamplingParams`, response and stream-chunk bodies, logprob blocks and the error body."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from lmserve.errors import InvalidParameterError
from lmserve.sampling_params import BeamSearchParams, SamplingParams

MAX_N = 128
TokenText = Callable[[int], str]


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


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False


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

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def _sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams | BeamSearchParams:
        for field, value in (("n", self.n), ("best_of", self.best_of)):
            if value is not None and value > MAX_N:
                raise InvalidParameterError(field, f"must be at most {MAX_N}, got {value}")
        if self.use_beam_search:
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
            truncate_prompt_tokens=self.truncate_prompt_tokens, speculative=self.speculative)


class CompletionRequest(_SamplingRequest):
    prompt: Text | list[Text] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False

    def prompts(self) -> list[str | list[int]]:
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            return [prompt]
        if not prompt:
            raise InvalidParameterError("prompt", "must not be empty")
        return list(prompt)

    def sampling_params(self) -> SamplingParams:
        if self.echo and self.logprobs is not None:
            raise InvalidParameterError("echo", "echo together with logprobs is not supported")
        return self._sampling_params(self.max_tokens, self.logprobs)


class TextPart(_Request):
    type: Literal["text"]
    text: Text


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None

    def as_dict(self) -> dict:
        content = self.content
        if isinstance(content, list):
            content = "\n".join(part.text for part in content)
        return {"role": self.role, "content": content or ""}


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None

    def message_dicts(self) -> list[dict]:
        if not self.messages:
            raise InvalidParameterError("messages", "must be a non-empty list of {role, content} objects")
        return [m.as_dict() for m in self.messages]

    def sampling_params(self) -> SamplingParams:
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidParameterError("top_logprobs", "requires logprobs to be true")
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


class _Choice(_Body):
    index: int
    logprobs: dict | None = None
    finish_reason: str | None = None


class CompletionChoice(_Choice):
    text: str


class CompletionResponse(_Response):
    """A /v1/completions response, and each chunk of its stream."""
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatMessageOut(_Body):
    role: Literal["assistant"] = "assistant"
    content: str


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


class ChatChunkChoice(_Choice):
    delta: ChatDelta


class ChatCompletionChunk(_Response):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


# ---- logprobs ---------------------------------------------------------------------------------

def completion_logprobs(token_ids: list[int], logprobs: list[dict[int, float]], token_text: TokenText,
                        text_offset: int) -> dict:
    """The legacy completions block: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens, offsets = [], []
    for token in token_ids:
        tokens.append(token_text(token))
        offsets.append(text_offset)
        text_offset += len(tokens[-1])
    return {"tokens": tokens, "token_logprobs": [entry[t] for t, entry in zip(token_ids, logprobs)],
            "top_logprobs": [{token_text(t): lp for t, lp in entry.items()} for entry in logprobs],
            "text_offset": offsets}


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
