"""Chat templates: the model file's Jinja program that turns messages into a prompt, checked
and rendered in a sandbox.

`validate_messages` checks the messages; `compile_template` compiles a template in the sandbox
environment; `render` renders it. A template comes from the model file, so it is treated as
hostile: attribute access is restricted (jinja's immutable sandbox, refusing loudly), and a
rendering is stopped with `ChatTemplateError` when it runs past a time limit or builds strings,
lists or integers past size limits (checked before an operation allocates, where its result's
size can be estimated: `+`, `*`, `~`, `%` and `str.format` widths, padding and joining filters
and methods, `**`).
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import itertools
import json
import re
import time
import types
from collections.abc import ItemsView, KeysView, ValuesView
from datetime import datetime

from jinja2 import nodes, pass_context
from jinja2.compiler import CodeGenerator
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.filters import make_attrgetter
from jinja2.runtime import LoopContext, markup_join, str_join
from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedFormatter, safe_range
from jinja2.utils import Namespace, generate_lorem_ipsum
from markupsafe import EscapeFormatter, Markup

from lmserve.errors import InvalidParameterError, LmserveError


class ChatTemplateError(LmserveError):
    """The model has no chat template, or its template is unsafe or fails to render."""


CHAT_ROLES = frozenset({"system", "user", "assistant", "tool"})

# A chat template is a program from the model file: one that loops (nearly) forever or builds a
# huge string is stopped rather than allowed to stall or exhaust the process.
CHAT_TEMPLATE_TIME_LIMIT = 1.0  # seconds per rendering
CHAT_TEMPLATE_MAX_SIZE = 16 * 2**20  # characters of output; items of a string or list built with + or *


def validate_messages(messages) -> list[dict]:
    """Check chat messages: a non-empty list of {role, content: str} dicts. An assistant message
    may carry `tool_calls` ([{"id", "type": "function", "function": {"name", "arguments"}}]; its
    content may then be null, rendered as ""), and a tool message a `tool_call_id` string."""
    if not isinstance(messages, list) or not messages:
        raise InvalidParameterError("messages", "must be a non-empty list of {role, content} objects")
    checked = []
    for position, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidParameterError("messages", f"item {position} is not an object with role and content")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise InvalidParameterError("messages", f"item {position} has role {role!r} "
                                                    f"(allowed: {', '.join(sorted(CHAT_ROLES))})")
        message = dict(message)
        tool_calls = message.get("tool_calls")
        if tool_calls is not None:
            if role != "assistant":
                raise InvalidParameterError("messages", f"item {position}: only assistant messages have tool_calls")
            if not isinstance(tool_calls, list) or not all(
                    isinstance(c, dict) and isinstance(c.get("function"), dict)
                    and isinstance(c["function"].get("name"), str)
                    and isinstance(c["function"].get("arguments", ""), (str, dict)) for c in tool_calls):
                raise InvalidParameterError("messages", f"item {position} tool_calls must be a list of "
                                                        f"{{id, type, function: {{name, arguments}}}} objects")
            if message.get("content") is None:
                message["content"] = ""
        if not isinstance(message.get("tool_call_id") or "", str):
            raise InvalidParameterError("messages", f"item {position} tool_call_id must be a string")
        if not isinstance(message.get("content"), str):
            raise InvalidParameterError("messages", f"item {position} content must be a string")
        checked.append(message)
    return checked


_render_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("_render_deadline", default=None)


def _check_deadline() -> None:
    deadline = _render_deadline.get()
    if deadline is not None and time.monotonic() > deadline:
        raise ChatTemplateError(f"chat template ran longer than {CHAT_TEMPLATE_TIME_LIMIT:g} s and was stopped")


# What one rendering may build in all (every string or list an operation makes counts, kept or not),
# the largest integer it may compute, and what the pure-Python filters, slow per character, accept.
CHAT_TEMPLATE_MAX_BUILT = 8 * CHAT_TEMPLATE_MAX_SIZE
CHAT_TEMPLATE_MAX_INT_BITS = 2**16
CHAT_TEMPLATE_MAX_SLOW_INPUT = 2**18  # characters given to wordwrap, urlize, pprint

_render_built: contextvars.ContextVar[list | None] = contextvars.ContextVar("_render_built", default=None)


def _check_size(size: int) -> None:
    if size > CHAT_TEMPLATE_MAX_SIZE:
        raise ChatTemplateError(f"chat template builds {size:,} characters or items, over the limit of "
                                f"{CHAT_TEMPLATE_MAX_SIZE:,}")


def _charge(size: int) -> None:
    """Count what one operation of the template builds (characters or items): over the limit for
    one operation, or with what the rendering built before over the limit for a rendering, it is
    refused. A rendering is told apart by its deadline (a template rendered outside
    apply_chat_template has none: only the first limit applies)."""
    size = max(size, 0)
    _check_size(size)
    deadline = _render_deadline.get()
    if deadline is None:
        return
    built = _render_built.get()
    if built is None or built[0] != deadline:
        built = [deadline, 0]
        _render_built.set(built)
    built[1] += size
    if built[1] > CHAT_TEMPLATE_MAX_BUILT:
        raise ChatTemplateError(f"chat template builds more than {CHAT_TEMPLATE_MAX_BUILT:,} characters or items "
                                f"in all, over the limit for one rendering")


def _check_int_bits(bits: int) -> None:
    if bits > CHAT_TEMPLATE_MAX_INT_BITS:
        raise ChatTemplateError(f"chat template computes an integer of about {bits:,} bits, over the limit of "
                                f"{CHAT_TEMPLATE_MAX_INT_BITS:,} bits")


def _check_slow_input(size: int, name: str) -> None:
    if size > CHAT_TEMPLATE_MAX_SLOW_INPUT:
        raise ChatTemplateError(f"chat template gives the {name} filter {size:,} characters, over the limit of "
                                f"{CHAT_TEMPLATE_MAX_SLOW_INPUT:,}")


def _bounded_output(parts):
    size = 0
    for part in parts:
        size += len(part)
        _check_size(size)
        _check_deadline()
        yield part


_SEQUENCES = (str, bytes, list, tuple)
_SIZED = (str, bytes, list, tuple, dict, set, frozenset)


def _is_int(value) -> bool:
    return isinstance(value, int)


def _as_int(value) -> int:
    """A width or count given to a filter or method: its value when it is an integer (anything else
    the operation refuses by itself)."""
    return value if isinstance(value, int) else 0


def _parts_of(value):
    """What str(value) (or JSON) spells out, for the containers a template can make; None for
    anything else."""
    if isinstance(value, dict):
        return itertools.chain.from_iterable(value.items())
    if isinstance(value, (list, tuple, set, frozenset, KeysView, ValuesView, ItemsView)):
        return value
    if isinstance(value, Namespace):
        attrs = getattr(value, "_Namespace__attrs", None)
        return itertools.chain.from_iterable(attrs.items()) if isinstance(attrs, dict) else None
    return None


def _scalar_size(value) -> int:
    if isinstance(value, str):
        return len(value) + 2
    if isinstance(value, (bytes, bytearray)):
        return 4 * len(value) + 3
    if isinstance(value, int):
        return value.bit_length() // 3 + 2
    return 32


def _text_size(value) -> int:
    """About how many characters str(value) has, found without building it: a container counts
    what its items spell, a container met twice (`[s] * 1000`, `[l, l]`) counted each time from
    what was found the first time, so lists of lists sharing their items cannot hide an
    exponential text. Refused as soon as the estimate passes the size limit."""
    if isinstance(value, str):
        _check_size(len(value))
        return len(value)
    parts = _parts_of(value)
    if parts is None:
        return _scalar_size(value)
    sizes: dict[int, int] = {id(value): 0}  # 0 while in progress: a cycle adds nothing
    alive = [value]  # ids are only unique among live objects (dict views make fresh tuples)
    stack = [[value, iter(parts), 2]]
    visited = 0
    while True:
        frame = stack[-1]
        for item in frame[1]:
            if isinstance(item, str):
                frame[2] += len(item) + 4
            elif (known := sizes.get(id(item))) is not None:
                frame[2] += known + 2
            elif (item_parts := _parts_of(item)) is None:
                frame[2] += _scalar_size(item) + 2
            else:
                sizes[id(item)] = 0
                alive.append(item)
                stack.append([item, iter(item_parts), 2])
                break
            _check_size(frame[2])
        else:
            stack.pop()
            sizes[id(frame[0])] = frame[2]
            if not stack:
                return frame[2]
            stack[-1][2] += frame[2] + 2
            _check_size(stack[-1][2])
            visited += 1
            if visited % 4096 == 0:
                _check_deadline()


class _TimedIterable:
    """What a template's `{% for %}` loops over: iterating checks the rendering's deadline at
    each item, so nested loops over long strings or lists cannot run for hours."""

    __slots__ = ("values",)

    def __init__(self, values):
        self.values = values

    def __len__(self) -> int:
        return len(self.values)  # TypeError when unsized, as LoopContext expects

    def __iter__(self):
        for value in self.values:
            _check_deadline()
            yield value


def _timed_list(values) -> list:
    return values if isinstance(values, list) else list(_TimedIterable(values))


class _TimedRange:
    """The templates' `range`: at most MAX_RANGE items (jinja's `safe_range`), and iterating it
    checks the rendering's deadline, so nested loops cannot run for hours."""

    def __init__(self, *args):
        self.values = safe_range(*args)

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, index):
        return self.values[index]

    def __repr__(self) -> str:
        return repr(self.values)

    def __iter__(self):
        for value in self.values:
            _check_deadline()
            yield value


