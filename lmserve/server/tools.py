"""Tool (function) calling for /v1/chat/completions.

One request's tools become a `ToolPlan`: the validated functions, the `tool_choice` mode (`none`,
`auto`, `required`, or one named function) and whether parallel calls are allowed. The plan

- prepares the prompt (`prompt_messages`): a chat template that knows tools (its source mentions
  `tools`) receives them as transformers passes them (`tools=[{"type": "function", ...}]`);
  for one that does not (SmolLM2's), a system text listing the functions and asking for the JSON
  form `{"name": ..., "arguments": {...}}` is merged into the first system message;
- constrains decoding for `required` / a named function (`structured`): a JSON schema whose
  `arguments` are the function's own `parameters` schema (an array of calls when parallel calls
  are allowed with `required`);
- reads calls back out of the output: for a constrained output, with `CallScanner`, which also
  streams argument fragments as they are generated; for `auto`, with `parse_tool_calls`
  (bare JSON, a ```json fence, or Hermes / Qwen `<tool_call>` tags), the stream holding back text
  that may turn out to be a call until it is complete.

`history_messages` turns assistant `tool_calls` and `tool` results in the history into what the
template can read: as they are (arguments as objects) for a template that knows tool calls, and
as text for one that does not.
"""

from __future__ import annotations

import dataclasses
import json
import re
import uuid
from dataclasses import dataclass, field

from lmserve.errors import InvalidParameterError
from lmserve.sampling_params import SamplingParams, StructuredOutputs

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # OpenAI's rule for function names (plus '.')
TOOL_CALL_TAG, TOOL_CALL_END = "<tool_call>", "</tool_call>"
# For llguidance (other backends ignore the key): compact, readable JSON and lenient handling of
# schema keywords it does not implement, so an exotic tool schema is not refused.
_GUIDANCE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ", "lenient": True}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


# ---- what the chat handler calls ----------------------------------------------------------------

def chat_prompt(plan: ToolPlan | None, messages: list[dict],
                template: str | None) -> tuple[list[dict], list[dict] | None]:
    """The messages (history made readable, fallback tool text merged in) and the `tools`
    argument for the chat template."""
    messages = history_messages(messages, template)
    return plan.prompt_messages(messages, template) if plan is not None else (messages, None)


def constrain(plan: ToolPlan | None, params):
    """`params` with the plan's constraint (`required` / a named function), if it has one."""
    spec = plan.structured() if plan is not None else None
    if spec is None:
        return params
    if not isinstance(params, SamplingParams):
        raise InvalidParameterError("tool_choice", "a required or named tool call is not supported with "
                                                   "use_beam_search")
    if params.structured is not None:
        raise InvalidParameterError("tool_choice", "a required or named tool call cannot be combined with "
                                                   "response_format or guided_* constraints")
    return dataclasses.replace(params, structured=spec)


def parse_choice(plan: ToolPlan | None, text: str, finish_reason: str | None):
    """A whole output → (content, tool_calls or None, finish_reason)."""
    if plan is None:
        return text, None, finish_reason
    content, calls, finish_reason = plan.parse(text, finish_reason)
    return content, (calls or None), finish_reason


# ---- the request's tools ------------------------------------------------------------------------

@dataclass
class Function:
    name: str
    description: str | None
    parameters: dict
    tool: dict  # the whole {"type": "function", "function": {...}} item, as templates receive it


