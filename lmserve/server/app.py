"""The OpenAI-compatible FastAPI app: routes, error handlers, admission and SSE (the API-key and
body-size guard and `ApiError` are in `middleware.py`, the OpenAPI corrections in `openapi.py`).

`build_app` wraps an engine in an `AsyncEngine` and serves `/v1/completions`,
`/v1/chat/completions` (both optionally streamed as server-sent events), `/v1/models` (and
`/v1/models/{id}`; LoRA adapters are models of their own, `adapters.py`, loaded and unloaded at
`/v1/load_lora_adapter` and `/v1/unload_lora_adapter`), `/tokenize`, `/detokenize`, `/tokenizer_info`, `/health` and `/metrics`.
Before any body is read, a middleware checks the API key (every route but `GET /health`) and
the body size (413). Every user error becomes an OpenAI error body with a 4xx status, and an
unexpected exception a 500 one, the connection staying usable; a full waiting queue answers 429
with Retry-After. Tokenizing, chat templates and detokenizing run in worker threads, so the event
loop keeps answering. `serve` runs the app under uvicorn and, on SIGTERM/SIGINT, aborts the
requests in flight (their streams end with finish_reason "length" and an error event) before
uvicorn drains. Finish reasons are only
OpenAI's (`protocol.FINISH_REASONS`): a request cut short by the server reports "length".
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.metadata
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmserve.config import DEFAULT_MAX_WAITING, DEFAULT_REQUEST_TIMEOUT, parse_bytes
from lmserve.engine.factory import create_engine
from lmserve.engine.llm_engine import LLMEngine
from lmserve.engine.xray import TIMELINE_STEPS, TIMELINE_WATCH_SECONDS
from lmserve.errors import ContextLengthError, LmserveError
from lmserve.lora import LoRARequest
from lmserve.outputs import CompletionOutput, RequestOutput
from lmserve.sampling_params import BeamSearchParams, SamplingParams
from lmserve.server import protocol as proto
from lmserve.server import tools
from lmserve.server.adapters import ServedAdapters
from lmserve.server.async_engine import (AsyncEngine, EngineUnavailableError,
                                         RequestTimeoutError)
from lmserve.server.metrics import ServerMetrics
from lmserve.server.middleware import ApiError, CountStatus, Guard
from lmserve.server.openapi import openapi

logger = logging.getLogger("lmserve.server")

RETRY_AFTER_SECONDS = 1
try:
    _VERSION = importlib.metadata.version("lmserve")
except importlib.metadata.PackageNotFoundError:
    _VERSION = "unknown"
DEFAULT_MAX_BODY_SIZE = 4 * 2**20
STATIC_DIR = Path(__file__).parent / "static"  # the playground page (served at / and /static)


def _fingerprint(engine: LLMEngine) -> str:
    """OpenAI's `system_fingerprint`: changes with the weights file, the engine options and lmserve's version."""
    path = Path(engine.checkpoint.path)
    stat = path.stat() if path.exists() else None
    identity = f"{_VERSION}|{path}|{stat and (stat.st_size, stat.st_mtime_ns)}|{engine.config}"
    return "fp_" + hashlib.sha256(identity.encode()).hexdigest()[:12]


class _Server:
    """Per-app state shared by the route handlers."""

    def __init__(self, engine: AsyncEngine, metrics: ServerMetrics, model_name: str, max_waiting: int,
                 request_timeout: float | None):
        self.engine, self.metrics, self.model_name = engine, metrics, model_name
        self.adapters = ServedAdapters(engine, model_name)
        self.max_waiting, self.request_timeout = max_waiting, request_timeout
        self.tokenizer = engine.engine.tokenizer
        self.max_model_len = engine.engine.max_model_len
        self.max_num_seqs = engine.engine.config.max_num_seqs
        self.fingerprint = _fingerprint(engine.engine)

    def check_model(self, model: str | None) -> LoRARequest | None:
        """The LoRA adapter that `model` names (None: the base model); 404 for a model not served."""
        if model is None or model == self.model_name:
            return None
        lora = self.adapters.by_name.get(model)
        if lora is None:
            served = ", ".join(repr(name) for name in [self.model_name, *self.adapters.by_name])
            raise ApiError(404, f"the model {model!r} does not exist; this server serves {served}",
                           param="model", code="model_not_found")
        return lora

    def require_tokenizer(self, param: str):
        if self.tokenizer is None:
            raise ApiError(400, "this model has no tokenizer; send token ids", param=param)
        return self.tokenizer

    def check_fits(self, num_prompts: int, params: SamplingParams | BeamSearchParams, prompt_param: str) -> None:
        """400 for a request that no amount of waiting would let in: more prompts than may wait
        or run at once, or more sequences per prompt than the engine runs at once."""
        if num_prompts > 1 and num_prompts > self.max_waiting:
            raise ApiError(400, f"{num_prompts} prompts in one request exceed the limit of {self.max_waiting} "
                                f"waiting requests (--max-waiting)", param=prompt_param)
        if num_prompts > self.max_num_seqs:
            raise ApiError(400, f"{num_prompts} prompts in one request exceed the engine's max_num_seqs "
                                f"({self.max_num_seqs})", param=prompt_param)
        best_of = getattr(params, "best_of", None)
        field, width = ("best_of", best_of) if best_of else ("n", params.n)
        if width > self.max_num_seqs:
            raise ApiError(400, f"{field}: {width} sequences per prompt exceed the engine's max_num_seqs "
                                f"({self.max_num_seqs})", param=field)

    def admit(self, num_requests: int) -> None:
        """Reserve waiting places for `num_requests` engine requests, checked and counted in one
        step (before any await, so a burst cannot overshoot max_waiting)."""
        if not self.engine.is_alive:
            raise ApiError(503, self.engine.unavailable_reason, "service_unavailable_error")
        if not self.engine.reserve(num_requests, self.max_waiting):
            raise ApiError(429, f"the server is busy: its queue of {self.max_waiting} waiting requests is full; "
                                f"retry later", "rate_limit_error", code="rate_limit_exceeded",
                           headers={"Retry-After": str(RETRY_AFTER_SECONDS)})

    def token_text(self, token: int) -> str:
        if self.tokenizer is None:
            return f"token_id:{token}"
        return self.tokenizer.decode([token], skip_special_tokens=False)

    def special_token_ids(self) -> set[int]:
        if not hasattr(self, "_special_ids"):
            try:
                added = self.tokenizer.backend.get_added_tokens_decoder().items()
                self._special_ids = {token_id for token_id, token in added if token.special}
            except Exception:  # no tokenizer, or one without added tokens
                self._special_ids = set(getattr(self.tokenizer, "stop_token_ids", ()) or ())
        return self._special_ids

    def xray_tokens(self, records: list[dict] | None) -> list[dict] | None:
        """The engine's X-ray token records (engine/xray.py) with texts: candidates as
        [text, logprob, token id]."""
        if records is None:
            return None

        def candidates(pairs):
            return [[self.token_text(t), lp, t] for t, lp in pairs]
        return [{**r, "token": self.token_text(r["token_id"]), "top": candidates(r["top"]),
                 "top_processed": candidates(r["top_processed"])} for r in records]

    def xray_prompt(self, output: RequestOutput) -> dict | None:
        """The X-ray request record: the prompt's tokens (ids, text pieces, which are special),
        the prefix-cache hit, the prefill steps (times in seconds since arrival)."""
        if output.xray is None:
            return None
        ids = output.prompt_token_ids
        special = self.special_token_ids()
        engine = self.engine.engine
        return {**output.xray, "prompt_token_ids": list(ids), "prompt_tokens": [self.token_text(t) for t in ids],
                "special": [i for i, t in enumerate(ids) if t in special],
                "block_size": engine.config.block_size, "num_kv_blocks": engine.block_manager.num_blocks}

    def token_ids(self, prompt: str | list[int]) -> str | list[int]:
        """Tokenize a text prompt here, off the engine thread. Whether it fits the context with
        max_tokens is the engine's check (`add_request` raises `ContextLengthError`)."""
        if isinstance(prompt, str) and self.tokenizer is not None:
            return self.tokenizer.encode(prompt)
        return prompt

    async def generate(self, num_prompts: int, make_prompts: Callable[[], list[str | list[int]]],
                       params: SamplingParams | BeamSearchParams, request_id: str, prompt_param: str,
                       lora: LoRARequest | None = None) -> _Generation:
        """Admit `num_prompts` engine requests, then build (`make_prompts`: chat templates) and
        tokenize the prompts in a worker thread and submit them (on adapter `lora`, if any)."""
        self.check_fits(num_prompts, params, prompt_param)
        self.admit(num_prompts)
        try:
            token_ids = await asyncio.to_thread(lambda: [self.token_ids(prompt) for prompt in make_prompts()])
        except BaseException as exc:
            self.engine.release(num_prompts)
            if isinstance(exc, LmserveError):
                raise ApiError.of(exc, prompt_param) from None
            raise
        return _Generation(self, token_ids, params, request_id, lora)

    async def prompt_token_ids(self, prompts: list[str | list[int]]) -> list[list[int]]:
        """The prompts' token ids (tokenized in a worker thread), checked as the engine checks
        them: not empty, inside the vocabulary, within the context limit."""
        def run() -> list[list[int]]:
            ids = [self.engine.engine.inputs.prompt_ids(prompt)[1] for prompt in prompts]
            for tokens in ids:
                if len(tokens) > self.max_model_len:
                    raise ContextLengthError("prompt", f"the prompt has {len(tokens)} tokens, over the context "
                                                       f"limit of {self.max_model_len} tokens")
            return ids
        try:
            return await asyncio.to_thread(run)
        except LmserveError as exc:
            raise ApiError.of(exc, "prompt") from None

    async def prompt_logprobs(self, request: Request, prompts: list[list[int]], top_n: int,
                              lora: LoRARequest | None = None) -> list[dict]:
        """Each prompt's legacy logprobs block (its first token's logprob null), scored on the
        engine thread (`AsyncEngine.prompt_logprobs`) on admitted places."""
        self.admit(len(prompts))
        try:
            entries = await _unless_disconnected(request, asyncio.gather(
                *(self.engine.prompt_logprobs(ids, top_n, lora) for ids in prompts)))
            return await asyncio.to_thread(lambda: [proto.completion_logprobs(ids, lps, self.token_text, 0)
                                                    for ids, lps in zip(prompts, entries)])
        except Exception as exc:
            error = ApiError.of(exc, "prompt")
            error.param = "prompt" if error.param == "token_ids" else error.param
            raise error from None
        finally:
            self.engine.release(len(prompts))