# ---- what an operation builds, estimated before it runs ----

# printf-style conversion: %[(key)][flags][width][.precision][length]type
_PERCENT_FIELD = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d*))?[hlL]?(.)", re.DOTALL)
_DIGITS = re.compile(r"\d+")


def _number(digits: str) -> int:
    return int(digits) if len(digits) <= 18 else 10**18


def _format_cost(fmt, args) -> int:
    """Characters `fmt % args` can build: the format, the text of every argument, and every width
    and precision (a `*` one taken from the integer arguments)."""
    if isinstance(fmt, bytes):
        fmt = fmt.decode("latin-1")
    values = list(args.values()) if isinstance(args, dict) else list(args) if isinstance(args, tuple) else [args]
    stars = sum(abs(value) for value in values if isinstance(value, int))
    size = len(fmt) + sum(_text_size(value) for value in values)
    for field in _PERCENT_FIELD.finditer(fmt):
        for number in field.group(1, 2):
            if number == "*":
                size += stars
            elif number:
                size += _number(number)
    return size


def _method_cost(obj, args: tuple, kwargs: dict):
    """(the arguments to call `obj` with, an estimate of what the call builds) for the str, bytes
    and int methods that can build far more than they are given; (args, None) for any other."""
    owner, name = getattr(obj, "__self__", None), getattr(obj, "__name__", None)
    if isinstance(owner, (str, bytes)):
        if name in ("center", "ljust", "rjust", "zfill"):
            return args, max(len(owner), _as_int(args[0] if args else kwargs.get("width")))
        if name == "expandtabs":
            tab = "\t" if isinstance(owner, str) else b"\t"
            tabsize = _as_int(args[0] if args else kwargs.get("tabsize", 8))
            return args, len(owner) + owner.count(tab) * max(tabsize, 1)
        if name == "join" and args:
            items = _timed_list(args[0])
            text = sum(len(item) for item in items if isinstance(item, (str, bytes)))
            return (items, *args[1:]), text + len(owner) * max(len(items) - 1, 0)
        if name == "replace" and len(args) >= 2:
            old, new = args[0], args[1]
            count = args[2] if len(args) > 2 else kwargs.get("count", -1)
            if not (isinstance(old, type(owner)) and isinstance(new, type(owner))):
                return args, None  # refused by the method itself
            found = owner.count(old) if old else len(owner) + 1
            if isinstance(count, int) and count >= 0:
                found = min(found, count)
            return args, len(owner) + found * max(len(new) - len(old), 0)
        if name == "translate" and args:
            table = args[0]
            values = table.values() if isinstance(table, dict) else table if isinstance(table, _SEQUENCES) else ()
            widest = max((len(value) for value in values if isinstance(value, (str, bytes))), default=1)
            return args, len(owner) * max(widest, 1)
    if isinstance(owner, int) and name == "to_bytes":
        return args, _as_int(args[0] if args else kwargs.get("length", 1))
    return args, None