def validate_tools(tools) -> list[Function]:
    """The request's `tools`: a list of {"type": "function", "function": {"name", "description",
    "parameters"}}; a bad item raises InvalidParameterError("tools", "item i ...")."""
    if not isinstance(tools, list):
        raise InvalidParameterError("tools", f"must be a list of function tools, got {type(tools).__name__}")
    functions: list[Function] = []
    for i, tool in enumerate(tools):
        def bad(problem: str, i=i):
            return InvalidParameterError("tools", f"item {i}: {problem}")

        if not isinstance(tool, dict):
            raise bad("must be an object {\"type\": \"function\", \"function\": {...}}")
        if tool.get("type", "function") != "function":
            raise bad(f"type must be \"function\", got {tool.get('type')!r}")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise bad("must have a \"function\" object with its name, description and parameters")
        name = function.get("name")
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            raise bad(f"function.name must be 1-64 letters, digits, '_', '-' or '.', got {name!r}")
        if any(f.name == name for f in functions):
            raise bad(f"function name {name!r} is used by an earlier tool")
        description = function.get("description")
        if description is not None and not isinstance(description, str):
            raise bad(f"function.description must be a string, got {description!r}")
        parameters = function.get("parameters")
        if parameters is None:
            parameters = {"type": "object", "properties": {}}
        if not isinstance(parameters, dict):
            raise bad(f"function.parameters must be a JSON schema object, got {parameters!r}")
        if parameters.get("type", "object") != "object":
            raise bad(f"function.parameters must describe an object (\"type\": \"object\"), "
                      f"got type {parameters.get('type')!r}")
        properties = parameters.get("properties", {})
        if not isinstance(properties, dict) or not all(isinstance(p, dict) for p in properties.values()):
            raise bad("function.parameters.properties must map argument names to JSON schemas")
        strict = function.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise bad(f"function.strict must be true or false, got {strict!r}")
        clean = {"name": name, "parameters": parameters}
        if description is not None:
            clean = {"name": name, "description": description, "parameters": parameters}
        functions.append(Function(name, description, parameters, {"type": "function", "function": clean}))
    return functions


@dataclass
class ToolPlan:
    """What a request's `tools`, `tool_choice` and `parallel_tool_calls` ask for."""

    functions: list[Function]
    mode: str  # "none", "auto", "required" or "named"
    name: str | None = None  # the function of mode "named"
    parallel: bool = True

    @classmethod
    def of(cls, tools, tool_choice, parallel_tool_calls) -> ToolPlan | None:
        """The plan, or None when the request has no tools; InvalidParameterError for bad ones."""
        if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
            raise InvalidParameterError("parallel_tool_calls", f"must be true or false, got {parallel_tool_calls!r}")
        functions = validate_tools(tools) if tools is not None else []
        mode, name = _tool_choice(tool_choice, functions)
        if not functions:
            return None
        return cls(functions, mode, name, parallel_tool_calls is not False)

    @property
    def constrained(self) -> bool:
        return self.mode in ("required", "named")

    @property
    def names(self) -> set[str]:
        return {f.name for f in self.functions}

    # ---- the prompt ---------------------------------------------------------------------------

    def prompt_messages(self, messages: list[dict], template: str | None) -> tuple[list[dict], list[dict] | None]:
        """The messages and the `tools` argument for the chat template."""
        if self.mode == "none":
            return messages, None
        if template_knows_tools(template):
            return messages, [f.tool for f in self.functions]
        text = self.system_text()
        first = messages[0] if messages else {}
        if first.get("role") in ("system", "developer") and isinstance(first.get("content"), str):
            first = dict(first, content=f"{first['content']}\n\n{text}".lstrip())
            return [first, *messages[1:]], None
        return [{"role": "system", "content": text}, *messages], None

    def system_text(self) -> str:
        """The fallback instructions for a template without a tools section."""
        form = '{"name": <function name>, "arguments": <object of argument values>}'
        if self.mode == "named":
            ask = (f"You must call the function {self.name!r} now. Reply with only a JSON object of the form "
                   f'{{"name": "{self.name}", "arguments": <object of argument values>}} and nothing else.')
        else:
            many = (" To call several functions at once, reply with a JSON list of such objects."
                    if self.parallel else "")
            if self.mode == "required":
                ask = (f"You must call a function now. Reply with only a JSON object of the form {form} "
                       f"and nothing else.{many}")
            else:
                ask = (f"To call a function, reply with only a JSON object of the form {form} and nothing else."
                       f"{many} If no function is needed, answer the user in plain text. When a message gives "
                       f"you a function's result, use it to answer the user.")
        listing = "\n".join(json.dumps(f.tool["function"], ensure_ascii=False) for f in self.functions
                            if self.mode != "named" or f.name == self.name)
        return f"You can call these functions:\n{listing}\n\n{ask}"

    # ---- the constraint -----------------------------------------------------------------------

    def structured(self) -> StructuredOutputs | None:
        """The output constraint of `required` / a named function (None otherwise)."""
        if not self.constrained:
            return None
        calls = [_call_schema(f) for f in self.functions if self.mode != "named" or f.name == self.name]
        one = calls[0] if len(calls) == 1 else {"anyOf": calls}
        schema = {"type": "array", "items": one, "minItems": 1} if self.mode == "required" and self.parallel else one
        return StructuredOutputs(json={**schema, "x-guidance": _GUIDANCE})

    # ---- the output ---------------------------------------------------------------------------

    def parse(self, text: str, finish_reason: str | None) -> tuple[str | None, list[dict], str | None]:
        """A whole output → (content, tool_calls, finish_reason)."""
        if self.mode == "none":
            return text, [], finish_reason
        if self.constrained:
            scanner = CallScanner()
            scanner.feed(text)
            calls = scanner.complete_calls()
            if not calls:  # cut short (max_tokens) before a whole call
                return text, [], finish_reason
            # cut short after some calls: those, with the finish reason that says so
            finish_reason = _tool_finish(finish_reason) if scanner.done else finish_reason
            return None, [_call_body(new_call_id(), name, args) for name, args in calls], finish_reason
        content, calls = parse_tool_calls(text, self.names, self.parallel)
        if not calls:
            return text, [], finish_reason
        return content, [_call_body(new_call_id(), name, args) for name, args in calls], _tool_finish(finish_reason)

    def stream(self) -> ToolCallStream:
        return ToolCallStream(self)


