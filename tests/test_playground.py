"""The playground (GET /, /static) and the inference X-ray: `"xray": true` records on a real loopback
server with the embedded SmolLM2, /v1/engine/status, the API-key exemptions, and the page itself
driven in Debian's headless chromium (selenium + chromium-driver; skipped when they are missing)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import httpx
import openai
import pytest

from lmserve.server import build_app
from lmserve.server.async_engine import AsyncEngine
from tests.test_server import MODEL, running

KEY = "playground-key"
CHAT = [{"role": "user", "content": "Name a fruit."}]


@pytest.fixture(scope="module")
def async_engine():
    from lmserve import LLM
    engine = AsyncEngine(LLM(deterministic=True).engine).start()
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def keyed_url(async_engine):
    with running(build_app(async_engine, MODEL, api_key=KEY)) as base:
        yield base


def _stream(url: str, body: dict, key: str | None = None) -> list[dict]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    chunks = []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={"model": MODEL, "stream": True, **body},
                      headers=headers, timeout=60) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    return chunks


def _records(chunks: list[dict]) -> list[dict]:
    return [r for c in chunks for choice in c["choices"] for r in choice.get("xray") or []]


def test_xray_greedy_records_are_consistent(url, client):
    chunks = _stream(url, {"messages": CHAT, "max_tokens": 24, "temperature": 0, "ignore_eos": True, "xray": True})
    text = "".join(choice["delta"].get("content") or "" for c in chunks for choice in c["choices"])
    records = _records(chunks)
    assert len(records) == 24
    prompt = [c["xray"] for c in chunks if "xray" in c]
    assert len(prompt) == 1 and chunks[0].get("xray") == prompt[0]  # the first chunk only
    prompt = prompt[0]
    assert len(prompt["prompt_token_ids"]) == len(prompt["prompt_tokens"]) == prompt["num_prompt_tokens"]
    assert prompt["special"] and all("<|" in prompt["prompt_tokens"][i] for i in prompt["special"])
    assert 0 <= prompt["cached_tokens"] < prompt["num_prompt_tokens"]
    assert prompt["prefill"] and sum(p["tokens"] for p in prompt["prefill"]) \
        == prompt["num_prompt_tokens"] - prompt["cached_tokens"]
    steps = [r["step"] for r in records]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)
    for r in records:
        assert r["rank"] == 0 and r["top"][0][2] == r["token_id"] and r["top_processed"][0][2] == r["token_id"]
        assert r["token"] == r["top"][0][0] and r["params"]["greedy"]
        assert r["batch_size"] >= 1 and r["kv_blocks"] >= 1
        assert abs(r["logprob"] - r["top"][0][1]) < 1e-5
    blocks = [r["kv_blocks"] for r in records]
    assert blocks == sorted(blocks) and blocks[-1] > blocks[0]  # 24 tokens cross a block boundary
    assert [r["t"] for r in records] == sorted(r["t"] for r in records)
    # the same request without the X-ray: the same text, and no xray field anywhere
    plain = _stream(url, {"messages": CHAT, "max_tokens": 24, "temperature": 0, "ignore_eos": True})
    assert "".join(choice["delta"].get("content") or "" for c in plain for choice in c["choices"]) == text
    assert not any("xray" in c or any("xray" in choice for choice in c["choices"]) for c in plain)
    # a second identical prompt is served from the prefix cache
    again = _stream(url, {"messages": CHAT, "max_tokens": 2, "temperature": 0, "xray": True})
    assert again[0]["xray"]["cached_tokens"] > 0


def test_xray_filters_and_non_streamed(client):
    response = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6, temperature=0.9,
                                              seed=1, extra_body={"xray": True, "top_k": 3})
    records = response.choices[0].model_extra["xray"]
    assert len(records) == response.usage.completion_tokens == len(records)
    for r in records:
        assert 1 <= len(r["top_processed"]) <= 3 and r["kept"] <= 3 and 0 <= r["rank"] < 3
        assert r["token_id"] in [c[2] for c in r["top_processed"]]
        assert abs(sum(2.718281828 ** c[1] for c in r["top_processed"]) - 1) < 1e-3  # renormalized
        assert r["params"]["top_k"] == 3 and not r["params"]["greedy"]
    assert response.model_extra["xray"]["num_prompt_tokens"] == response.usage.prompt_tokens
    plain = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6, temperature=0.9, seed=1,
                                           extra_body={"top_k": 3})
    assert plain.choices[0].message.content == response.choices[0].message.content
    assert "xray" not in (plain.choices[0].model_extra or {}) and "xray" not in (plain.model_extra or {})


def test_xray_completions_stream(url):
    with httpx.stream("POST", f"{url}/v1/completions", json={"model": MODEL, "prompt": "The capital of France is",
                                                             "max_tokens": 4, "temperature": 0, "stream": True,
                                                             "xray": True}, timeout=60) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    assert chunks[0]["xray"]["num_prompt_tokens"] == 5
    assert len(_records(chunks)) == 4


def test_engine_status(url, keyed_url):
    status = httpx.get(f"{url}/v1/engine/status").json()  # starts the recording
    assert status["object"] == "engine.status" and status["num_kv_blocks"] > 0 and status["block_size"] > 0
    _stream(url, {"messages": CHAT, "max_tokens": 3, "temperature": 0})
    status = httpx.get(f"{url}/v1/engine/status", params={"steps": 256}).json()
    assert 0 <= status["kv_cache_usage"] <= 1 and 0 <= status["prefix_cache_hit_rate"] <= 1
    steps = status["steps"]
    assert len(steps) >= 3 and [s["step"] for s in steps] == sorted(s["step"] for s in steps)
    ours = [s for s in steps if any(r[0].startswith("chatcmpl-") for r in s["requests"])]
    assert any(r[1] > 0 for s in ours for r in s["requests"])  # a prefill chunk
    assert any(r[2] == 1 for s in ours for r in s["requests"])  # decode steps
    assert all(s["ms"] >= 0 and s["preemptions"] >= 0 for s in steps)
    assert len(httpx.get(f"{url}/v1/engine/status", params={"steps": 2}).json()["steps"]) == 2
    assert httpx.get(f"{url}/v1/engine/status", params={"steps": 9999}).status_code == 400
    # the key guards the status and the API, not the page and its files
    assert httpx.get(f"{keyed_url}/v1/engine/status").status_code == 401
    assert httpx.get(f"{keyed_url}/v1/engine/status", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    page = httpx.get(f"{keyed_url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html") and "app.js" in page.text
    for name, kind in (("app.js", "javascript"), ("style.css", "text/css")):
        response = httpx.get(f"{keyed_url}/static/{name}")
        assert response.status_code == 200 and kind in response.headers["content-type"]
    assert httpx.post(f"{keyed_url}/", json={}).status_code == 401
    assert httpx.get(f"{keyed_url}/static/../v1/models").status_code in (401, 404)
    assert httpx.get(f"{keyed_url}/v1/models").status_code == 401


# ---- the page in a real browser ------------------------------------------------------------------

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def browser():
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip(f"browser tests need Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER})")
    webdriver = pytest.importorskip("selenium.webdriver", reason="browser tests need selenium (pip install selenium)")
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def _shot(driver, tmp_path: Path, name: str) -> None:
    driver.save_screenshot(str(tmp_path / f"{name}.png"))


def test_page_chats_and_shows_xray(browser, keyed_url, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    expected = openai.OpenAI(base_url=f"{keyed_url}/v1", api_key=KEY, max_retries=0).chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=12, temperature=0, top_p=1).choices[0].message.content
    driver, wait = browser, WebDriverWait(browser, 60)
    driver.get(f"{keyed_url}/")  # served without the key
    key = driver.find_element(By.ID, "api-key")
    key.send_keys(KEY, Keys.TAB)  # stored, and the model list reloads with it
    wait.until(lambda d: d.find_element(By.ID, "model").get_attribute("value") == MODEL)
    driver.find_element(By.CSS_SELECTOR, ".settings summary").click()
    for field, value in (("temperature", "0"), ("max-tokens", "12")):
        box = driver.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    box = driver.find_element(By.ID, "input")
    box.send_keys(CHAT[0]["content"], Keys.ENTER)
    reply = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".msg.assistant[data-done='true']"))
    _shot(driver, tmp_path, "chat")
    assert reply.find_element(By.CSS_SELECTOR, ".content").text == expected.strip() or \
        reply.find_element(By.CSS_SELECTOR, ".content").get_attribute("textContent") == expected
    assert "error" not in reply.get_attribute("class")

    driver.find_element(By.ID, "xray-toggle").click()
    box.send_keys("And a vegetable?", Keys.ENTER)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done='true']")) == 2)
    rows = driver.find_elements(By.CSS_SELECTOR, "#xray-tokens tr.xray-token")
    assert 1 <= len(rows) <= 12 and driver.find_element(By.ID, "xray").is_displayed()  # EOS may end it early
    assert rows[0].find_elements(By.CSS_SELECTOR, ".cand-text.sampled")  # the sampled token among the candidates
    assert driver.find_elements(By.CSS_SELECTOR, "#xray-prompt .tok.special")
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#timeline .step .seg"))
    driver.find_element(By.ID, "theme").click()
    assert driver.execute_script("return document.documentElement.dataset.theme") in ("dark", "light")
    _shot(driver, tmp_path, "xray")
    out = os.environ.get("LMSERVE_SCREENSHOTS")
    if out:
        for png in tmp_path.glob("*.png"):
            shutil.copy(png, Path(out) / png.name)