class _BoundedFormatter(SandboxedFormatter):
    """str.format / format_map in a template: each field's text and width counted before it is
    formatted, against the size limit for the whole result."""

    def __init__(self, env, **kwargs):
        super().__init__(env, **kwargs)
        self.built = 0

    def convert_field(self, value, conversion):
        if conversion is not None:
            _text_size(value)  # !r / !s of a container
        return super().convert_field(value, conversion)

    def format_field(self, value, format_spec):
        self.built += _text_size(value) + sum(_number(digits) for digits in _DIGITS.findall(format_spec))
        _check_size(self.built)
        _check_deadline()
        return super().format_field(value, format_spec)


class _BoundedEscapeFormatter(_BoundedFormatter, EscapeFormatter):
    pass


def _center_cost(a):
    return max(_text_size(a["value"]), _as_int(a["width"]))


def _indent_cost(a):
    text, width = a["s"], a["width"]
    width = len(width) if isinstance(width, str) else _as_int(width)
    lines = len(text.splitlines()) + 2 if isinstance(text, str) else 2
    return _text_size(text) + lines * width


def _replace_cost(a):
    text, old, new = (value if isinstance(value, str) else str(value) for value in (a["s"], a["old"], a["new"]))
    found = text.count(old) if old else len(text) + 1
    if isinstance(a["count"], int) and a["count"] >= 0:
        found = min(found, a["count"])
    return len(text) + found * max(len(new) - len(old), 0)