_CHOICES = '"none", "auto", "required" or {"type": "function", "function": {"name": ...}}'


def _tool_choice(choice, functions: list[Function]) -> tuple[str, str | None]:
    if choice is None:
        return ("auto" if functions else "none"), None
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise InvalidParameterError("tool_choice", f"must be {_CHOICES}, got {choice!r}")
        if choice == "required" and not functions:
            raise InvalidParameterError("tool_choice", '"required" needs a non-empty tools list')
        return choice, None
    function = choice.get("function") if isinstance(choice, dict) else None
    if not isinstance(function, dict) or choice.get("type", "function") != "function" \
            or not isinstance(function.get("name"), str):
        raise InvalidParameterError("tool_choice", f"must be {_CHOICES}, got {choice!r}")
    name = function["name"]
    if not any(f.name == name for f in functions):
        known = ", ".join(f.name for f in functions) or "none"
        raise InvalidParameterError("tool_choice", f"function {name!r} is not among the tools (they are: {known})")
    return "named", name


def _call_schema(function: Function) -> dict:
    arguments = function.parameters
    if arguments.get("properties") and "additionalProperties" not in arguments:
        # a small model invents extra arguments freely; the output still validates against the schema
        arguments = {**arguments, "additionalProperties": False}
    if "type" not in arguments:
        arguments = {**arguments, "type": "object"}
    return {"type": "object", "properties": {"name": {"const": function.name}, "arguments": arguments},
            "required": ["name", "arguments"], "additionalProperties": False}


def _tool_finish(finish_reason: str | None) -> str | None:
    return "tool_calls" if finish_reason in ("stop", None) else finish_reason


def _call_body(call_id: str, name: str, arguments: str) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def template_knows_tools(template: str | None) -> bool:
    return template is not None and "tools" in template


def template_knows_tool_calls(template: str | None) -> bool:
    return template is not None and "tool_calls" in template


# ---- history ------------------------------------------------------------------------------------

