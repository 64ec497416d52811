"""LoRA adapters through the server and the command line, on the embedded SmolLM2: adapters as
models (`--lora-modules`), loading and unloading at run time while other requests stream, the
API key on those routes, bad adapters answered 400, and `lmserve generate --lora`."""

import threading

import httpx
import openai
import pytest

from lmserve import LLM, LoRARequest, SamplingParams
from lmserve.entrypoints.cli import main
from lmserve.server import build_app
from lmserve.server.async_engine import AsyncEngine
from tests.lora_adapters import write_random_adapter
from tests.test_server import MODEL, running

QUESTION = [{"role": "user", "content": "Name a colour."}]
GREEDY = SamplingParams(max_tokens=12, temperature=0)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Two random adapters for SmolLM2's shapes: names -> directories."""
    from lmserve.loader import open_checkpoint

    config = open_checkpoint(None).config
    root = tmp_path_factory.mktemp("smollm2-adapters")
    return {"qv": write_random_adapter(root / "qv", config, ("q_proj", "v_proj"), rank=8, seed=1, std=0.05),
            "mlp": write_random_adapter(root / "mlp", config, ("gate_proj", "up_proj", "down_proj"), rank=16,
                                        seed=2, std=0.04)}


@pytest.fixture(scope="module")
def expected(adapters):
    """Greedy replies offline: base, each adapter."""
    llm = LLM(enable_lora=True, deterministic=True)
    replies = {None: llm.chat(QUESTION, GREEDY, use_tqdm=False)[0].outputs[0].text}
    for i, (name, path) in enumerate(adapters.items()):
        replies[name] = llm.chat(QUESTION, GREEDY, use_tqdm=False,
                                 lora_request=LoRARequest(name, i + 1, path))[0].outputs[0].text
    return replies


@pytest.fixture(scope="module")
def async_engine(expected):
    engine = AsyncEngine(LLM(enable_lora=True, deterministic=True, max_loras=2).engine).start()
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def url(async_engine, adapters):
    with running(build_app(async_engine, MODEL, lora_modules={"qv": adapters["qv"]})) as base:
        yield base


def _reply(client, model):
    return client.chat.completions.create(model=model, messages=QUESTION, max_tokens=12,
                                          temperature=0).choices[0].message.content


def test_adapters_are_models_and_give_their_own_replies(client, http, expected):
    assert len(set(expected.values())) == 3  # the adapters change the reply
    cards = {card["id"]: card for card in http.get("/v1/models").json()["data"]}
    assert set(cards) == {MODEL, "qv"} and cards["qv"]["parent"] == MODEL
    assert http.get("/v1/models/qv").json()["parent"] == MODEL
    assert _reply(client, "qv") == expected["qv"]
    assert _reply(client, MODEL) == expected[None]
    response = client.chat.completions.create(model="qv", messages=QUESTION, max_tokens=2)
    assert response.model == "qv"
    with pytest.raises(openai.NotFoundError, match="'qv'"):
        _reply(client, "nope")


def test_load_and_unload_at_run_time(client, http, adapters, expected, tmp_path):
    body = {"lora_name": "mlp", "lora_path": adapters["mlp"]}
    assert http.post("/v1/load_lora_adapter", json=body).status_code == 200
    assert _reply(client, "mlp") == expected["mlp"]
    again = http.post("/v1/load_lora_adapter", json=body)
    assert again.status_code == 400 and "already loaded" in again.json()["error"]["message"]
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "mlp"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        _reply(client, "mlp")
    gone = http.post("/v1/unload_lora_adapter", json={"lora_name": "mlp"})
    assert gone.status_code == 404 and gone.json()["error"]["param"] == "lora_name"
    bad = http.post("/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": str(tmp_path / "none")})
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "lora_path" and "no such directory" in bad.json()["error"]["message"]
    assert "bad" not in {card["id"] for card in http.get("/v1/models").json()["data"]}


def test_unloading_waits_for_the_requests_running_on_it(client, http, adapters, expected):
    assert http.post("/v1/load_lora_adapter", json={"lora_name": "mlp", "lora_path": adapters["mlp"]}).is_success
    stream = client.chat.completions.create(model="mlp", messages=QUESTION, max_tokens=12, temperature=0,
                                            stream=True)
    chunks = iter(stream)
    text = next(chunks).choices[0].delta.content or ""
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "mlp"}).is_success
    text += "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == expected["mlp"]


def rss_mib() -> float:
    """This process's resident memory (the server runs in it)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


def test_fifty_load_unload_cycles_while_others_stream(client, http, adapters, expected):
    failures, replies = [], []

    def stream_requests():
        try:
            for model in ["qv", MODEL] * 3:
                stream = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=12,
                                                        temperature=0, stream=True)
                replies.append((model, "".join(c.choices[0].delta.content or "" for c in stream if c.choices)))
        except Exception as exc:  # reported below
            failures.append(exc)

    workers = [threading.Thread(target=stream_requests) for _ in range(2)]
    for worker in workers:
        worker.start()
    body = {"lora_name": "cycled", "lora_path": adapters["mlp"]}
    sizes = []
    for cycle in range(50):
        assert http.post("/v1/load_lora_adapter", json=body).is_success
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": "cycled"}).is_success
        if cycle in (10, 49):
            sizes.append(rss_mib())
    for worker in workers:
        worker.join(120)
    assert not failures and len(replies) == 12
    assert all(text == expected["qv" if model == "qv" else None] for model, text in replies)
    assert sizes[1] - sizes[0] < 16, f"RSS grew {sizes[1] - sizes[0]:.1f} MiB over 39 cycles"


def test_adapter_routes_need_the_api_key(async_engine, adapters):
    with running(build_app(async_engine, MODEL, api_key="secret")) as base:
        body = {"lora_name": "keyed", "lora_path": adapters["mlp"]}
        assert httpx.post(f"{base}/v1/load_lora_adapter", json=body).status_code == 401
        assert httpx.post(f"{base}/v1/unload_lora_adapter", json={"lora_name": "qv"}).status_code == 401
        headers = {"Authorization": "Bearer secret"}
        assert httpx.post(f"{base}/v1/load_lora_adapter", json=body, headers=headers).status_code == 200
        assert httpx.post(f"{base}/v1/unload_lora_adapter", json={"lora_name": "keyed"}, headers=headers).is_success


def test_bad_lora_module_stops_the_start(async_engine, tmp_path):
    from lmserve.errors import LmserveError

    with pytest.raises(LmserveError, match="'broken'.*no such directory"):
        build_app(async_engine, MODEL, lora_modules={"broken": str(tmp_path / "missing")})


def test_cli_generate_with_lora(adapters, expected, capsys):
    argv = ["generate", "--chat", "Name a colour.", "--max-tokens", "12", "--deterministic"]
    assert main(argv + ["--lora", adapters["qv"]]) == 0
    assert capsys.readouterr().out.strip() == expected["qv"].strip()
    assert main(argv + ["--lora", "/nonexistent/adapter"]) == 2
    assert "no such directory" in capsys.readouterr().err