class _Generation:
    """The engine requests behind one HTTP request (one per prompt, submitted on their admitted
    places), merged into one stream of `(prompt index, output)` with metrics; leaving early, or
    `close` on any way out, aborts the unfinished ones."""

    def __init__(self, server: _Server, prompts, params: SamplingParams | BeamSearchParams, request_id: str,
                 lora: LoRARequest | None = None):
        self.server, self.params = server, params
        self.request_ids = [f"{request_id}-{i}" for i in range(len(prompts))]
        self.gens = [server.engine.generate(prompt, params, rid, server.request_timeout, reserved=True,
                                            lora_request=lora)
                     for prompt, rid in zip(prompts, self.request_ids)]
        self.timers = [server.metrics.timer() for _ in prompts]
        self.last: dict[int, RequestOutput] = {}
        self.closed = False

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, gen) -> None:
            try:
                async for output in gen:
                    queue.put_nowait((i, output))
            except Exception as exc:
                queue.put_nowait((i, exc))
            else:
                queue.put_nowait((i, None))

        tasks = [asyncio.create_task(pump(i, gen)) for i, gen in enumerate(self.gens)]
        remaining = len(tasks)
        try:
            while remaining:
                i, item = await queue.get()
                if item is None:
                    remaining -= 1
                    continue
                if isinstance(item, Exception):
                    raise item
                self.timers[i].observe(item)
                self.last[i] = item
                yield i, item
        finally:
            for task in tasks:
                task.cancel()
            self.close()

    def close(self) -> None:
        """Abort the requests that have not finished and count them as failed (once)."""
        if self.closed:
            return
        self.closed = True
        for i, (request_id, timer) in enumerate(zip(self.request_ids, self.timers)):
            if not (i in self.last and self.last[i].finished):
                self.server.engine.abort(request_id)
                timer.fail(self.params.n)

    def usage(self) -> proto.Usage:
        prompt = sum(len(o.prompt_token_ids) for o in self.last.values())
        completion = sum(len(c.token_ids) for o in self.last.values() for c in o.outputs)
        return proto.Usage.of(prompt, completion)