def history_messages(messages: list[dict], template: str | None) -> list[dict]:
    """Assistant `tool_calls` and `tool` results, made readable by `template`: as transformers
    passes them (arguments as objects) when it knows tool calls, otherwise as text (the call JSON
    as the assistant's content; consecutive tool results as one user message)."""
    if not any(m.get("tool_calls") or m.get("role") == "tool" for m in messages):
        return messages
    if template_knows_tool_calls(template):
        out = []
        for m in messages:
            if m.get("tool_calls"):
                calls = [{**c, "function": {**c["function"], "arguments": _arguments_object(c["function"])}}
                         for c in m["tool_calls"]]
                m = {**m, "content": m.get("content") or "", "tool_calls": calls}
            out.append(m)
        return out
    names = {}
    out = []
    for m in messages:
        calls = m.get("tool_calls")
        if calls:
            for c in calls:
                names[c.get("id")] = c["function"]["name"]
            forms = [{"name": c["function"]["name"], "arguments": _arguments_object(c["function"])} for c in calls]
            text = json.dumps(forms[0] if len(forms) == 1 else forms, ensure_ascii=False)
            content = m.get("content") or ""
            out.append({"role": "assistant", "content": f"{content}\n{text}" if content else text})
        elif m.get("role") == "tool":
            name = names.get(m.get("tool_call_id")) or m.get("name")
            result = f"The function {name or 'call'} returned: {m.get('content') or ''}"
            if out and out[-1].get("_results"):
                out[-1] = {**out[-1], "_results": [*out[-1]["_results"], result]}
            else:
                out.append({"role": "user", "_results": [result]})
        else:
            out.append({k: v for k, v in m.items() if k not in ("tool_calls", "tool_call_id")})
    for i, m in enumerate(out):
        if "_results" in m:  # worded so that even a small model answers from the result
            these = "this result" if len(m["_results"]) == 1 else "these results"
            out[i] = {"role": "user", "content": "\n".join(m["_results"])
                      + f"\nUsing {these}, answer my question in plain text."}
    return out


def _arguments_object(function: dict):
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return arguments if arguments is not None else {}


# ---- parsing unconstrained output ("auto") ------------------------------------------------------

_DECODER = json.JSONDecoder()
_FENCE = re.compile(r"```(?:json|JSON)?[ \t]*\n?(.*?)(?:```|$)", re.DOTALL)
_TAGGED = re.compile(re.escape(TOOL_CALL_TAG) + r"(.*?)(?:" + re.escape(TOOL_CALL_END) + r"|$)", re.DOTALL)


def parse_tool_calls(text: str, names, parallel: bool = True) -> tuple[str | None, list[tuple[str, str]]]:
    """Tool calls in a model's free output → (the rest of the text or None, [(name, arguments JSON)]).

    Recognised: `<tool_call>{...}</tool_call>` blocks anywhere (Hermes / Qwen; the last one may be
    unterminated), or, at the start of the output, a JSON call `{"name": ..., "arguments": {...}}`
    (`parameters` is accepted for `arguments`), a JSON list of calls, several calls one after
    another, or any of these inside a ```json fence. A name not among `names` is not a call.
    With `parallel` False only the first call is kept."""
    calls: list[tuple[str, str]] = []
    rest = text
    if TOOL_CALL_TAG in text:
        pieces, last = [], 0
        for match in _TAGGED.finditer(text):
            found = _calls_in(match.group(1).strip(), names)
            if found is None:
                continue
            calls += found
            pieces.append(text[last:match.start()])
            last = match.end()
        rest = "".join(pieces) + text[last:]
    else:
        stripped = text.lstrip()
        fence = _FENCE.match(stripped)
        if fence:
            found = _calls_in(fence.group(1).strip(), names)
            if found is not None:
                calls, rest = found, stripped[fence.end():]
        else:
            found, end = _leading_calls(stripped, names)
            if found:
                calls, rest = found, stripped[end:]
    if not calls:
        return text, []
    rest = rest.strip()
    return (rest or None), (calls if parallel else calls[:1])


def _leading_calls(text: str, names) -> tuple[list[tuple[str, str]], int]:
    """JSON calls (objects or lists of them) one after another at the start of `text`."""
    calls, pos = [], 0
    while pos < len(text) and text[pos] in "{[":
        try:
            value, end = _DECODER.raw_decode(text, pos)
        except json.JSONDecodeError:
            break
        found = _as_calls(value, names)
        if found is None:
            break
        calls += found
        pos = end
        while pos < len(text) and text[pos] in " \t\r\n,;":
            pos += 1
    return calls, (pos if calls else 0)


def _calls_in(text: str, names) -> list[tuple[str, str]] | None:
    calls, end = _leading_calls(text, names)
    return calls if calls and not text[end:].strip() else None


def _as_calls(value, names) -> list[tuple[str, str]] | None:
    items = value if isinstance(value, list) else [value]
    if not items:
        return None
    calls = []
    for item in items:
        if isinstance(item, dict) and isinstance(item.get("function"), dict):  # OpenAI's own shape
            item = item["function"]
        if not isinstance(item, dict) or item.get("name") not in names:
            return None
        arguments = item.get("arguments", item.get("parameters", {}))
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                return None
        if not isinstance(arguments, dict):
            return None
        calls.append((item["name"], json.dumps(arguments, ensure_ascii=False)))
    return calls


