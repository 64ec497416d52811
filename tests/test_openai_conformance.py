"""OpenAI-API conformance of the server and structured output through it: a real uvicorn server on
127.0.0.1 with the embedded SmolLM2, driven by the official `openai` client and by raw httpx.

Covers echo + logprobs (checked against `LLMEngine.score`), max_tokens 0, response_format and the
guided_* fields (outputs validated with jsonschema / re), `chat.completions.parse`, models/{id},
the developer role, null fields, content parts, system_fingerprint, finish reasons, unknown
fields and /tokenizer_info."""

from __future__ import annotations

import json
import logging
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest
import tokenizers
import torch
from pydantic import BaseModel, Field

from lmserve import LLM
from lmserve.server import build_app
from lmserve.server.async_engine import AsyncEngine
from lmserve.server.protocol import FINISH_REASONS
from tests.test_server import MODEL, running

PROMPT = "The capital of France is Paris. The capital of Italy is"
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a fruit."}]
PERSON_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12},
                   "age": {"type": "integer", "minimum": 0, "maximum": 120},
                   "pets": {"type": "array", "items": {"enum": ["cat", "dog", "fish"]}, "maxItems": 3}},
    "required": ["name", "age", "pets"], "additionalProperties": False}
PERSON_CHAT = [{"role": "user", "content": "Describe a person as JSON with name, age and pets."}]
SAMPLES = 10


@pytest.fixture(scope="module")
def async_engine():
    # Not deterministic mode (its dequantize-then-GEMM decode is several times slower): the tests
    # that compare two requests' outputs send each alone, and without the prefix cache a request
    # alone is computed the same way every time.
    engine = AsyncEngine(LLM(enable_prefix_caching=False).engine).start()
    yield engine
    engine.shutdown()




@pytest.fixture(scope="module")
def reference(async_engine):
    """`LLMEngine.score` called directly on the served engine (the reference the server's echo
    logprobs must equal), from this thread while the engine thread idles: no request is in flight
    between the tests' HTTP calls, and its thread then sleeps on its command queue."""
    engine = async_engine.engine
    assert not engine.has_unfinished_requests()
    return engine


def _error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    if param is not None:
        assert error["param"] == param, error
    return error


def _events(response: httpx.Response) -> list[dict]:
    lines = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


# ---- echo + logprobs, max_tokens 0 ----------------------------------------------------------------

def test_echo_logprobs_equal_engine_score(client, http, reference):
    ids = http.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    expected = torch.log_softmax(reference.score(ids)[:-1].float(), dim=-1)
    want = expected.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()

    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0, echo=True, logprobs=2)
    choice = out.choices[0]
    lp = choice.logprobs
    assert choice.text == PROMPT and choice.finish_reason == "length"
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == 0
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
    for position, top in enumerate(lp.top_logprobs[1:]):
        best = expected[position].topk(2)
        names = [reference.tokenizer.decode([t], skip_special_tokens=False) for t in best.indices.tolist()]
        assert len(top) in (2, 3) and set(names) <= set(top)
        assert [top[name] for name in names] == pytest.approx(best.values.tolist(), abs=1e-4)
    assert "".join(lp.tokens) == PROMPT and lp.text_offset[0] == 0
    assert all(PROMPT[o:o + len(t)] == t for o, t in zip(lp.text_offset, lp.tokens))

    # The same prompt as token ids scores the same.
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=0, echo=True, logprobs=0)
    assert by_ids.choices[0].logprobs.token_logprobs[1:] == pytest.approx(want, abs=1e-4)


