"""schemathesis against the server's own /openapi.json (issue 19): a real server on 127.0.0.1 with
the embedded SmolLM2 model, a bounded number of generated requests per operation (valid and
invalid ones), and every answer checked: no 5xx, a status code, content type and body that the
schema documents (400 with the OpenAI error body for a bad request, text/plain for /metrics,
text/event-stream for a stream). Generation is kept short (max_tokens at most 2) so the whole
module runs in well under a minute."""

from __future__ import annotations

import os

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from lmserve import LLM
from lmserve.server.async_engine import AsyncEngine

# Generated requests per operation, valid and invalid ones each; LMSERVE_SCHEMATHESIS_EXAMPLES=N runs
# N of them from a fresh random seed instead (a longer search, by hand).
EXPLORE = int(os.environ.get("LMSERVE_SCHEMATHESIS_EXAMPLES", "0"))
MAX_EXAMPLES = EXPLORE or 12
MAX_TOKENS = 2
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection]
GENERATING = {"/v1/completions", "/v1/chat/completions"}


@pytest.fixture(scope="module")
def async_engine():
    engine = AsyncEngine(LLM(kv_cache_memory="128MiB", max_model_len=512).engine).start()  # prompts stay short
    yield engine
    engine.shutdown()


def _short(case) -> None:
    """Keep generation short: max_tokens added or capped where it is a valid count (an invalid
    one, or an invalid body, is left as generated, to be refused)."""
    if case.path not in GENERATING or not isinstance(case.body, dict):
        return
    names = ("max_tokens", "max_completion_tokens")
    for name in names:
        if type(case.body.get(name)) is int and case.body[name] > MAX_TOKENS:
            case.body[name] = MAX_TOKENS
    if all(case.body.get(name) is None for name in names):  # absent or null: up to the context's end
        case.body["max_tokens"] = MAX_TOKENS


def test_api_matches_its_schema(url):
    """Each operation, with valid then invalid requests: every failure found is reported at the end
    (hypothesis stops an operation's run at its first, shrunk)."""
    config = SchemathesisConfig.from_dict({"seed": 19, "generation": {"database": "none"}, "request-timeout": 60})
    api = schemathesis.openapi.from_url(f"{url}/openapi.json", config=config)
    failures, ran = [], 0
    for result in api.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=not EXPLORE, database=None,
                      suppress_health_check=list(HealthCheck), phases=[Phase.generate])
            @given(case=operation.as_strategy(generation_mode=mode))
            def check(case):
                _short(case)
                case.call_and_validate(checks=CHECKS)

            try:
                check()
            except Unsatisfiable:  # nothing to make invalid (no body, no parameters)
                continue
            except (Exception, FailureGroup) as exc:  # noqa: BLE001 - collected, reported below
                failures.append(f"{operation.label} ({mode}): {exc}")
            ran += 1
    assert ran >= 9 + 5, ran  # every operation with valid requests, those that take input with invalid ones
    assert not failures, "\n\n".join(failures)


def test_openapi_documents_400_errors_and_real_content_types(url):
    schema = httpx.get(f"{url}/openapi.json").json()
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    for path, methods in schema["paths"].items():
        for method, operation in methods.items():
            assert "422" not in operation["responses"], (method, path)
    completions = schema["paths"]["/v1/completions"]["post"]["responses"]
    assert completions["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert set(completions["200"]["content"]) == {"application/json", "text/event-stream"}
    assert set(schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