# ---- scanning constrained output ----------------------------------------------------------------

class CallScanner:
    """Incremental scanner of a constrained output: one call object {"name": ..., "arguments": ...}
    or an array of them, fed text as it is generated. Each call records its name once the name's
    string is complete, and the span of its `arguments` value as it grows, so argument text can
    be streamed in fragments; the fragments joined are exactly the generated arguments JSON."""

    def __init__(self):
        self.text = ""
        self.stack: list[str] = []  # open containers
        self.call_level: int | None = None  # len(stack) inside a call object
        self.in_string = False
        self.escape = False
        self.string_start = 0
        self.expect_key = False
        self.key: str | None = None
        self.value_start: int | None = None  # a call-level value being read
        self.value_scalar = False
        self.calls: list[dict] = []  # {"name", "args_start", "args_end", "closed"}
        self.done = False  # the top-level value is complete

    def feed(self, delta: str) -> None:
        start = len(self.text)
        self.text += delta
        for i in range(start, len(self.text)):
            self._char(i, self.text[i])

    def _at_call(self) -> bool:
        return self.call_level is not None and len(self.stack) == self.call_level and bool(self.calls)

    def _char(self, i: int, c: str) -> None:
        if self.in_string:
            if self.escape:
                self.escape = False
            elif c == "\\":
                self.escape = True
            elif c == '"':
                self.in_string = False
                if self._at_call():
                    if self.expect_key:
                        self.key = _loads(self.text[self.string_start:i + 1])
                    elif self.value_start is not None and not self.value_scalar and self.text[self.value_start] == '"':
                        self._value_end(i + 1)
            return
        if c.isspace():
            return
        at_call = self._at_call()
        if at_call and not self.expect_key and self.value_start is None and c not in ",}":
            self.value_start, self.value_scalar = i, c not in '"{['
            if self.key == "arguments":
                self.calls[-1]["args_start"] = i
        if c == '"':
            self.in_string, self.string_start = True, i
        elif c in "{[":
            if self.call_level is None:
                self.call_level = 1 if c == "{" else 2
            self.stack.append(c)
            if c == "{" and len(self.stack) == self.call_level:
                self.calls.append({"closed": False})
                self.expect_key, self.key, self.value_start = True, None, None
        elif c in "}]":
            if at_call and self.value_scalar and self.value_start is not None:
                self._value_end(i)
            if self.stack:
                self.stack.pop()
            if self.call_level is not None and len(self.stack) == self.call_level and self.value_start is not None:
                self._value_end(i + 1)  # a container value of the call closed
            elif at_call and c == "}":
                self.calls[-1]["closed"] = True
            if not self.stack:
                self.done = True
        elif c == ":" and at_call:
            self.expect_key = False
        elif c == "," and at_call:
            if self.value_scalar and self.value_start is not None:
                self._value_end(i)
            self.expect_key, self.value_start = True, None

    def _value_end(self, end: int) -> None:
        start, self.value_start, self.value_scalar = self.value_start, None, False
        call = self.calls[-1]
        if self.key == "arguments":
            call["args_end"] = end
        elif self.key == "name":
            name = _loads(self.text[start:end])
            if isinstance(name, str):
                call["name"] = name

    def arguments_so_far(self, index: int) -> str:
        call = self.calls[index]
        if "args_start" not in call:
            return ""
        return self.text[call["args_start"]:call.get("args_end", len(self.text))]

    def complete_calls(self) -> list[tuple[str, str]]:
        return [(c["name"], self.text[c["args_start"]:c["args_end"]]) for c in self.calls
                if c["closed"] and "name" in c and "args_end" in c]