def test_echo_logprobs_with_generation_streamed_and_not(client, http, reference):
    ids = http.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    kwargs = dict(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, echo=True, logprobs=1)
    out = client.completions.create(**kwargs)
    choice = out.choices[0]
    lp = choice.logprobs
    completion = choice.text[len(PROMPT):]
    assert choice.text.startswith(PROMPT) and completion
    assert len(lp.tokens) == len(ids) + out.usage.completion_tokens
    assert lp.token_logprobs[0] is None and all(v is not None for v in lp.token_logprobs[1:])
    # The prompt part is the scoring path's, the completion part the sampler's: both the model's
    # log-probabilities of those tokens given what precedes them, aligned token by token (scored
    # here as one longer sequence, whose kernels may round differently: an off-by-one is nats off).
    generated = http.post("/tokenize", json={"prompt": choice.text, "add_special_tokens": False}).json()["tokens"]
    assert generated[:len(ids)] == ids and len(generated) == len(lp.tokens)  # re-tokenizes the same
    full = torch.log_softmax(reference.score(generated)[:-1].float(), dim=-1)
    want = full.gather(1, torch.tensor(generated[1:])[:, None])[:, 0].tolist()
    assert lp.token_logprobs[1:] == pytest.approx(want, abs=1e-2)
    assert lp.text_offset[len(ids)] == len(PROMPT)
    assert lp.text_offset == sorted(lp.text_offset)
    assert all(choice.text[o:o + len(t)] == t for o, t in zip(lp.text_offset, lp.tokens))

    text, streamed = "", {"tokens": [], "token_logprobs": [], "text_offset": []}
    for chunk in client.completions.create(**kwargs, stream=True):
        for c in chunk.choices:
            text += c.text
            if c.logprobs is not None:
                for key in streamed:
                    streamed[key] += getattr(c.logprobs, key)
    assert text == choice.text
    assert streamed["tokens"] == lp.tokens and streamed["text_offset"] == lp.text_offset
    assert streamed["token_logprobs"][0] is None
    assert streamed["token_logprobs"][1:] == pytest.approx(lp.token_logprobs[1:], abs=1e-5)


def test_max_tokens_zero(client, http):
    out = client.completions.create(model=MODEL, prompt=[PROMPT, "Hello"], max_tokens=0, echo=True, n=2)
    assert [c.text for c in out.choices] == [PROMPT, PROMPT, "Hello", "Hello"]
    assert [c.index for c in out.choices] == [0, 1, 2, 3] and {c.finish_reason for c in out.choices} == {"length"}
    counts = [http.post("/tokenize", json={"prompt": p}).json()["count"] for p in (PROMPT, "Hello")]
    assert out.usage.prompt_tokens == sum(counts) and out.usage.completion_tokens == 0
    bare = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0)
    assert bare.choices[0].text == "" and bare.usage.completion_tokens == 0
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0, echo=True, logprobs=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].text == PROMPT and chunks[0].choices[0].logprobs.token_logprobs[0] is None
    assert chunks[-1].usage.prompt_tokens == counts[0]
    # still checked: other fields, the context, the vocabulary
    _error(http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 0, "temperature": -1}), 400,
           "temperature")
    _error(http.post("/v1/completions", json={"prompt": [10**7], "max_tokens": 0, "echo": True}), 400, "prompt")
    error = _error(http.post("/v1/completions", json={"prompt": "hi " * 9000, "max_tokens": 0, "echo": True,
                                                       "logprobs": 1}), 400, "prompt")
    assert error["code"] == "context_length_exceeded"
    _error(http.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 0}), 400, "max_tokens")


# ---- structured output ------------------------------------------------------------------------------

def _samples(http, bodies: dict[str, dict]) -> dict[str, list[dict]]:
    """For each body, its n (default SAMPLES) seeded samples at temperature 1 (one request); the
    requests are sent at once, so the engine decodes them in one batch."""
    def one(body: dict) -> list[dict]:
        response = http.post("/v1/chat/completions", json={"messages": PERSON_CHAT, "temperature": 1.0, "seed": 7,
                                                           "n": SAMPLES, **body})
        assert response.status_code == 200, response.text
        choices = response.json()["choices"]
        assert len(choices) == body.get("n", SAMPLES), choices
        return choices

    with ThreadPoolExecutor(len(bodies)) as pool:
        futures = {name: pool.submit(one, body) for name, body in bodies.items()}
        return {name: future.result() for name, future in futures.items()}


