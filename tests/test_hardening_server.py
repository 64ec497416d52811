"""The server under hostile or heavy traffic, driven over real sockets on 127.0.0.1: the API key on
every route, the body-size limit, CPU work off the event loop, atomic admission, text that is not
valid Unicode, unexpected errors, best_of / temperature, shutdown mid-stream and chat templates
that would run forever or build huge strings."""

from __future__ import annotations

import asyncio
import collections
import json
import re
import threading
import time

import httpx
import pytest

from lmserve import LLM
from lmserve.errors import LmserveError
from lmserve.server import build_app
from lmserve.server.app import _GracefulServer
from lmserve.server.async_engine import AsyncEngine
from lmserve.tokenizer import Tokenizer
from tests.test_server import CHAT, MODEL, _assert_error, running, serving

NESTED_LOOPS = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
HUGE_STRING = "{{ 'x' * 3000000000 }}"


@pytest.fixture(scope="module")
def llm():
    return LLM(kv_cache_memory="128MiB")


@pytest.fixture(scope="module")
def async_engine(llm):
    engine = AsyncEngine(llm.engine).start()
    yield engine
    engine.shutdown()


class _HealthProbe:
    """GET /health every 10 ms from a thread of its own. `worst` is the most an answer came later
    than due (10 ms after the one before): the server's latency, and any stall of the whole process
    (the server runs in it, so a thread holding the GIL stops the probe as well). Make the test's
    own clients first: creating one loads the CA bundle, a GIL-holding stall of its own."""

    def __init__(self, base: str):
        self.base, self.delays = base, []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.base, timeout=10) as client:
            last = time.perf_counter()
            while not self.stop.is_set():
                time.sleep(0.01)
                assert client.get("/health").status_code == 200
                now = time.perf_counter()
                self.delays.append(now - last - 0.01)
                last = now

    def __enter__(self) -> _HealthProbe:
        self.thread.start()
        self._wait_for(1)
        return self

    def __exit__(self, *exc) -> None:
        self._wait_for(len(self.delays) + 1)  # an answer after the work, so that a stall still going on counts
        self.stop.set()
        self.thread.join(10)

    def _wait_for(self, count: int) -> None:
        deadline = time.monotonic() + 10
        while len(self.delays) < count and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.005)

    @property
    def worst(self) -> float:
        assert len(self.delays) >= 2
        return max(self.delays)


def _assert_responsive(url: str, work) -> None:
    """Run `work()` under a health probe: /health answers within 100 ms throughout. Tried a second
    time after a stall, because on a shared machine the OS alone can pause a process that long; a
    stall of the server's own making comes back."""
    worst = []
    for _ in range(2):
        with _HealthProbe(url) as probe:
            work()
        worst.append(probe.worst)
        if worst[-1] < 0.1:
            return
    pytest.fail(f"/health answered up to {min(worst) * 1e3:.0f} ms late while the work ran")


def _client_port(response: httpx.Response) -> int:
    """The local port of the connection that carried `response` (the same one: keep-alive held)."""
    return response.extensions["network_stream"].get_extra_info("client_addr")[1]


def _waiting(text: str) -> float:
    return float(re.search(r"^lmserve_num_requests_waiting (\S+)$", text, re.M).group(1))


# ---- 1. API key ---------------------------------------------------------------------------------