def _loads(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


# ---- streaming ----------------------------------------------------------------------------------

@dataclass
class _SentCall:
    id: str
    args_sent: int = 0


@dataclass
class ToolCallStream:
    """Turns one choice's text deltas into chat-delta fields: `{"content": text}` or
    `{"tool_calls": [{"index", "id", "type", "function": {"name", "arguments"}}]}` (id, type and
    name in a call's first delta, then argument fragments)."""

    plan: ToolPlan
    text: str = ""
    state: str = "undecided"  # auto: undecided → content or held; content → held at a <tool_call> tag
    emitted: int = 0  # characters of `text` sent as content (auto) / consumed (constrained)
    held_from: int = 0
    scanner: CallScanner = field(default_factory=CallScanner)
    sent: list[_SentCall] = field(default_factory=list)

    @property
    def has_calls(self) -> bool:
        return bool(self.sent)

    def feed(self, delta: str) -> list[dict]:
        if not delta:
            return []
        self.text += delta
        if self.plan.mode == "none":
            return [{"content": delta}]
        if self.plan.constrained:
            self.scanner.feed(delta)
            return self._call_deltas()
        return self._auto()

    def step(self, delta: str, finish_reason: str | None) -> tuple[list[dict], str | None]:
        """The deltas for one new piece of output and, at its end, the choice's finish reason."""
        deltas = self.feed(delta)
        if finish_reason is None:
            return deltas, None
        more, finish_reason = self.finish(finish_reason)
        return deltas + more, finish_reason

    def finish(self, finish_reason: str | None) -> tuple[list[dict], str | None]:
        """The remaining deltas at the end of the output, and the choice's finish reason."""
        if self.plan.mode == "none":
            return [], finish_reason
        if self.plan.constrained:
            deltas = self._call_deltas()
            if self.sent:
                complete = self.scanner.done and len(self.scanner.complete_calls()) == len(self.sent)
                return deltas, _tool_finish(finish_reason) if complete else finish_reason
            return ([{"content": self.text}] if self.text else []), finish_reason
        deltas = []
        if self.state in ("undecided", "content") and self.emitted < len(self.text):
            deltas.append({"content": self.text[self.emitted:]})
            self.emitted = len(self.text)
            return deltas, finish_reason
        if self.state != "held":
            return deltas, finish_reason
        held = self.text[self.held_from:]
        content, calls = parse_tool_calls(held, self.plan.names, self.plan.parallel)
        if not calls:
            return [{"content": held}], finish_reason
        if content:
            deltas.append({"content": content})
        for name, arguments in calls:
            index = len(self.sent)
            self.sent.append(_SentCall(new_call_id(), len(arguments)))
            deltas.append({"tool_calls": [{"index": index, "id": self.sent[-1].id, "type": "function",
                                           "function": {"name": name, "arguments": ""}}]})
            deltas.append({"tool_calls": [{"index": index, "function": {"arguments": arguments}}]})
        return deltas, _tool_finish(finish_reason)

    def _call_deltas(self) -> list[dict]:
        deltas = []
        for index, call in enumerate(self.scanner.calls):
            if index >= len(self.sent):
                if "name" not in call:
                    break
                self.sent.append(_SentCall(new_call_id()))
                deltas.append({"tool_calls": [{"index": index, "id": self.sent[index].id, "type": "function",
                                               "function": {"name": call["name"], "arguments": ""}}]})
            arguments = self.scanner.arguments_so_far(index)
            sent = self.sent[index]
            if len(arguments) > sent.args_sent:
                deltas.append({"tool_calls": [{"index": index,
                                               "function": {"arguments": arguments[sent.args_sent:]}}]})
                sent.args_sent = len(arguments)
        return deltas

    def _auto(self) -> list[dict]:
        if self.state == "held":
            return []
        if self.state == "undecided":
            head = self.text.lstrip()
            if not head:
                return []
            if any(head.startswith(p) or p.startswith(head) for p in ("{", "[", "```", TOOL_CALL_TAG)):
                self.state = "held"
                return []
            self.state = "content"
        # content: send text up to a <tool_call> tag (held from there on) or a possible start of one
        tag = self.text.find(TOOL_CALL_TAG, self.emitted)
        if tag >= 0:
            self.state, self.held_from = "held", tag
            end = tag
        else:
            end = len(self.text)
            for k in range(min(len(TOOL_CALL_TAG) - 1, len(self.text) - self.emitted), 0, -1):
                if TOOL_CALL_TAG.startswith(self.text[-k:]):
                    end = len(self.text) - k
                    break
        if end <= self.emitted:
            return []
        chunk, self.emitted = self.text[self.emitted:end], end
        return [{"content": chunk}]