def _finished_texts(choices: list[dict]) -> list[str]:
    assert {c["finish_reason"] for c in choices} == {"stop"}, choices
    return [c["message"]["content"] for c in choices]


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


REGEX = r"[A-Z][a-z]{2,8} (is|was) [0-9]{1,2}"
CHOICES = ["apple", "banana", "cherry pie"]
GBNF = 'root ::= answer " because " reason\nanswer ::= "yes" | "no"\nreason ::= [a-z]{1,10}'
LARK = 'start: NUMBER "+" NUMBER "=" NUMBER\nNUMBER: /[1-9][0-9]?/'


def test_every_constraint_validates(http):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA, "strict": True}}
    out = _samples(http, {
        "json_schema": {"response_format": fmt, "max_tokens": 80},
        "guided_json": {"guided_json": json.dumps(PERSON_SCHEMA), "max_tokens": 80},
        # fewer samples of the simpler constraints: the whole batch decodes at CPU speed
        "json_object": {"response_format": {"type": "json_object"}, "guided_json": None, "max_tokens": 60, "n": 6},
        "regex": {"guided_regex": REGEX, "max_tokens": 20, "n": 6},
        "choice": {"guided_choice": CHOICES, "max_tokens": 10, "n": 6},
        "gbnf": {"guided_grammar": GBNF, "max_tokens": 20, "n": 6},
        "lark": {"guided_grammar": LARK, "max_tokens": 12, "response_format": {"type": "text"}, "n": 6},
        "free": {"max_tokens": 8, "n": 4},
    })
    for name in ("json_schema", "guided_json"):
        texts = _finished_texts(out[name])
        for text in texts:
            jsonschema.validate(json.loads(text), PERSON_SCHEMA)
        assert len(set(texts)) > 1  # sampled, not one forced string
    # any JSON object: unbounded, so a sample may run out of tokens; every finished one parses
    finished = [c["message"]["content"] for c in out["json_object"] if c["finish_reason"] == "stop"]
    assert len(finished) >= 3 and all(_is_json_object(text) for text in finished), out["json_object"]
    assert all(c["message"]["content"].startswith("{") for c in out["json_object"])
    assert all(re.fullmatch(REGEX, text) for text in _finished_texts(out["regex"])), out["regex"]
    assert set(_finished_texts(out["choice"])) <= set(CHOICES)
    assert all(re.fullmatch(r"(yes|no) because [a-z]{1,10}", t) for t in _finished_texts(out["gbnf"])), out["gbnf"]
    assert all(re.fullmatch(r"[1-9][0-9]?\+[1-9][0-9]?=[1-9][0-9]?", t) for t in _finished_texts(out["lark"])), \
        out["lark"]
    # the same prompt unconstrained is not JSON: the constraint is what made it so
    assert not all(_is_json_object(c["message"]["content"]) for c in out["free"])


def test_structured_completions_and_length_mid_structure(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA}}
    out = client.completions.create(model=MODEL, prompt="A person in JSON:", max_tokens=80, temperature=1, seed=3,
                                    n=2, extra_body={"response_format": fmt})
    for c in out.choices:
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.text), PERSON_SCHEMA)
    short = client.completions.create(model=MODEL, prompt="A person in JSON:", max_tokens=3,
                                      extra_body={"response_format": fmt})
    assert short.choices[0].finish_reason == "length" and not _is_json_object(short.choices[0].text)


class Person(BaseModel):
    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=120)


def test_chat_completions_parse_streamed_and_not(client):
    kwargs = dict(model=MODEL, messages=PERSON_CHAT, response_format=Person, max_tokens=60, temperature=0)
    parsed = client.chat.completions.parse(**kwargs).choices[0].message.parsed
    assert isinstance(parsed, Person)
    with client.chat.completions.stream(**kwargs) as stream:
        deltas = [event.delta for event in stream if event.type == "content.delta"]
        final = stream.get_final_completion()
    assert len(deltas) > 1  # really streamed
    assert isinstance(final.choices[0].message.parsed, Person) and final.choices[0].message.parsed == parsed


