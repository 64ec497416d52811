"""`AsyncEngine`: drives the synchronous `LLMEngine` from one background thread for asyncio code.

Only the engine thread touches the engine. Handlers send it commands (add, abort, score, a call
such as loading an adapter, stop) through a thread-safe queue and read each request's outputs
from an `asyncio.Queue` that the thread feeds with `loop.call_soon_threadsafe`. `add_request` validation errors travel back through a future,
so a handler can answer 400 before streaming anything. The thread sleeps on the command queue
while no request is unfinished. A failing `step()` fails the requests in flight, never the loop.
After every command and step the thread publishes queue and KV-cache figures for metrics and
admission control. `reserve` counts requests as waiting before the handler's first await, and a
request leaves that count in the same locked step in which it enters the engine's own, so the
waiting figure is never off and admission never overshoots its limit. Prompt scoring
(`prompt_logprobs`: `LLMEngine.score`) runs on the same thread between steps, once the KV cache
has room for it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import torch

from lmserve.engine.llm_engine import EngineStats, LLMEngine
from lmserve.errors import EngineDeadError, LmserveError
from lmserve.lora import LoRARequest
from lmserve.outputs import RequestOutput
from lmserve.sampling_params import SamplingParams

logger = logging.getLogger("lmserve.server")


class EngineUnavailableError(LmserveError):
    """The engine is shutting down (or its thread stopped) and takes no more requests."""


class EngineStepError(Exception):
    """A model step failed; the requests in flight at that moment are ended with this error."""


class RequestTimeoutError(LmserveError):
    """A request ran longer than the server's per-request timeout and was aborted."""


