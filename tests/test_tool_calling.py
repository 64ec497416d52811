"""Tool calling on /v1/chat/completions: `tools`, `tool_choice`, `parallel_tool_calls` through the
official `openai` client against a real server with SmolLM2 (constrained calls for `required` and a
named function, streamed and not, a full round trip), and the pure parts of `server/tools.py`
(parsing free output for calls, assembling stream deltas, history and prompt rendering)."""

from __future__ import annotations

import copy
import json

import httpx
import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmserve import LLM
from lmserve.server import tools as tc
from lmserve.server.async_engine import AsyncEngine
from tests.test_server import MODEL

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "description": "City name"},
                                            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
           "required": ["city"]}
ADD = {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}, "required": ["a", "b"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Get the current weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "description": "Add two numbers", "parameters": ADD}}]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
ADD_ONE_TWO = {"type": "function", "function": {"name": "add"}}


@pytest.fixture(scope="module")
def async_engine():
    engine = AsyncEngine(LLM().engine).start()
    yield engine
    engine.shutdown()


def _check_call(name: str, arguments: str, call_id: str | None = None) -> dict:
    assert name in SCHEMAS
    args = json.loads(arguments)
    jsonschema.validate(args, SCHEMAS[name])
    if call_id is not None:
        assert call_id.startswith("call_") and len(call_id) > 10
    return args


def _accumulate(chunks) -> tuple[dict[int, dict], str | None, str]:
    """Manual accumulation of streamed deltas, as clients do it: calls by index, finish reason, content."""
    calls: dict[int, dict] = {}
    finish, content = None, ""
    for chunk in chunks:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for d in choice.delta.tool_calls or []:
                if d.index not in calls:  # the first delta of a call carries its id, type and name
                    assert d.id and d.type == "function" and d.function.name
                    calls[d.index] = {"id": d.id, "name": d.function.name, "arguments": "", "fragments": 0}
                call = calls[d.index]
                if d.function and d.function.arguments:
                    call["arguments"] += d.function.arguments
                    call["fragments"] += 1
            finish = choice.finish_reason or finish
    return calls, finish, content


# ---- end to end ---------------------------------------------------------------------------------

def test_required_returns_calls_that_validate(client):
    for seed in range(3):  # sampled at temperature 1: the constraint, not luck, makes them valid
        response = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                                  temperature=1.0, seed=seed, max_tokens=120)
        choice = response.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content is None
        assert choice.message.tool_calls
        ids = set()
        for call in choice.message.tool_calls:
            assert call.type == "function"
            _check_call(call.function.name, call.function.arguments, call.id)
            ids.add(call.id)
        assert len(ids) == len(choice.message.tool_calls)


def test_named_function_and_single_call(client):
    response = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Add 2 and 3."}],
                                              tools=TOOLS, tool_choice=ADD_ONE_TWO, temperature=0, max_tokens=60)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert [c.function.name for c in choice.message.tool_calls] == ["add"]
    args = _check_call("add", choice.message.tool_calls[0].function.arguments)
    assert set(args) == {"a", "b"}

    response = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                              parallel_tool_calls=False, temperature=0, max_tokens=60)
    assert len(response.choices[0].message.tool_calls) == 1


def test_required_streamed_through_the_stream_helper(client):
    with client.chat.completions.stream(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                        temperature=1.0, seed=5, max_tokens=120) as stream:
        fragments = sum(1 for event in stream if event.type == "tool_calls.function.arguments.delta")
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls
    for call in choice.message.tool_calls:
        _check_call(call.function.name, call.function.arguments, call.id)
    assert fragments > len(choice.message.tool_calls)  # arguments arrive progressively, not in one piece


def test_named_function_streamed_and_accumulated_by_hand(client):
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Add 40 and 2."}], tools=TOOLS, tool_choice=ADD_ONE_TWO,
        temperature=0, max_tokens=60, stream=True))
    calls, finish, content = _accumulate(chunks)
    assert finish == "tool_calls" and content == ""
    assert [c["name"] for c in calls.values()] == ["add"]
    _check_call("add", calls[0]["arguments"], calls[0]["id"])
    assert calls[0]["fragments"] > 1
    # the same request not streamed gives the same call
    response = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Add 40 and 2."}], tools=TOOLS, tool_choice=ADD_ONE_TWO,
        temperature=0, max_tokens=60)
    assert response.choices[0].message.tool_calls[0].function.arguments == calls[0]["arguments"]