@pytest.mark.parametrize("body, param, words", [
    ({"guided_regex": "(unclosed"}, "structured_outputs", ["regex"]),
    ({"guided_grammar": "root ::= missing_rule"}, "structured_outputs", ["missing_rule"]),
    ({"guided_json": "{not json"}, "structured_outputs", ["json"]),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "structured_outputs", ["nonsense"]),
    ({"response_format": {"type": "json_schema"}}, "response_format", ["json_schema"]),
    ({"response_format": {"type": "xml"}}, "response_format", []),
    ({"guided_choice": []}, "guided_choice", []),
    ({"guided_regex": "a+", "guided_choice": ["a"]}, "guided_choice", ["guided_regex", "guided_choice"]),
    ({"response_format": {"type": "json_object"}, "guided_grammar": "root ::= \"a\""}, "guided_grammar",
     ["response_format", "guided_grammar"]),
])
def test_bad_constraints_are_400_naming_the_problem(http, body, param, words):
    for path, base in (("/v1/chat/completions", {"messages": CHAT}), ("/v1/completions", {"prompt": "x"}),
                       ("/v1/chat/completions", {"messages": CHAT, "stream": True})):  # refused before streaming
        error = _error(http.post(path, json={**base, "max_tokens": 4, **body}), 400, param)
        assert all(word.lower() in error["message"].lower() for word in words), error


# ---- other conformance items ------------------------------------------------------------------------

def test_model_by_id(client, url):
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("gpt-nonexistent")
    error = caught.value.body
    assert error["code"] == "model_not_found" and "gpt-nonexistent" in error["message"]
    assert httpx.get(f"{url}/v1/models/org/model").status_code == 404


def test_developer_role_is_system(http):
    developer = [{"role": "developer", "content": CHAT[0]["content"]}, CHAT[1]]
    as_system = http.post("/tokenize", json={"messages": CHAT}).json()["tokens"]
    assert http.post("/tokenize", json={"messages": developer}).json()["tokens"] == as_system
    answers = [http.post("/v1/chat/completions", json={"messages": m, "max_tokens": 8, "temperature": 0}).json()
               for m in (CHAT, developer)]
    assert answers[0]["choices"][0]["message"] == answers[1]["choices"][0]["message"]
    assert answers[0]["usage"] == answers[1]["usage"]


def test_null_means_default(http):
    chat_nulls = {k: None for k in ("top_p", "n", "stream", "logprobs", "top_logprobs", "presence_penalty",
                                    "frequency_penalty", "stop", "max_completion_tokens", "user", "logit_bias",
                                    "stream_options", "response_format", "metadata", "store", "tools")}
    base = {"messages": CHAT, "max_tokens": 6, "temperature": 0}
    plain = http.post("/v1/chat/completions", json=base).json()
    nulled = http.post("/v1/chat/completions", json={**base, **chat_nulls}).json()
    assert nulled["choices"] == plain["choices"]
    # null temperature: the default 1.0 (a seeded sample equals an explicit 1.0's)
    seeded = {"messages": CHAT, "max_tokens": 8, "seed": 11}
    texts = [http.post("/v1/chat/completions", json={**seeded, "temperature": t}).json()["choices"][0]["message"]
             for t in (None, 1.0)]
    assert texts[0] == texts[1]
    completion_nulls = {k: None for k in ("echo", "logprobs", "best_of", "suffix", "seed", "top_k", "n")}
    out = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": None, "ignore_eos": True,
                                             "temperature": 0, **completion_nulls}).json()
    assert out["usage"]["completion_tokens"] == 16  # OpenAI's default max_tokens for completions
    _error(http.post("/v1/completions", json={"prompt": None}), 400, "prompt")
    _error(http.post("/v1/chat/completions", json={"messages": [{"role": None, "content": "x"}]}), 400, "messages")