def _join_cost(a):
    items = a["value"] = _timed_list(a["value"])
    separator = a["d"] if isinstance(a["d"], str) else str(a["d"])
    return sum(_text_size(item) for item in items) + len(separator) * max(len(items) - 1, 0)


def _wordwrap_cost(a):
    text = a["s"] if isinstance(a["s"], str) else str(a["s"])
    _check_slow_input(len(text), "wordwrap")
    wrap = a["wrapstring"] if a["wrapstring"] is not None else a["environment"].newline_sequence
    return len(text) + (len(text) + 1) * len(str(wrap))


def _urlize_cost(a):
    _check_slow_input(_text_size(a["value"]), "urlize")


def _pprint_cost(a):
    _check_slow_input(_text_size(a["value"]), "pprint")


def _format_filter_cost(a):
    return _format_cost(a["value"], a["kwargs"] or a["args"])


def _batch_cost(a):
    return _as_int(a["linecount"]) if a["fill_with"] is not None else None


def _slice_cost(a):
    return _as_int(a["slices"])


def _sum_cost(a):
    """sum adds its items one by one: lists or strings are copied at every step, so what is built
    is the sum of the running totals. Counted as the items arrive."""
    values, start = a["iterable"], a["start"]
    if a["attribute"] is not None:
        values = map(make_attrgetter(a["environment"], a["attribute"]), values)
        a["attribute"] = None

    def counted(values):
        built = len(start) if isinstance(start, _SIZED) else 0
        for value in _TimedIterable(values):
            if isinstance(value, _SIZED):
                built += len(value)
                _charge(built)
            yield value

    a["iterable"] = counted(values)


_FILTER_COSTS = {"center": _center_cost, "indent": _indent_cost, "replace": _replace_cost, "join": _join_cost,
                 "wordwrap": _wordwrap_cost, "urlize": _urlize_cost, "pprint": _pprint_cost,
                 "format": _format_filter_cost, "batch": _batch_cost, "slice": _slice_cost, "sum": _sum_cost}

# Filters that only pick, count or regroup items, never turning a whole container into text: their
# arguments are not measured (tojson measures its own).
_STRUCTURAL_FILTERS = frozenset({"abs", "attr", "batch", "count", "d", "default", "first", "float", "int", "items",
                                 "last", "length", "list", "map", "random", "reject", "rejectattr", "reverse",
                                 "round", "select", "selectattr", "slice", "sum", "tojson"})


def _bounded_filter(name: str, func):
    """`func` with the rendering's deadline checked, the text of its arguments measured (unless
    it is structural), what it would build estimated before it runs where that can be far more
    than it is given, and what it built counted. It takes the context, so jinja never runs it at
    compile time to fold constants (outside any rendering's limits)."""
    if getattr(func, "jinja_async_variant", False):  # the environment is not async: call the sync one
        func = inspect.unwrap(func)
    passes = getattr(getattr(func, "jinja_pass_arg", None), "name", None)
    measure = name not in _STRUCTURAL_FILTERS
    cost = _FILTER_COSTS.get(name)
    signature = inspect.signature(func) if cost is not None else None

    def bounded(context, *args, **kwargs):
        _check_deadline()
        if measure:
            for value in itertools.chain(args, kwargs.values()):
                _text_size(value)
        if passes == "context":
            args = (context, *args)
        elif passes == "eval_context":
            args = (context.eval_ctx, *args)
        elif passes == "environment":
            args = (context.environment, *args)
        if cost is not None:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            estimate = cost(bound.arguments)
            if estimate is not None:
                _charge(estimate)
                return func(*bound.args, **bound.kwargs)
            args, kwargs = bound.args, bound.kwargs
        result = func(*args, **kwargs)
        if isinstance(result, _SIZED):
            _charge(len(result))
        return result

    return pass_context(functools.wraps(func)(bounded))