class _Stream:
    """One request's output channel, written by the engine thread, read on the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()

    def push(self, item: RequestOutput | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass


@dataclass
class _Add:
    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    stream: _Stream
    accepted: concurrent.futures.Future
    lora_request: LoRARequest | None = None


@dataclass
class _Abort:
    request_id: str


@dataclass
class _Score:
    token_ids: list[int]
    top_n: int
    result: concurrent.futures.Future
    lora_request: LoRARequest | None = None


@dataclass
class _Call:
    """Run `function(engine)` on the engine thread between steps (adapter loading and unloading)."""

    function: Callable[[LLMEngine], object]
    result: concurrent.futures.Future


class _Stop:
    pass


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.stats = EngineStats()
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}  # engine thread only
        self._accepting = True
        self.unavailable_reason = "the server is shutting down"  # what requests refused by a stopped engine are told
        self._pending_lock = threading.Lock()
        self._pending_adds = 0  # submitted, not yet taken by the engine thread
        self._scores: list[_Score] = []  # engine thread only: waiting for KV blocks
        self._thread = threading.Thread(target=self._run, name="lmserve-engine", daemon=True)

    # ---- lifecycle (any thread) -------------------------------------------------------------

    def start(self) -> AsyncEngine:
        self._thread.start()
        return self

    @property
    def is_alive(self) -> bool:
        return self._accepting and self._thread.is_alive()

    def begin_shutdown(self) -> None:
        """Refuse new requests and have the thread abort those in flight and exit."""
        if self._accepting:
            self._accepting = False
            self._commands.put(_Stop())

    def shutdown(self, timeout: float | None = 30.0) -> None:
        self.begin_shutdown()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def num_waiting(self) -> int:
        """Requests not yet started: reserved, in the command queue or in the scheduler's queue."""
        with self._pending_lock:
            return self._pending_adds + self.stats.num_waiting

    def reserve(self, count: int, limit: int) -> bool:
        """Count `count` requests about to be submitted as waiting, unless that would take the
        waiting count over `limit`; check and count are one step. Each reserved request is then
        submitted with `generate(..., reserved=True)` or handed back with `release`."""
        with self._pending_lock:
            if self._pending_adds + self.stats.num_waiting + count > limit:
                return False
            self._pending_adds += count
            return True

    def release(self, count: int) -> None:
        """Hand back reserved requests that will not be submitted."""
        with self._pending_lock:
            self._pending_adds -= count

    # ---- requests (event loop) --------------------------------------------------------------

    def generate(self, prompt: str | list[int], params: SamplingParams, request_id: str,
                 timeout: float | None = None, reserved: bool = False,
                 lora_request: LoRARequest | None = None) -> AsyncIterator[RequestOutput]:
        """Submit the request now (`reserved`: already counted by `reserve`), on the LoRA adapter
        of `lora_request` if given, and return its outputs until it finishes. Iterating raises `LmserveError` from validation,
        `RequestTimeoutError` after `timeout` seconds, `EngineStepError` if a step failed.
        Leaving the iteration early (cancellation, disconnect, error) aborts the request in the
        engine; so does `abort`, for outputs never iterated."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        stream = _Stream(loop)
        accepted: concurrent.futures.Future = concurrent.futures.Future()
        if self.is_alive:
            if not reserved:
                with self._pending_lock:
                    self._pending_adds += 1
            self._commands.put(_Add(request_id, prompt, params, stream, accepted, lora_request))
        else:
            if reserved:
                self.release(1)
            accepted.set_exception(EngineUnavailableError(self.unavailable_reason))
        return self._outputs(request_id, stream, accepted, timeout, deadline)

    def abort(self, request_id: str) -> None:
        """Abort a submitted request (a no-op once it has finished)."""
        self._commands.put(_Abort(request_id))

    def prompt_logprobs(self, token_ids: list[int], top_n: int = 0,
                        lora_request: LoRARequest | None = None) -> Awaitable[list[dict[int, float] | None]]:
        """Per token of `token_ids` its log-probability given the tokens before it, as
        `{token: logprob}` plus the `top_n` most likely tokens there (None for the first token):
        `LLMEngine.score` run on the engine thread between steps. Raises `LmserveError` for ids
        outside the vocabulary or over the context limit."""
        return asyncio.wrap_future(self._submit(lambda result: _Score(list(token_ids), top_n, result, lora_request)))

    def call(self, function: Callable[[LLMEngine], object]) -> concurrent.futures.Future:
        """`function(engine)` run on the engine thread between steps: a future of its result
        (`asyncio.wrap_future` it on the event loop)."""
        return self._submit(lambda result: _Call(function, result))

    def _submit(self, make_command) -> concurrent.futures.Future:
        result: concurrent.futures.Future = concurrent.futures.Future()
        if self.is_alive:
            self._commands.put(make_command(result))
        else:
            result.set_exception(EngineUnavailableError(self.unavailable_reason))
        return result

    async def _outputs(self, request_id: str, stream: _Stream, accepted: concurrent.futures.Future,
                       timeout: float | None, deadline: float | None) -> AsyncIterator[RequestOutput]:
        loop = asyncio.get_running_loop()

        async def within_deadline(awaitable):
            remaining = None if deadline is None else deadline - loop.time()
            try:
                return await asyncio.wait_for(awaitable, remaining)
            except asyncio.TimeoutError:
                raise RequestTimeoutError(f"the request took longer than {timeout:g} s and was aborted") from None

        finished = False
        try:
            await within_deadline(asyncio.wrap_future(accepted))
            while not finished:
                item = await within_deadline(stream.queue.get())
                if isinstance(item, BaseException):
                    finished = True  # the engine thread has already dropped the request
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(request_id)

    # ---- engine thread ----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                idle = not self.engine.has_unfinished_requests() and not self._scores
                if not self._handle_commands(block=idle):
                    return
                self._run_scores()
                if self.engine.has_unfinished_requests():
                    self._step()  # publishes the step's figures itself, before its outputs
                else:
                    self._publish_stats()
            except Exception as exc:  # a bug outside step(): fail what is in flight, keep serving
                logger.exception("engine loop error")
                self._fail_all(EngineStepError(f"engine loop error ({type(exc).__name__}: {exc})"))

    def _handle_commands(self, block: bool) -> bool:
        """Apply queued commands (waiting for one if `block`); False once told to stop."""
        while True:
            try:
                command = self._commands.get(block=block)
            except queue.Empty:
                return True
            block = False
            if isinstance(command, _Stop):
                self._fail_all(EngineUnavailableError("the server is shutting down"))
                self._drain_after_stop()
                return False
            if isinstance(command, _Add):
                self._add(command)
                self._publish_stats(taken=1)
            elif isinstance(command, _Score):
                self._scores.append(command)
            elif isinstance(command, _Call):
                if command.result.set_running_or_notify_cancel():
                    try:
                        command.result.set_result(command.function(self.engine))
                    except Exception as exc:
                        command.result.set_exception(exc)
            else:
                self.engine.abort_request(command.request_id)
                self._streams.pop(command.request_id, None)
                self._publish_stats()

    def _add(self, command: _Add) -> None:
        if not command.accepted.set_running_or_notify_cancel():
            return  # the handler went away (cancelled or timed out) before the request was taken
        try:
            self.engine.add_request(command.prompt, command.params, command.request_id, command.lora_request)
        except Exception as exc:  # validation errors go back to the handler as they are
            command.accepted.set_exception(exc)
            return
        self._streams[command.request_id] = command.stream
        command.accepted.set_result(None)

    def _drain_after_stop(self) -> None:
        """Refuse adds and scores that raced with the stop so no handler waits forever."""
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            if isinstance(command, _Add) and command.accepted.set_running_or_notify_cancel():
                command.accepted.set_exception(EngineUnavailableError("the server is shutting down"))
            elif isinstance(command, _Call) and command.result.set_running_or_notify_cancel():
                command.result.set_exception(EngineUnavailableError("the server is shutting down"))
            elif isinstance(command, _Score):
                self._scores.append(command)
        for command in self._scores:
            if command.result.set_running_or_notify_cancel():
                command.result.set_exception(EngineUnavailableError("the server is shutting down"))
        self._scores.clear()

    def _run_scores(self) -> None:
        """Score the prompts waiting for it; while requests run, only those whose KV blocks are
        free now (the rest wait for a later step; alone, a prompt that does not fit fails)."""
        if not self._scores:
            return
        busy = self.engine.has_unfinished_requests()
        blocks = self.engine.block_manager
        waiting = []
        for command in self._scores:
            n = len(command.token_ids)
            if busy and n <= self.engine.max_model_len and blocks.blocks_for(n) > blocks.num_free_blocks:
                waiting.append(command)
                continue
            if not command.result.set_running_or_notify_cancel():
                continue  # the handler went away
            try:
                logits = self.engine.score(command.token_ids, command.lora_request)
                command.result.set_result(logprobs_of_logits(logits, command.token_ids, command.top_n))
            except Exception as exc:
                command.result.set_exception(exc)
        self._scores = waiting

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as exc:
            if isinstance(exc, EngineDeadError):  # no later step can run: refuse everything from now on
                logger.error("engine stopped (%s); failing %d request(s) in flight", exc, len(self._streams))
                self.unavailable_reason = f"the engine stopped: {exc}"
                self.begin_shutdown()
            else:
                logger.exception("engine step failed; failing %d request(s) in flight", len(self._streams))
            self._fail_all(EngineStepError(f"the model step failed ({type(exc).__name__}: {exc})"))
            self._publish_stats()
            return
        self._publish_stats()  # before the outputs: a client that sees a token sees the figures of its step
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue
            if output.finished:
                del self._streams[output.request_id]
            stream.push(output)

    def _fail_all(self, error: BaseException) -> None:
        for request_id, stream in list(self._streams.items()):
            self.engine.abort_request(request_id)
            stream.push(error)
        self._streams.clear()

    def _publish_stats(self, taken: int = 0) -> None:
        """Publish the engine's figures; `taken` add commands just handled leave the pending
        count in the same locked step, so a request is counted as waiting exactly once."""
        stats = self.engine.stats()
        with self._pending_lock:
            self.stats = stats
            self._pending_adds -= taken


def logprobs_of_logits(logits: torch.Tensor, token_ids: list[int], top_n: int,
                       rows: int = 512) -> list[dict[int, float] | None]:
    """Per token of `token_ids`, from the logits at every position (`LLMEngine.score`), its
    log-probability and the `top_n` best ones at that position: `{token: logprob}`; None for the
    first token, which nothing predicts. Computed `rows` positions at a time, so that a long
    prompt needs no second copy of its logits."""
    entries: list[dict[int, float] | None] = [None]
    for start in range(0, len(token_ids) - 1, rows):
        logprobs = torch.log_softmax(logits[start:start + rows][: len(token_ids) - 1 - start].float(), dim=-1)
        targets = token_ids[start + 1:start + 1 + logprobs.shape[0]]
        chosen = logprobs.gather(1, torch.tensor(targets, dtype=torch.long, device=logprobs.device)[:, None])
        top_ids: list[list[int]] = [[] for _ in targets]
        top_values: list[list[float]] = [[] for _ in targets]
        if top_n:
            values, ids = logprobs.topk(min(top_n, logprobs.shape[-1]), dim=-1)
            top_ids, top_values = ids.tolist(), values.tolist()
        for token, logprob, ids, values in zip(targets, chosen[:, 0].tolist(), top_ids, top_values):
            entry = dict(zip(ids, values))
            entry[token] = logprob
            entries.append(entry)
    return entries