GUARDED = [("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
           ("POST", "/tokenize"), ("POST", "/detokenize"), ("GET", "/docs"), ("GET", "/openapi.json"),
           ("GET", "/metrics"), ("GET", "/no/such/route")]


def test_api_key_guards_every_route_but_health(async_engine):
    key = {"Authorization": "Bearer sekrit"}
    with running(build_app(async_engine, MODEL, api_key="sekrit")) as base, httpx.Client(base_url=base) as http:
        for method, path in GUARDED:
            response = http.request(method, path, json={"prompt": "x"})
            error = _assert_error(response, 401)
            assert error["code"] == "invalid_api_key" and response.headers["www-authenticate"] == "Bearer", path
        # The key is checked before the body is parsed.
        json_type = {"Content-Type": "application/json"}
        _assert_error(http.post("/v1/completions", content=b"{not json", headers=json_type), 401)
        _assert_error(http.post("/v1/completions", content=b"{not json", headers={**json_type, **key}), 400)
        assert http.get("/health").status_code == 200
        for path in ("/metrics", "/docs", "/openapi.json"):
            assert http.get(path, headers=key).status_code == 200, path
        assert http.post("/tokenize", json={"prompt": "hi"}, headers=key).json()["count"] > 0
    with running(build_app(async_engine, MODEL, api_key="sekrit", metrics_public=True)) as base:
        assert "lmserve_num_requests_waiting" in httpx.get(f"{base}/metrics").text
        _assert_error(httpx.post(f"{base}/tokenize", json={"prompt": "hi"}), 401)


# ---- 2. body size, 3. CPU work off the event loop -----------------------------------------------

def test_oversized_bodies_get_413_at_once(url):
    size, mib = 40 * 2**20, memoryview(b"x" * 2**20)
    json_type = {"Content-Type": "application/json"}

    def upload():
        # Sent a MiB at a time (one 40 MiB piece would be copied by the client, a stall of its own):
        # once with the length declared, once chunked, which the server has to count.
        for headers in ({**json_type, "Content-Length": str(size)}, json_type):
            start = time.perf_counter()
            response = http.post("/tokenize", content=(mib for _ in range(size // len(mib))), headers=headers)
            elapsed = time.perf_counter() - start
            assert _assert_error(response, 413)["code"] == "request_too_large", response.text
            assert elapsed < 1.0, elapsed
        assert http.get("/health").status_code == 200  # the connection is still usable

    with httpx.Client(base_url=url, timeout=30) as http:
        _assert_responsive(url, upload)


def test_max_body_size_option(async_engine):
    with running(build_app(async_engine, MODEL, max_body_size="1KiB")) as base:
        _assert_error(httpx.post(f"{base}/tokenize", json={"prompt": "x" * 2000}), 413)
        assert httpx.post(f"{base}/tokenize", json={"prompt": "x" * 500}).status_code == 200


def test_tokenizing_and_chat_templates_leave_the_event_loop_free(url):
    text = "The quick brown fox jumps over the lazy dog, 1234. " * 12000  # 600 kB: 0.5-1 s of CPU each

    def tokenize_and_chat():
        tokens = http.post("/tokenize", json={"prompt": text}).json()
        assert tokens["count"] == len(tokens["tokens"]) > 100_000
        chat = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": text}]})
        assert _assert_error(chat, 400, "messages")["code"] == "context_length_exceeded"

    with httpx.Client(base_url=url, timeout=60) as http:
        _assert_responsive(url, tokenize_and_chat)


# ---- 4. admission -------------------------------------------------------------------------------

def test_burst_never_overshoots_max_waiting(async_engine, monkeypatch):
    """100 requests at once against --max-waiting 8 while the engine is held inside a step: exactly
    8 are admitted (the gauge never reads more), the other 92 get 429 with Retry-After."""
    engine, gate, limit = async_engine.engine, threading.Event(), 8
    real_step = engine.step

    def held_step():
        gate.wait(30)
        return real_step()

    async def burst(base):
        gauge = []
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:
            async def watch():
                while not gate.is_set():
                    gauge.append(_waiting((await client.get("/metrics")).text))
                    await asyncio.sleep(0.005)

            watcher = asyncio.create_task(watch())
            posts = [asyncio.create_task(client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1}))
                     for _ in range(100)]
            deadline = time.monotonic() + 30
            while sum(p.done() for p in posts) < 100 - limit and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            full = _waiting((await client.get("/metrics")).text)
            gate.set()
            responses = await asyncio.gather(*posts)
            await watcher
        return responses, gauge, full

    monkeypatch.setattr(engine, "step", held_step)
    with running(build_app(async_engine, MODEL, max_waiting=limit)) as base:
        try:
            responses, gauge, full = asyncio.run(burst(base))
        finally:
            gate.set()
    assert collections.Counter(r.status_code for r in responses) == {200: limit, 429: 100 - limit}
    for response in responses:
        if response.status_code == 429:
            assert _assert_error(response, 429)["code"] == "rate_limit_exceeded"
            assert response.headers["retry-after"] == "1"
    assert full == limit and max(gauge) <= limit


def test_requests_that_can_never_fit_get_400(async_engine):
    max_num_seqs = async_engine.engine.config.max_num_seqs
    with running(build_app(async_engine, MODEL, max_waiting=8)) as base:
        error = _assert_error(httpx.post(f"{base}/v1/completions", json={"prompt": ["hi"] * 9}), 400, "prompt")
        assert "8" in error["message"] and "max-waiting" in error["message"]
        for body, param in (({"n": max_num_seqs + 1}, "n"), ({"best_of": max_num_seqs + 1}, "best_of")):
            error = _assert_error(httpx.post(f"{base}/v1/completions", json={"prompt": "hi", **body}), 400, param)
            assert f"max_num_seqs ({max_num_seqs})" in error["message"]
    with running(build_app(async_engine, MODEL, max_waiting=1000)) as base:
        error = _assert_error(httpx.post(f"{base}/v1/completions", json={"prompt": ["hi"] * (max_num_seqs + 1)}),
                              400, "prompt")
        assert f"max_num_seqs ({max_num_seqs})" in error["message"]


# ---- 5. Unicode, unexpected errors --------------------------------------------------------------

SURROGATES = [
    ("/v1/completions", {"prompt": "a\udc80b"}, "prompt"),
    ("/v1/completions", {"prompt": ["fine", "a\ud800"]}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "stop": ["\udc80"]}, "stop"),
    ("/v1/completions", {"prompt": "hi", "stop": "x\udfff"}, "stop"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"\udc80": "x"}}, "logit_bias"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a\udc80b"}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udc80"}]}]},
     "messages"),
    ("/tokenize", {"prompt": "a\udc80b"}, "prompt"),
    ("/tokenize", {"messages": [{"role": "user", "content": "\udc80"}]}, "messages"),
]