def test_round_trip_call_result_answer(client):
    first = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, temperature=0, max_tokens=60)
    call = first.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments)["city"] == "Paris"
    history = ASK + [first.choices[0].message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature_c": 22,
                                                                                      "sky": "sunny"})}]
    assert history[1]["role"] == "assistant" and "content" not in history[1]  # content was null
    final = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, temperature=0, max_tokens=40)
    choice = final.choices[0]
    assert choice.finish_reason == "stop"
    assert not choice.message.tool_calls
    assert "sunny" in choice.message.content.lower()  # the result reached the prompt and the answer


def test_tool_choice_none_answers_in_text(client):
    response = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="none",
                                              temperature=0, max_tokens=8)
    choice = response.choices[0]
    assert choice.message.tool_calls is None and choice.message.content
    assert choice.finish_reason in ("stop", "length")


@pytest.mark.parametrize("tools, item, words", [
    ([TOOLS[0], {"type": "retrieval"}], 1, "type"),
    ([TOOLS[0], {"type": "function", "function": {"description": "no name"}}], 1, "name"),
    ([{"type": "function", "function": {"name": "bad name!", "parameters": WEATHER}}], 0, "name"),
    ([TOOLS[0], {"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}], 1, "object"),
    ([TOOLS[0], {"type": "function", "function": {"name": "f", "parameters": [1]}}], 1, "parameters"),
    ([TOOLS[0], TOOLS[1], TOOLS[0]], 2, "earlier tool"),
])
def test_bad_tools_are_400_naming_the_item(url, tools, item, words):
    response = httpx.post(f"{url}/v1/chat/completions", json={"messages": ASK, "tools": tools, "max_tokens": 4})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "tools"
    assert f"item {item}" in error["message"] and words in error["message"]


@pytest.mark.parametrize("body, param, words", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "'nope'"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", "sometimes"),
    ({"tool_choice": "required"}, "tool_choice", "tools"),
    ({"tools": "get_weather"}, "tools", "tools"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice",
     "response_format"),
])
def test_bad_tool_choice_is_400(url, body, param, words):
    response = httpx.post(f"{url}/v1/chat/completions", json={"messages": ASK, "max_tokens": 4, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"]


# ---- prompts and history ------------------------------------------------------------------------

def test_fallback_text_and_history_reach_a_template_without_tools(async_engine):
    tokenizer = async_engine.engine.tokenizer
    assert not tc.template_knows_tools(tokenizer.chat_template)  # SmolLM2's
    plan = tc.ToolPlan.of(TOOLS, None, None)
    history = ASK + [
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "22 C, sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": "3"}]
    messages, template_tools = tc.chat_prompt(plan, history, tokenizer.chat_template)
    assert template_tools is None
    prompt = tokenizer.apply_chat_template(messages, tools=template_tools)
    assert prompt.count("<|im_start|>system") == 1 and "You can call these functions" in prompt
    assert '"name": "get_weather"' in prompt and "Get the current weather in a city" in prompt
    assert '[{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "add", "arguments": {"a": 1, "b": 2}}]' \
        in prompt
    assert "The function get_weather returned: 22 C, sunny\nThe function add returned: 3" in prompt
    assert "<|im_start|>tool" not in prompt  # tool results become one user turn this template can read


def test_template_with_tools_receives_them(async_engine):
    tokenizer = copy.copy(async_engine.engine.tokenizer)
    tokenizer.chat_template = (
        "{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}\n{% endif %}"
        "{% for m in messages %}[{{ m.role }}]{{ m.content }}"
        "{% for c in m.tool_calls or [] %}CALL {{ c.function.name }} {{ c.function.arguments.city }}{% endfor %}"
        "{% if m.tool_call_id %}(for {{ m.tool_call_id }}){% endif %}\n{% endfor %}")
    tokenizer._compiled_template = None
    assert tc.template_knows_tools(tokenizer.chat_template)
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "rain"}]
    messages, template_tools = tc.chat_prompt(tc.ToolPlan.of(TOOLS, "auto", True), history, tokenizer.chat_template)
    prompt = tokenizer.apply_chat_template(messages, tools=template_tools)
    assert prompt.startswith("TOOLS:get_weather;add;[user]")
    assert "You can call these functions" not in prompt  # no fallback text: the template has its own
    assert "CALL get_weather Oslo" in prompt  # arguments reach the template as an object
    assert "[tool]rain(for call_1)" in prompt


# ---- parsing free output ("auto") ---------------------------------------------------------------

NAMES = {"get_weather", "add"}


@pytest.mark.parametrize("text, content, calls", [
    ('{"name": "get_weather", "arguments": {"city": "Paris"}}', None, [("get_weather", {"city": "Paris"})]),
    ('  {"name": "add", "parameters": {"a": 1, "b": 2}}\n', None, [("add", {"a": 1, "b": 2})]),
    ('{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}', None, [("add", {"a": 1, "b": 2})]),
    ('[{"name": "add", "arguments": {"a": 1, "b": 2}}, {"name": "get_weather", "arguments": {"city": "Rome"}}]',
     None, [("add", {"a": 1, "b": 2}), ("get_weather", {"city": "Rome"})]),
    ('{"name": "add", "arguments": {"a": 1, "b": 2}}\n{"name": "add", "arguments": {"a": 3, "b": 4}}',
     None, [("add", {"a": 1, "b": 2}), ("add", {"a": 3, "b": 4})]),
    ('```json\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n```', None,
     [("get_weather", {"city": "Oslo"})]),
    ('```\n[{"name": "add", "arguments": {"a": 5, "b": 6}}]\n```\nThat adds them.', "That adds them.",
     [("add", {"a": 5, "b": 6})]),
    ('I will look it up.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lima"}}\n</tool_call>',
     "I will look it up.", [("get_weather", {"city": "Lima"})]),
    (('<tool_call>{"name": "add", "arguments": {"a": 1, "b": 1}}</tool_call>\n<tool_call>\n'
      '{"name": "get_weather", "arguments": {"city": "Kyiv"}}'), None,  # the last tag left unterminated at EOS
     [("add", {"a": 1, "b": 1}), ("get_weather", {"city": "Kyiv"})]),
    ('{"type": "function", "function": {"name": "add", "arguments": {"a": 0, "b": 0}}}', None,
     [("add", {"a": 0, "b": 0})]),
    # not calls: plain text, unknown functions, JSON that is not a call, a call in the middle of prose,
    # arguments that are not an object, broken JSON
    ("The weather in Paris is sunny.", None, []),
    ('{"name": "get_time", "arguments": {}}', None, []),
    ('{"city": "Paris"}', None, []),
    ('Call it like {"name": "add", "arguments": {"a": 1, "b": 2}} maybe', None, []),
    ('{"name": "add", "arguments": [1, 2]}', None, []),
    ('{"name": "add", "arguments": {"a": 1', None, []),
    ('<tool_call>not json</tool_call>', None, []),
])
def test_parse_tool_calls(text, content, calls):
    got_content, got = tc.parse_tool_calls(text, NAMES)
    assert [(name, json.loads(args)) for name, args in got] == calls
    assert got_content == (content if calls else text)


def test_parse_without_parallel_keeps_the_first_call():
    _, calls = tc.parse_tool_calls('[{"name": "add", "arguments": {"a": 1, "b": 2}}, '
                                   '{"name": "add", "arguments": {"a": 3, "b": 4}}]', NAMES, parallel=False)
    assert [json.loads(a) for _, a in calls] == [{"a": 1, "b": 2}]


def _stream_all(plan: tc.ToolPlan, text: str, step: int, finish: str = "stop"):
    stream = plan.stream()
    deltas = []
    for i in range(0, len(text), step):
        deltas += stream.step(text[i:i + step], None)[0]
    more, reason = stream.step("", finish)
    content = "".join(d.get("content", "") for d in deltas + more)
    calls: dict[int, list] = {}
    for d in deltas + more:
        for call in d.get("tool_calls", []):
            if call["index"] not in calls:
                assert call["id"].startswith("call_") and call["type"] == "function"
                calls[call["index"]] = [call["function"]["name"], ""]
            calls[call["index"]][1] += call["function"]["arguments"]
    return content, [tuple(c) for _, c in sorted(calls.items())], reason


@pytest.mark.parametrize("step", [1, 3, 1000])
@pytest.mark.parametrize("text", [
    '{"name": "get_weather", "arguments": {"city": "Paris"}}',
    'Sure.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>',
    "Plain answer with a < sign and <tool talk> but no call.",
    '{"name": "unknown", "arguments": {}}',
    "   ",
])
def test_auto_stream_matches_whole_parse(text, step):
    plan = tc.ToolPlan.of(TOOLS, "auto", None)
    content, calls, reason = _stream_all(plan, text, step)
    whole_content, whole_calls, whole_reason = plan.parse(text, "stop")
    assert reason == whole_reason
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in whole_calls] == calls
    assert content.strip() == (whole_content or "").strip()