def test_content_as_text_parts(http):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Name a"}, {"type": "text", "text": "fruit."}]}]
    joined = [{"role": "user", "content": "Name a\nfruit."}]
    assert (http.post("/tokenize", json={"messages": parts}).json()["tokens"]
            == http.post("/tokenize", json={"messages": joined}).json()["tokens"])
    assert http.post("/v1/chat/completions", json={"messages": parts, "max_tokens": 2}).status_code == 200
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    error = _error(http.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, image]}]}), 400,
        "messages")
    assert "image_url" in error["message"] and "part 1" in error["message"]


def test_system_fingerprint_everywhere(client):
    chat = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3)
    completion = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3)
    assert chat.system_fingerprint and chat.system_fingerprint == completion.system_fingerprint
    for chunks in (client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3, stream=True,
                                                  stream_options={"include_usage": True}),
                   client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, stream=True)):
        assert {c.system_fingerprint for c in chunks} == {chat.system_fingerprint}


def test_finish_reasons_are_openai_ones_after_a_timeout(async_engine):
    body = {"messages": CHAT, "max_tokens": 4000, "ignore_eos": True, "stream": True}
    with running(build_app(async_engine, MODEL, request_timeout=1.5)) as base:
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=60) as response:
            events = _events(response)
        done = httpx.post(f"{base}/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}, timeout=60).json()
    reasons = [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]]
    assert reasons == ["length"]  # cut short by the server's time limit: not "abort"
    assert set(reasons) | {done["choices"][0]["finish_reason"]} <= FINISH_REASONS


def test_unknown_fields_warn_once_and_unsupported_ones_are_400(http, caplog, monkeypatch):
    from lmserve.server import protocol

    # the set is per process and capped: a fuzzer that ran before may have filled it
    monkeypatch.setattr(protocol, "_UNKNOWN_FIELDS_LOGGED", set())
    with caplog.at_level(logging.WARNING, logger="lmserve.server"):
        for _ in range(2):
            body = {"prompt": PROMPT, "max_tokens": 1, "frobnicate_level": 3, "another_knob": {"x": 1}}
            assert http.post("/v1/completions", json=body).status_code == 200
    warned = [r.getMessage() for r in caplog.records if r.name == "lmserve.server" and r.levelno == logging.WARNING]
    assert sum("frobnicate_level" in m for m in warned) == 1 and sum("another_knob" in m for m in warned) == 1
    _error(http.post("/v1/completions", json={"prompt": PROMPT, "suffix": " the end."}), 400, "suffix")
    _error(http.post("/v1/chat/completions", json={"messages": CHAT, "audio": {"voice": "alloy"}}), 400, "audio")
    _error(http.post("/v1/chat/completions", json={"messages": CHAT, "modalities": ["text", "audio"]}), 400,
           "modalities")
    body = {"messages": CHAT, "max_tokens": 1, "modalities": ["text"], "store": False, "metadata": {"a": "b"},
            "service_tier": "auto", "reasoning_effort": "low"}
    assert http.post("/v1/chat/completions", json=body).status_code == 200


def test_tokenizer_info(http, async_engine):
    info = http.get("/tokenizer_info", params={"include_tokenizer_json": "true"}).json()
    tokenizer = tokenizers.Tokenizer.from_str(json.dumps(info["tokenizer_json"]))
    for text in ("Hello world", PROMPT, "naïve café — 東京"):
        assert tokenizer.encode(text).ids == http.post("/tokenize", json={"prompt": text}).json()["tokens"]
    assert info["vocab_size"] == tokenizer.get_vocab_size(with_added_tokens=True)
    assert info["max_model_len"] == http.get("/v1/models").json()["data"][0]["max_model_len"]
    for name in ("bos", "eos"):
        assert tokenizer.id_to_token(info[f"{name}_token_id"]) == info[f"{name}_token"]
        assert info["special_tokens"][info[f"{name}_token"]] == info[f"{name}_token_id"]
    assert set(info["stop_token_ids"]) >= {info["eos_token_id"]}
    assert info["chat_template"] and "messages" in info["chat_template"]
    assert "tokenizer_json" not in http.get("/tokenizer_info").json()