class _BoundedCodeGenerator(CodeGenerator):
    """Compiles `a ~ b` to the environment's measured join, and gives every `{% for %}` a
    deadline-checked iterable: the sandbox has no hook for either."""

    def visit_Concat(self, node, frame) -> None:
        if frame.eval_ctx.volatile:
            escape = "context.eval_ctx.volatile"  # as jinja's own: markup_join when volatile
        else:
            escape = "True" if frame.eval_ctx.autoescape else "False"
        self.write(f"environment.join_parts({escape}, (")
        for argument in node.nodes:
            self.visit(argument, frame)
            self.write(", ")
        self.write("))")

    def visit_For(self, node, frame) -> None:
        wrapped = (isinstance(node.iter, nodes.Call) and isinstance(node.iter.node, nodes.EnvironmentAttribute)
                   and node.iter.node.name == "timed_iter")
        if not wrapped:
            timed = nodes.EnvironmentAttribute("timed_iter", lineno=node.lineno)
            node.iter = nodes.Call(timed, [node.iter], [], None, None, lineno=node.lineno)
            node.iter.set_environment(self.environment)
        super().visit_For(node, frame)


class _ChatSandbox(ImmutableSandboxedEnvironment):
    """The stock sandbox hands back a silent Undefined for a forbidden attribute, which prints
    as ''; refuse outright so a probing template fails loudly instead of half-rendering.

    It also bounds what a template costs. Calls, lookups, operators, filters and every loop item
    check the rendering's deadline. What an operation builds (`+`, `*`, `~`, `%`, str.format,
    the padding, joining and replacing filters and methods, blocks and macros) is estimated
    before it runs and refused over the size limit, and counted against a limit for the whole
    rendering; a container is measured before it is turned into text (`{{ [s] * 1000 }}`);
    integers from `*` and `**` are bounded. Intercepting the operators also stops jinja folding
    `'x' * 3000000000` at compile time."""

    intercepted_binops = frozenset({"+", "*", "**", "%"})
    code_generator_class = _BoundedCodeGenerator

    def unsafe_undefined(self, obj, attribute):
        raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__!r} object is unsafe")

    def call_binop(self, context, operator, left, right):
        _check_deadline()
        if operator == "+" and isinstance(left, _SEQUENCES) and isinstance(right, _SEQUENCES):
            _charge(len(left) + len(right))
        elif operator == "*":
            for sequence, count in ((left, right), (right, left)):
                if isinstance(sequence, _SEQUENCES) and _is_int(count):
                    _charge(len(sequence) * count)
            if _is_int(left) and _is_int(right):
                _check_int_bits(left.bit_length() + right.bit_length())
        elif operator == "**" and _is_int(left) and _is_int(right) and right > 1 and abs(left) > 1:
            _check_int_bits(right * abs(left).bit_length())
        elif operator == "%" and isinstance(left, (str, bytes)):
            _charge(_format_cost(left, right))
        return super().call_binop(context, operator, left, right)

    def call(self, context, obj, /, *args, **kwargs):
        _check_deadline()
        if isinstance(obj, LoopContext) and args:  # `loop(children)` in a recursive loop
            args = (_TimedIterable(args[0]), *args[1:])
        args, estimate = _method_cost(obj, args, kwargs)
        if estimate is not None:
            _charge(estimate)
        result = super().call(context, obj, *args, **kwargs)
        if estimate is None and isinstance(result, _SIZED):
            _charge(len(result))
        return result

    def getattr(self, obj, attribute):
        _check_deadline()
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        _check_deadline()
        return super().getitem(obj, argument)

    def wrap_str_format(self, value):
        # jinja's, with a formatter that measures every field
        if not isinstance(value, (types.MethodType, types.BuiltinMethodType)) or \
                value.__name__ not in ("format", "format_map") or not isinstance(value.__self__, str):
            return None
        text = value.__self__
        is_format_map = value.__name__ == "format_map"

        def wrapper(*args, **kwargs):
            if is_format_map:
                if kwargs:
                    raise TypeError("format_map() takes no keyword arguments")
                if len(args) != 1:
                    raise TypeError(f"format_map() takes exactly one argument ({len(args)} given)")
                kwargs, args = args[0], ()
            if isinstance(text, Markup):
                formatter = _BoundedEscapeFormatter(self, escape=text.escape)
            else:
                formatter = _BoundedFormatter(self)
            return type(text)(formatter.vformat(text, args, kwargs))

        return functools.update_wrapper(wrapper, value)

    def timed_iter(self, values) -> _TimedIterable:
        """The iterable of every `{% for %}` (see _BoundedCodeGenerator)."""
        return _TimedIterable(values)

    def join_parts(self, escape, parts: tuple) -> str:
        """`a ~ b ~ c`: measured, then joined as jinja does."""
        _charge(sum(len(part) if isinstance(part, str) else _text_size(part) for part in parts))
        return markup_join(parts) if escape else str_join(parts)

    def concat(self, parts) -> str:
        """Joins the output of a block, macro or `{% set %}` body (jinja's `"".join`)."""
        parts = parts if isinstance(parts, list) else list(parts)
        _charge(sum(map(len, parts)))
        return "".join(parts)