def test_lone_surrogates_get_400_on_a_kept_connection(url):
    with httpx.Client(base_url=url, timeout=30) as http:
        port = _client_port(http.get("/health"))
        for path, body, param in SURROGATES:
            response = http.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"})
            assert "lone surrogate" in _assert_error(response, 400, param)["message"] or param == "logit_bias"
            assert _client_port(response) == port, (path, body)
        assert _client_port(http.get("/health")) == port


def test_unexpected_error_is_an_openai_500_and_the_connection_survives(url, async_engine, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("injected")

    monkeypatch.setattr(async_engine.engine.tokenizer, "encode", broken)
    with httpx.Client(base_url=url, timeout=30) as http:
        response = http.post("/tokenize", json={"prompt": "hi"})
        assert _assert_error(response, 500)["type"] == "server_error"
        monkeypatch.undo()
        again = http.post("/tokenize", json={"prompt": "hi"})
        assert again.status_code == 200 and _client_port(again) == _client_port(response)


# ---- 6. temperature, best_of, shutdown ----------------------------------------------------------

def test_temperature_bound_and_best_of(url):
    _assert_error(httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "temperature": 101}), 400, "temperature")
    for body in ({"best_of": 1, "n": 2}, {"best_of": 129}, {"best_of": 2, "use_beam_search": True}):
        _assert_error(httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 3, **body}), 400,
                      "best_of")
    out = httpx.post(f"{url}/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 4, "best_of": 3,
                                                     "seed": 1, "logprobs": 0}, timeout=60).json()
    assert len(out["choices"]) == 1 and len(out["choices"][0]["logprobs"]["tokens"]) <= 4
    chat = httpx.post(f"{url}/v1/chat/completions", json={"messages": CHAT, "max_tokens": 3, "n": 2, "best_of": 3},
                      timeout=60).json()
    assert [c["index"] for c in chat["choices"]] == [0, 1]


def _graceful(app):
    """Serve `app` from a thread as `lmserve serve` does; setting `should_exit` is what SIGTERM does."""
    return serving(app, _GracefulServer, timeout_graceful_shutdown=10)


def test_shutdown_ends_streams_with_abort_usage_and_done(llm):
    doomed = AsyncEngine(LLM(kv_cache_memory="32MiB").engine).start()
    body = {"messages": CHAT, "ignore_eos": True, "stream": True,  # max_tokens: the rest of the context
            "stream_options": {"include_usage": True}}
    try:
        with _graceful(build_app(doomed, MODEL)) as server:
            base = f"http://127.0.0.1:{server.config.port}"
            with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=30) as response:
                lines = (line[6:] for line in response.iter_lines() if line.startswith("data: "))
                events = [next(lines), next(lines)]
                server.should_exit = True
                events += list(lines)
    finally:
        doomed.shutdown()
    assert events[-1] == "[DONE]"
    assert "shutting down" in json.loads(events[-2])["error"]["message"]
    usage, finish = json.loads(events[-3]), json.loads(events[-4])
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] >= 1
    assert finish["choices"][0]["finish_reason"] == "length"  # not "abort"


# ---- 8. chat templates that never end or build huge strings -------------------------------------

@pytest.mark.parametrize("template, problem", [(NESTED_LOOPS, "longer than"), (HUGE_STRING, "over the limit")])
def test_runaway_chat_templates_fail_fast(async_engine, template, problem):
    tokenizer = Tokenizer(async_engine.engine.tokenizer.backend, chat_template=template)
    start = time.perf_counter()
    with pytest.raises(LmserveError, match=f"chat template .*{problem}"):
        tokenizer.apply_chat_template(CHAT)
    assert time.perf_counter() - start < 3


def test_runaway_chat_template_is_a_400_and_health_answers(url, async_engine, monkeypatch):
    tokenizer = async_engine.engine.tokenizer
    monkeypatch.setattr(tokenizer, "chat_template", NESTED_LOOPS)
    monkeypatch.setattr(tokenizer, "_compiled_template", None)

    def chat():
        start = time.perf_counter()
        response = http.post("/v1/chat/completions", json={"messages": CHAT})
        assert "chat template" in _assert_error(response, 400)["message"] and time.perf_counter() - start < 3

    with httpx.Client(base_url=url, timeout=30) as http:
        _assert_responsive(url, chat)