@pytest.mark.parametrize("step", [1, 2, 7])
def test_constrained_stream_fragments_rebuild_the_arguments(step):
    plan = tc.ToolPlan.of(TOOLS, "required", None)
    text = ('[{"name": "get_weather", "arguments": {"city": "Pa\\"ris}", "unit": "celsius"}}, '
            '{"arguments": {"a": 1.5, "b": [2, {"c": "]"}]}, "name": "add"}]')
    content, calls, reason = _stream_all(plan, text, step)
    assert reason == "tool_calls" and content == ""
    assert calls == [("get_weather", '{"city": "Pa\\"ris}", "unit": "celsius"}'),
                     ("add", '{"a": 1.5, "b": [2, {"c": "]"}]}')]
    _, whole, _ = plan.parse(text, "stop")
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in whole] == calls
    # cut short by max_tokens mid-structure: not reported as a finished call
    _, _, reason = _stream_all(plan, text[:60], step, finish="length")
    assert reason == "length"
    content, calls, reason = plan.parse(text[:60], "length")
    assert (content, calls, reason) == (text[:60], [], "length")
    content, calls, reason = plan.parse(text[:-20], "length")  # the first call is whole
    assert content is None and reason == "length"
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
        ("get_weather", '{"city": "Pa\\"ris}", "unit": "celsius"}')]