def _checked_output(value):
    """The environment's finalize, run on every `{{ ... }}`: a container is measured before it is
    turned into text."""
    if not isinstance(value, str):
        _text_size(value)
    return value


def _raise_exception(message):
    raise InvalidParameterError("messages", f"rejected by the chat template: {message}")


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def _lipsum(n=5, html=True, min=20, max=100):  # jinja's parameter names
    _charge(_as_int(n) * _as_int(max) * 16)
    return generate_lorem_ipsum(n, html, min, max)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson HTML-escapes; chat templates expect plain JSON, as transformers renders it.
    _text_size(value)
    if indent is None and separators is None:
        return json.dumps(value, ensure_ascii=ensure_ascii, sort_keys=sort_keys)
    _check_size(len(indent) if isinstance(indent, str) else _as_int(indent))
    encoder = json.JSONEncoder(ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    chunks, size = [], 0
    for chunk in encoder.iterencode(value):  # indentation grows with depth: counted as it comes
        size += len(chunk)
        _check_size(size)
        _check_deadline()
        chunks.append(chunk)
    return "".join(chunks)


def _chat_environment() -> ImmutableSandboxedEnvironment:
    env = _ChatSandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"],
                       finalize=_checked_output)
    env.filters["tojson"] = _tojson
    env.filters.update({name: _bounded_filter(name, func) for name, func in env.filters.items()})
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["range"] = _TimedRange
    env.globals["lipsum"] = _lipsum
    return env


def compile_template(source: str):
    """The template compiled in the sandbox environment (ChatTemplateError when it is invalid)."""
    try:
        return _chat_environment().from_string(source)
    except TemplateError as exc:
        raise ChatTemplateError(f"chat template is invalid: {exc}") from None


def render(template, messages: list[dict], add_generation_prompt: bool, bos_token: str, eos_token: str,
           tools: list[dict] | None = None) -> str:
    """Render checked `messages` with a compiled template, within the time and size limits."""
    messages = validate_messages(messages)
    deadline = _render_deadline.set(time.monotonic() + CHAT_TEMPLATE_TIME_LIMIT)
    try:
        # tools/documents are None, not undefined, when absent, as transformers renders them,
        # because templates test `tools is not none`.
        parts = template.generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                  bos_token=bos_token, eos_token=eos_token, tools=tools or None, documents=None)
        return "".join(_bounded_output(parts))
    except SecurityError as exc:
        raise ChatTemplateError(f"chat template is unsafe and was refused: {exc}") from None
    except LmserveError:
        raise
    except Exception as exc:  # a template can fail in any way its expressions allow
        raise ChatTemplateError(f"chat template failed to render ({type(exc).__name__}: {exc})") from None
    finally:
        _render_deadline.reset(deadline)