async def _until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable):
    """Await `work`, cancelling it (and so aborting its requests) if the client goes away."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_until_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        task.cancel()  # a no-op once it is done
    if task not in done:
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise ApiError(499, "the client closed the request")
    return task.result()


class _XrayCollector:
    """A non-streamed X-ray request's token records, gathered from every output (each holds
    only the records new since the previous one)."""

    def __init__(self):
        self.records: dict[tuple[int, int], list[dict]] = {}

    def __call__(self, i: int, output: RequestOutput) -> None:
        for c in output.outputs:
            if c.xray:
                self.records.setdefault((i, c.index), []).extend(c.xray)

    def tokens(self, i: int, index: int) -> list[dict]:
        return self.records.get((i, index), [])


def _sse(data: str) -> str:
    return f"data: {data}\n\n"


_NO_USAGE = {"usage"}


def _chunk_event(chunk: proto.CompletionResponse | proto.ChatCompletionChunk, include_usage: bool) -> str:
    """One chunk as a server-sent event; its `usage` field only when the client asked for usage."""
    return _sse(chunk.model_dump_json(exclude=None if include_usage else _NO_USAGE))


class _ChoiceState:
    """What has been streamed for one choice: characters sent, whether it started and finished."""

    def __init__(self):
        self.chars = 0
        self.started = False
        self.finished = False


async def _stream_events(items: AsyncIterator, first: tuple[int, RequestOutput], render_events,
                         finish_abort, usage_event) -> AsyncIterator[str]:
    """Common SSE loop: events for `first` and each later output, the final usage event, [DONE].
    A timeout or a shutdown ends unfinished choices with finish_reason "length" (cut short by a
    server limit; then the usage event; a shutdown adds an error event saying so); other errors
    become an error event."""
    shutdown = None
    try:
        item = first
        while item is not None:
            for event in render_events(*item):
                yield event
            item = await anext(items, None)
    except (RequestTimeoutError, EngineUnavailableError) as exc:
        for event in finish_abort():
            yield event
        shutdown = exc if isinstance(exc, EngineUnavailableError) else None
    except Exception as exc:
        yield _sse(ApiError.of(exc).body())
        yield "data: [DONE]\n\n"
        return
    finally:
        await items.aclose()
    if usage_event is not None:
        yield usage_event()
    if shutdown is not None:
        yield _sse(ApiError.of(shutdown).body())
    yield "data: [DONE]\n\n"


async def _start(request: Request, gen: _Generation, prompt_param: str):
    """Wait (watching for disconnects) for the first output, so that validation errors and a
    failing first step are answered with an HTTP error status rather than inside a stream."""
    items = gen.outputs()
    try:
        first = await _unless_disconnected(request, anext(items))
    except Exception as exc:
        await items.aclose()
        gen.close()
        raise ApiError.of(exc, prompt_param) from None
    return items, first


async def _run_to_end(request: Request, gen: _Generation, prompt_param: str,
                      on_output: Callable[[int, RequestOutput], None] | None = None) -> None:
    async def collect():
        async for i, output in gen.outputs():
            if on_output is not None:
                on_output(i, output)
    try:
        await _unless_disconnected(request, collect())
    except Exception as exc:
        raise ApiError.of(exc, prompt_param) from None
    finally:
        gen.close()


# ---- completions --------------------------------------------------------------------------------

async def _completions(server: _Server, body: proto.CompletionRequest, request: Request) -> Response:
    lora = server.check_model(body.model)
    model_name = lora.lora_name if lora else server.model_name
    params = body.sampling_params()
    prompts = body.prompts()
    request_id = f"cmpl-{uuid.uuid4().hex}"
    n = params.n
    states: dict[int, _ChoiceState] = {}

    def echo_text(i: int) -> str:
        if not body.echo:
            return ""
        if isinstance(prompts[i], str):
            return prompts[i]
        return server.require_tokenizer("prompt").decode(prompts[i])

    # echo + logprobs: the prompt's own logprobs (the first null) lead each choice's block;
    # max_tokens 0: nothing is generated, the choices hold only the echoed prompt.
    echo_logprobs = body.echo and body.logprobs is not None
    prompt_blocks: list[dict | None] = [None] * len(prompts)
    prompt_ids = None
    if echo_logprobs or body.max_tokens == 0:
        server.check_fits(len(prompts), params, "prompt")
        prompt_ids = await server.prompt_token_ids(prompts)
    if echo_logprobs:
        truncate = getattr(params, "truncate_prompt_tokens", None)
        scored = [ids[-truncate:] if truncate else ids for ids in prompt_ids]
        prompt_blocks = await server.prompt_logprobs(request, scored, body.logprobs, lora)
    if body.max_tokens == 0:
        return _prompt_only_completion(server, body, request_id, model_name, n,
                                       [echo_text(i) for i in range(len(prompts))], prompt_ids, prompt_blocks)
    gen = await server.generate(len(prompts), lambda: prompt_ids or prompts, params, request_id, "prompt", lora)

    def choice_logprobs(choice: CompletionOutput, start_token: int, text_offset: int, i: int, first: bool):
        """The block of tokens `start_token`... of `choice` (whose text starts at `text_offset`),
        after the prompt's own block in a choice's `first` chunk when echo asks for it."""
        if choice.logprobs is None:
            return None
        block = proto.completion_logprobs(choice.token_ids[start_token:], choice.logprobs[start_token:],
                                          server.token_text, text_offset)
        return proto.joined_logprobs(prompt_blocks[i], block) if first else block

    if not body.stream:
        records = _XrayCollector() if body.xray else None
        await _run_to_end(request, gen, "prompt", records)
        choices = []
        for i in sorted(gen.last):
            output = gen.last[i]
            prefix = echo_text(i)
            for c in output.outputs:
                choices.append(proto.CompletionChoice(index=i * n + c.index, text=prefix + c.text,
                                                      logprobs=choice_logprobs(c, 0, len(prefix), i, True),
                                                      finish_reason=c.finish_reason,
                                                      xray=records and server.xray_tokens(records.tokens(i, c.index))))
        return JSONResponse(proto.CompletionResponse(id=request_id, model=model_name, choices=choices,
                                                     usage=gen.usage(), system_fingerprint=server.fingerprint,
                                                     xray=server.xray_prompt(gen.last[0]) if gen.last else None
                                                     ).model_dump())

    created = int(time.time())

    def event(choices: list[proto.CompletionChoice], usage: proto.Usage | None = None, xray: dict | None = None) -> str:
        return _chunk_event(proto.CompletionResponse(id=request_id, created=created, model=model_name,
                                                     choices=choices, usage=usage, xray=xray,
                                                     system_fingerprint=server.fingerprint), body.include_usage)

    def render(i: int, output: RequestOutput) -> list[str]:
        choices, prompt_xray = [], None
        for c in output.outputs:
            state = states.setdefault(i * n + c.index, _ChoiceState())
            if state.finished:
                continue
            first = not state.started
            prefix = echo_text(i) if first else ""
            state.started = True
            text = prefix + c.delta_text
            start = len(c.token_ids) - len(c.delta_token_ids)
            logprobs = choice_logprobs(c, start, state.chars + len(prefix), i, first)
            if not (text or c.finish_reason or (logprobs is not None and logprobs["tokens"]) or c.xray):
                continue
            choices.append(proto.CompletionChoice(index=i * n + c.index, text=text, logprobs=logprobs,
                                                  finish_reason=c.finish_reason, xray=server.xray_tokens(c.xray)))
            state.chars += len(text)
            state.finished = c.finish_reason is not None
            if first and c.index == 0:
                prompt_xray = server.xray_prompt(output)
        return [event(choices, xray=prompt_xray)] if choices else []

    def finish_abort() -> list[str]:
        return [event([proto.CompletionChoice(index=index, text="", finish_reason="length")
                       for index in range(len(prompts) * n) if not states.get(index, _ChoiceState()).finished])]

    def usage_event() -> str:
        return event([], gen.usage())

    items, first = await _start(request, gen, "prompt")
    return StreamingResponse(_stream_events(items, first, render, finish_abort,
                                            usage_event if body.include_usage else None),
                             media_type="text/event-stream")


def _prompt_only_completion(server: _Server, body: proto.CompletionRequest, request_id: str, model_name: str, n: int,
                            echoes: list[str], prompt_ids: list[list[int]], prompt_blocks: list[dict | None]
                            ) -> Response:
    """max_tokens 0: nothing generated; each choice is its echoed prompt (with the prompt's logprobs
    when asked for; without echo, an empty block), finish_reason "length"."""
    empty = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    choices = [proto.CompletionChoice(index=i * n + j, text=echoes[i], finish_reason="length",
                                      logprobs=None if body.logprobs is None else prompt_blocks[i] or empty)
               for i in range(len(prompt_ids)) for j in range(n)]
    usage = proto.Usage.of(sum(map(len, prompt_ids)), 0)
    response = proto.CompletionResponse(id=request_id, model=model_name, choices=choices, usage=usage,
                                        system_fingerprint=server.fingerprint)
    if not body.stream:
        return JSONResponse(response.model_dump())

    async def events() -> AsyncIterator[str]:
        yield _chunk_event(response.model_copy(update={"usage": None}), body.include_usage)
        if body.include_usage:
            yield _chunk_event(response.model_copy(update={"choices": []}), True)
        yield "data: [DONE]\n\n"
    return StreamingResponse(events(), media_type="text/event-stream")


# ---- chat completions ---------------------------------------------------------------------------

async def _chat(server: _Server, body: proto.ChatCompletionRequest, request: Request) -> Response:
    lora = server.check_model(body.model)
    model_name = lora.lora_name if lora else server.model_name
    plan = tools.ToolPlan.of(body.tools, body.tool_choice, body.parallel_tool_calls)
    params = tools.constrain(plan, body.sampling_params())
    tokenizer = server.require_tokenizer("messages")
    messages, template_tools = tools.chat_prompt(plan, body.message_dicts(), tokenizer.chat_template)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    top_n = body.top_logprobs or 0
    gen = await server.generate(1, lambda: [tokenizer.apply_chat_template(messages, tools=template_tools)],
                                params, request_id, "messages", lora)

    def logprobs(choice: CompletionOutput, start: int):
        if choice.logprobs is None:
            return None
        return proto.chat_logprobs(choice.token_ids[start:], choice.logprobs[start:], server.token_text, top_n)

    if not body.stream:
        records = _XrayCollector() if body.xray else None
        await _run_to_end(request, gen, "messages", records)
        output = gen.last[0]
        choices = []
        for c in output.outputs:
            content, tool_calls, finish_reason = tools.parse_choice(plan, c.text, c.finish_reason)
            choices.append(proto.ChatChoice(index=c.index, message=proto.ChatMessageOut(content=content,
                                                                                       tool_calls=tool_calls),
                                            logprobs=logprobs(c, 0), finish_reason=finish_reason,
                                            xray=records and server.xray_tokens(records.tokens(0, c.index))))
        return JSONResponse(proto.ChatCompletionResponse(id=request_id, model=model_name, choices=choices,
                                                         usage=gen.usage(), system_fingerprint=server.fingerprint,
                                                         xray=server.xray_prompt(output)).model_dump())

    created = int(time.time())
    states: dict[int, _ChoiceState] = {}
    streams: dict[int, tools.ToolCallStream] = {}

    def event(choices: list[proto.ChatChunkChoice], usage: proto.Usage | None = None, xray: dict | None = None) -> str:
        return _chunk_event(proto.ChatCompletionChunk(id=request_id, created=created, model=model_name,
                                                      choices=choices, usage=usage, xray=xray,
                                                      system_fingerprint=server.fingerprint), body.include_usage)

    def render(_: int, output: RequestOutput) -> list[str]:
        events = []
        for c in output.outputs:
            state = states.setdefault(c.index, _ChoiceState())
            if state.finished:
                continue
            if not state.started:
                state.started = True
                role = proto.ChatChunkChoice(index=c.index, delta=proto.ChatDelta(role="assistant", content=""))
                events.append(event([role], xray=server.xray_prompt(output) if c.index == 0 else None))
            start = len(c.token_ids) - len(c.delta_token_ids)
            parts, finish_reason = ([{"content": c.delta_text}] if c.delta_text else []), c.finish_reason
            if plan is not None:  # tool calls: content held back or turned into delta.tool_calls
                parts, finish_reason = streams.setdefault(c.index, plan.stream()).step(c.delta_text, finish_reason)
            if not (parts or finish_reason or (c.logprobs is not None and c.delta_token_ids) or c.xray):
                continue
            parts = parts or [{}]
            for k, part in enumerate(parts):
                last = k == len(parts) - 1
                events.append(event([proto.ChatChunkChoice(index=c.index, delta=proto.ChatDelta(**part),
                                                           logprobs=logprobs(c, start) if k == 0 else None,
                                                           finish_reason=finish_reason if last else None,
                                                           xray=server.xray_tokens(c.xray) if k == 0 else None)]))
            state.finished = finish_reason is not None
        return events

    def finish_abort() -> list[str]:
        return [event([proto.ChatChunkChoice(index=index, delta=proto.ChatDelta(), finish_reason="length")
                       for index in range(params.n) if not states.get(index, _ChoiceState()).finished])]

    def usage_event() -> str:
        return event([], gen.usage())

    items, first = await _start(request, gen, "messages")
    return StreamingResponse(_stream_events(items, first, render, finish_abort,
                                            usage_event if body.include_usage else None),
                             media_type="text/event-stream")


# ---- app ------------------------------------------------------------------------------------------

def _tokens_response(tokens: list[int], **fields) -> Response:
    """`{"tokens": [...], **fields}` as JSON, the list written a slice at a time: one json.dumps of a
    million ids would hold the GIL, and so stall the event loop, for a fifth of a second."""
    ids = ",".join(",".join(map(str, tokens[i:i + 16384])) for i in range(0, len(tokens), 16384))
    rest = json.dumps(fields, separators=(",", ":"))[1:-1]
    return Response(f'{{"tokens":[{ids}],{rest}}}', media_type="application/json")


def _validation_error(exc: RequestValidationError) -> ApiError:
    errors = exc.errors()
    params = [e["loc"][1] for e in errors if len(e["loc"]) > 1 and isinstance(e["loc"][1], str)]
    details = "; ".join(f"{'.'.join(map(str, e['loc'][1:])) or 'body'}: {e['msg']}" for e in errors[:3])
    if any(e["type"] == "json_invalid" for e in errors):
        return ApiError(400, f"the request body is not valid JSON ({details})")
    return ApiError(400, f"invalid request: {details}", param=params[0] if params else None)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_, exc: ApiError):
        return exc.response()

    @app.exception_handler(LmserveError)
    async def lmserve_error(_, exc: LmserveError):
        return ApiError.of(exc).response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(_, exc: RequestValidationError):
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, exc: StarletteHTTPException):
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return ApiError(exc.status_code, str(exc.detail), type_, headers=exc.headers).response()


def _as_async_engine(engine: dict | LLMEngine | AsyncEngine) -> tuple[AsyncEngine, bool]:
    """The engine to serve and whether the app owns (started, and will stop) it."""
    if isinstance(engine, AsyncEngine):
        return engine, False
    if isinstance(engine, dict):
        engine = create_engine(**engine)
    return AsyncEngine(engine).start(), True


def build_app(engine: dict | LLMEngine | AsyncEngine, served_model_name: str, api_key: str | None = None,
              max_waiting: int = DEFAULT_MAX_WAITING,
              request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT, metrics_public: bool = False,
              max_body_size: int | str | None = None, lora_modules: dict[str, str] | None = None) -> FastAPI:
    """An app serving `engine`: `create_engine` keyword arguments (the model is loaded now), an `LLMEngine`
    (driven by a new thread) or a running `AsyncEngine` (shared; its owner stops it). With
    `api_key`, every route but GET /health (and /metrics if `metrics_public`) requires it.
    Requests beyond `max_waiting` queued ones get 429; a request running over `request_timeout`
    seconds is aborted; a body over `max_body_size` bytes (e.g. "8MiB"; default 4 MiB) gets 413.
    `lora_modules` (name -> PEFT directory) are loaded now and served as models of those names."""
    body_limit = parse_bytes(DEFAULT_MAX_BODY_SIZE if max_body_size is None else max_body_size, "max_body_size")
    async_engine, owned = _as_async_engine(engine)

    @contextlib.asynccontextmanager
    async def lifespan(_):
        yield
        if owned:
            await asyncio.to_thread(async_engine.shutdown)

    app = FastAPI(title="lmserve", lifespan=lifespan)
    app.openapi = lambda: openapi(app)  # what the server really answers (see server/openapi.py)
    metrics = ServerMetrics(async_engine)
    server = _Server(async_engine, metrics, served_model_name, max_waiting, request_timeout)
    server.adapters.load_at_start(lora_modules or {})
    app.state.engine = async_engine
    app.state.metrics = metrics
    app.add_middleware(Guard, api_key=api_key, metrics_public=metrics_public, max_body_size=body_limit)
    app.add_middleware(CountStatus, metrics=metrics)  # outermost: counts the guard's 401 / 413 too
    _install_error_handlers(app)

    v1 = APIRouter(prefix="/v1")

    @v1.post("/completions")
    async def completions(body: proto.CompletionRequest, request: Request) -> Response:
        return await _completions(server, body, request)

    @v1.post("/chat/completions")
    async def chat_completions(body: proto.ChatCompletionRequest, request: Request) -> Response:
        return await _chat(server, body, request)

    def model_card() -> dict:
        return {"id": served_model_name, "object": "model", "created": 0, "owned_by": "lmserve",
                "max_model_len": server.max_model_len}

    @v1.get("/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card(), *server.adapters.cards(server.max_model_len)]}

    @v1.get("/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        lora = server.check_model(model_id)
        if lora is None:
            return model_card()
        return next(card for card in server.adapters.cards(server.max_model_len) if card["id"] == model_id)

    @v1.post("/load_lora_adapter")
    async def load_lora_adapter(body: proto.LoadLoRAAdapterRequest) -> dict:
        """Load a PEFT LoRA adapter and serve it as the model `lora_name` (needs --enable-lora)."""
        return await server.adapters.load(body.lora_name, body.lora_path)

    @v1.post("/unload_lora_adapter")
    async def unload_lora_adapter(body: proto.UnloadLoRAAdapterRequest) -> dict:
        """Stop serving adapter `lora_name`; requests already running on it finish with it."""
        return await server.adapters.unload(body.lora_name)

    @v1.get("/engine/status")
    async def engine_status(steps: int = 64) -> Response:
        """Running and waiting requests, KV-cache use, prefix-cache hit rate and the last `steps`
        engine steps' composition. Each call also keeps the engine recording its steps for
        TIMELINE_WATCH_SECONDS more (engine/xray.py `Timeline`): nothing is recorded unwatched."""
        if not 0 <= steps <= TIMELINE_STEPS:
            raise ApiError(400, f"steps: must be in [0, {TIMELINE_STEPS}], got {steps}", param="steps")
        engine = async_engine.engine
        engine.timeline.watch()
        stats = async_engine.stats
        return JSONResponse({
            "object": "engine.status", "model": served_model_name, "step": engine.num_steps,
            "num_running": stats.num_running, "num_waiting": stats.num_waiting,
            "kv_cache_usage": stats.kv_cache_usage, "prefix_cache_hit_rate": stats.prefix_cache_hit_rate,
            "num_kv_blocks": engine.block_manager.num_blocks, "block_size": engine.config.block_size,
            "max_num_seqs": engine.config.max_num_seqs, "recording_seconds": TIMELINE_WATCH_SECONDS,
            "steps": await asyncio.to_thread(engine.timeline.last, steps)})

    app.include_router(v1)

    @app.get("/", include_in_schema=False)
    async def playground() -> Response:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/health")
    async def health() -> Response:
        if not async_engine.is_alive:
            raise ApiError(503, async_engine.unavailable_reason, "service_unavailable_error")
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.post("/tokenize")
    async def tokenize(body: proto.TokenizeRequest) -> Response:
        server.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(400, "send exactly one of 'prompt' and 'messages'", param="prompt")
        tokenizer = server.require_tokenizer("prompt" if body.messages is None else "messages")

        def run() -> Response:  # in a worker thread, the JSON of a long token list included
            if body.messages is not None:
                messages = tools.history_messages([m.as_dict() for m in body.messages], tokenizer.chat_template)
                text = tokenizer.apply_chat_template(messages, body.add_generation_prompt)
            else:
                text = body.prompt
            tokens = tokenizer.encode(text, add_special_tokens=body.add_special_tokens)
            return _tokens_response(tokens, count=len(tokens), max_model_len=server.max_model_len)

        return await asyncio.to_thread(run)

    @app.post("/detokenize")
    async def detokenize(body: proto.DetokenizeRequest) -> Response:
        server.check_model(body.model)
        tokenizer = server.require_tokenizer("tokens")
        vocab = async_engine.engine.model_config.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise ApiError(400, f"tokens: token id {bad[0]} is outside the vocabulary [0, {vocab})", param="tokens")
        return JSONResponse({"prompt": await asyncio.to_thread(tokenizer.decode, body.tokens)})

    @app.get("/tokenizer_info")
    async def tokenizer_info(include_tokenizer_json: bool = False) -> Response:
        """What an evaluation harness needs to tokenize as the server does: vocabulary sizes,
        special tokens, the chat template, the context limit; with `?include_tokenizer_json=true`
        also the whole tokenizer (Hugging Face `tokenizer.json`, loadable with
        `tokenizers.Tokenizer.from_str(json.dumps(...))`)."""
        tokenizer = server.require_tokenizer("model")

        def run() -> Response:
            def token(token_id: int | None) -> str | None:
                return None if token_id is None else tokenizer.backend.id_to_token(token_id)

            info = {"model": served_model_name, "vocab_size": tokenizer.vocab_size,
                    "model_vocab_size": async_engine.engine.model_config.vocab_size,
                    "max_model_len": server.max_model_len}
            for name in ("bos", "eos", "pad", "unk"):
                token_id = getattr(tokenizer, f"{name}_token_id")
                info[f"{name}_token_id"], info[f"{name}_token"] = token_id, token(token_id)
            info |= {"add_bos_token": tokenizer.add_bos_token, "add_eos_token": tokenizer.add_eos_token,
                     "stop_token_ids": sorted(tokenizer.stop_token_ids),
                     "special_tokens": {added.content: token_id for token_id, added in
                                        sorted(tokenizer.backend.get_added_tokens_decoder().items()) if added.special},
                     "chat_template": tokenizer.chat_template}
            if include_tokenizer_json:
                info["tokenizer_json"] = json.loads(tokenizer.backend.to_str())
            return JSONResponse(info)

        return await asyncio.to_thread(run)

    return app


class _GracefulServer(uvicorn.Server):
    """Aborts the requests in flight (so streams end at once) before uvicorn drains connections."""

    async def shutdown(self, sockets=None) -> None:
        self.config.app.state.engine.begin_shutdown()
        await super().shutdown(sockets)


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run `app` under uvicorn until SIGINT/SIGTERM."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=10)
    _GracefulServer(config).run()