def test_constraint_schemas():
    required = tc.ToolPlan.of(TOOLS, "required", None).structured().json
    assert required["type"] == "array" and required["minItems"] == 1
    assert [s["properties"]["name"]["const"] for s in required["items"]["anyOf"]] == ["get_weather", "add"]
    single = tc.ToolPlan.of(TOOLS, "required", False).structured().json
    assert "anyOf" in single
    named = tc.ToolPlan.of(TOOLS, ADD_ONE_TWO, None).structured().json
    assert named["properties"]["name"] == {"const": "add"}
    assert named["properties"]["arguments"]["required"] == ["a", "b"]
    for choice in ("auto", "none"):
        assert tc.ToolPlan.of(TOOLS, choice, None).structured() is None
    instance = {"name": "add", "arguments": {"a": 1, "b": 2}}
    jsonschema.validate(instance, named)
    jsonschema.validate([instance], required)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "get_weather", "arguments": {"a": 1}}, named)


# ---- fuzzing: tool fields never get a server error ----------------------------------------------
# Mostly well-formed requests (so that many reach the engine: constrained by odd schemas, streamed
# or not, with tool calls in the history), with malformed values mixed in.

_scalars = st.none() | st.booleans() | st.integers(-5, 5) | st.text(max_size=6)
_json = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)
_property = st.fixed_dictionaries({}, optional={
    "type": st.sampled_from(["string", "integer", "number", "boolean", "array", "null", "nope"]),
    "enum": st.lists(_scalars, min_size=1, max_size=3), "minimum": st.integers(-3, 3) | _json,
    "maxLength": st.integers(0, 3), "pattern": st.sampled_from(["^[a-z]+$", "(", "x*"])})
_schema = st.fixed_dictionaries({"type": st.just("object")}, optional={
    "properties": st.dictionaries(st.sampled_from(["a", "b", "city"]), _property, max_size=2),
    "required": st.lists(st.sampled_from(["a", "b", "x"]), max_size=2),
    "additionalProperties": st.booleans() | _property}) | _json
_tool = st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
    {"name": st.sampled_from(["f", "g", "get_weather"])},
    optional={"description": st.text(max_size=10), "parameters": _schema})}) | _json
_call = st.fixed_dictionaries({"id": st.text(max_size=5), "type": st.just("function"), "function": st.fixed_dictionaries(
    {"name": st.sampled_from(["f", "g", "add"]), "arguments": st.sampled_from(['{"a": 1}', "{}", "[", '"x"'])})})
_turn = (st.fixed_dictionaries({"role": st.just("assistant"), "content": st.text(max_size=10) | st.none(),
                                "tool_calls": st.lists(_call, min_size=1, max_size=2)})
         | st.fixed_dictionaries({"role": st.just("tool"), "content": st.text(max_size=10)},
                                 optional={"tool_call_id": st.text(max_size=5)}))
_choice = st.sampled_from(["auto", "none", "required", ADD_ONE_TWO, {"type": "function", "function": {"name": "f"}},
                           "sometimes"]) | _json
_bodies = st.fixed_dictionaries(
    {"max_tokens": st.integers(1, 3), "stream": st.booleans(), "tool_choice": _choice,
     "messages": st.lists(_turn, max_size=3).map(lambda turns: [ASK[0], *turns]),
     "tools": st.lists(_tool, min_size=1, max_size=2) | st.just(TOOLS)},
    optional={"parallel_tool_calls": st.booleans() | st.none()})


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=_bodies)
def test_fuzzed_tool_fields_never_get_a_server_error(url, body):
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code < 500, (body, response.text)
    if response.status_code >= 400:
        assert response.json()["error"]["message"]
    elif body.get("stream"):
        assert response.text.rstrip().endswith("data: [DONE]") and '"error"' not in response.text, response.text
