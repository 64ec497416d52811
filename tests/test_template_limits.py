"""What a chat template may cost (issue 19, case 4): every way a template can build a huge string,
list or integer — `~`, `%` widths, str.format widths, padding / joining / replacing filters and
methods, `**` and `*` on integers, containers sharing their items turned into text, blocks and
macros — is refused with a ChatTemplateError naming the limit, quickly and before the memory is
taken; templates within the limits render exactly as stock jinja renders them. A hypothesis fuzz
builds templates from the same operators."""

from __future__ import annotations

import time
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as Backend
from tokenizers import models

from lmserve import chat_template as template_module
from lmserve.errors import InvalidParameterError
from lmserve.chat_template import ChatTemplateError
from lmserve.tokenizer import Tokenizer

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
BACKEND = Backend(models.WordLevel({"a": 0}, unk_token="a"))
SIZE = "over the limit of 16,777,216"  # CHAT_TEMPLATE_MAX_SIZE
IN_ALL = "over the limit for one rendering"  # CHAT_TEMPLATE_MAX_BUILT
BITS = "over the limit of 65,536 bits"  # CHAT_TEMPLATE_MAX_INT_BITS
TIME = "longer than 1 s"  # CHAT_TEMPLATE_TIME_LIMIT


def render(template: str) -> str:
    return Tokenizer(BACKEND, chat_template=template).apply_chat_template(CHAT)


def stock_render(template: str) -> str:
    """The same template through jinja's own sandbox, with the globals our environment provides."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = template_module._tojson
    env.globals["raise_exception"] = template_module._raise_exception
    return env.from_string(template).render(messages=CHAT, add_generation_prompt=True, bos_token="", eos_token="",
                                            tools=None, documents=None)


HUGE = [
    # `~`, once and doubling in a loop; a block or macro output collected in a loop
    ("{{ ('x' * 10000000) ~ ('y' * 10000000) }}", SIZE),
    ("{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}", SIZE),
    ("{% set s %}{% for i in range(100000) %}{{ 'x' * 1000000 }}{% endfor %}{% endset %}{{ s|length }}", IN_ALL),
    (("{% macro m() %}{{ 'x' * 10000000 }}{% endmacro %}{% set ns = namespace(a=[]) %}"
     "{% for i in range(1000) %}{% set ns.a = ns.a + [m()] %}{% endfor %}"), IN_ALL),
    # printf-style widths and precisions, as an operator and as a filter
    ("{{ '%999999999s' % 'a' }}", SIZE),
    ("{{ '%*s' % (999999999, 'a') }}", SIZE),
    ("{{ '%.999999999f' % 1.5 }}", SIZE),
    ("{{ '%(a)999999999s' % {'a': 1} }}", SIZE),
    ("{{ '%999999999s'|format('a') }}", SIZE),
    # str.format widths, nested widths, fields repeated
    ("{{ '{:999999999}'.format('a') }}", SIZE),
    ("{{ '{:{}}'.format('a', 999999999) }}", SIZE),
    ("{{ '{0}{0}{0}{0}'.format('x' * 10000000) }}", SIZE),
    ("{{ '{a:>999999999}'.format_map({'a': 1}) }}", SIZE),
    # filters that pad, repeat, join or replace
    ("{{ 'a'|center(999999999) }}", SIZE),
    ("{{ 'a\nb'|indent(999999999) }}", SIZE),
    ("{{ ('a\n' * 5000000)|indent('xxxxx') }}", SIZE),
    ("{{ range(100000)|join('x' * 10000) }}", SIZE),
    ("{{ (['x' * 10000000] * 3)|join }}", SIZE),
    ("{{ ('x' * 10000000)|replace('x', 'yy') }}", SIZE),
    ("{{ ('x' * 10000000)|replace('', 'y') }}", SIZE),
    ("{{ ('a ' * 100000)|wordwrap(1, wrapstring='x' * 1000) }}", SIZE),
    ("{{ ('a ' * 1000000)|wordwrap(5) }}", "wordwrap filter"),
    ("{{ ('x' * 1000000)|urlize }}", "urlize filter"),
    ("{{ [1]|batch(999999999, 'x')|list|length }}", SIZE),
    ("{{ [1]|slice(999999999)|list|length }}", SIZE),
    ("{{ ([[1] * 1000000] * 1000)|sum(start=[])|length }}", f"(limit|{TIME})"),
    ("{{ {'a': [1]}|tojson(indent=999999999) }}", SIZE),
    ("{{ range(2000)|map('center', 100000)|join }}", IN_ALL),
    ("{{ lipsum(999999999) }}", SIZE),
    # str / bytes / int methods
    ("{{ 'a'.center(999999999) }}", SIZE),
    ("{{ 'a'.zfill(999999999) }}", SIZE),
    ("{{ '\t'.expandtabs(999999999) }}", SIZE),
    ("{{ ('x' * 10000).join(range(100000)|map('string')) }}", SIZE),
    ("{{ ('x' * 10000000).replace('x', 'yy') }}", SIZE),
    ("{{ ('ab' * 1000).translate({97: 'x' * 100000}) }}", SIZE),
    ("{{ (1).to_bytes(999999999, 'big') }}", SIZE),
    ("{{ 'x'.encode().center(999999999) }}", SIZE),
    # integers
    ("{{ 10 ** (10 ** 10) }}", BITS),
    ("{{ 7 ** 999999999 }}", BITS),
    ("{% set ns = namespace(n=3) %}{% for i in range(64) %}{% set ns.n = ns.n * ns.n %}{% endfor %}", BITS),
    # containers sharing their items, turned into text
    ("{{ ['x' * 10000000] * 1000 }}", SIZE),
    ("{{ (['x' * 10000000] * 1000)|string }}", SIZE),
    ("{{ (['x' * 10000000] * 1000)|tojson }}", SIZE),
    ("{{ 'a' ~ (['x' * 10000000] * 1000) }}", SIZE),
    ("{{ '%s' % [['x' * 10000000] * 1000] }}", SIZE),
    ("{{ '{!r}'.format(['x' * 10000000] * 1000) }}", SIZE),
    (("{% set ns = namespace(l='x' * 1000) %}{% for i in range(64) %}{% set ns.l = [ns.l, ns.l] %}{% endfor %}"
     "{{ ns.l }}"), SIZE),
    (("{% set ns = namespace(l='x' * 1000) %}{% for i in range(64) %}{% set ns.l = [ns.l, ns.l] %}{% endfor %}"
     "{{ ns.l|pprint }}"), "limit"),
    ("{{ (['x' * 10000000] * 1000)|sort|first|length }}", SIZE),
    # loops over long strings and lists (not only range) end at the deadline
    ("{% set s = 'x' * 100000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}", TIME),
    ("{% set l = [1] * 100000 %}{% for a in l %}{% for b in l if b %}{% endfor %}{% endfor %}", TIME),
    ("{% set l = [1] * 100000 %}{% for a in l recursive %}{% for b in l %}{% endfor %}{% endfor %}", TIME),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", TIME),
]


@pytest.mark.parametrize("template, limit", HUGE)
def test_a_costly_template_is_refused_quickly_naming_the_limit(template, limit):
    start = time.perf_counter()
    with pytest.raises(ChatTemplateError, match=f"chat template .*{limit}"):
        render(template)
    assert time.perf_counter() - start < 5


# Each operator within the limits: the same output as stock jinja.
FINE = [
    "{{ 'x' ~ 1 ~ [1, 'a'] ~ none }}{% for m in messages %}{{ m.role ~ ': ' ~ m.content ~ '\n' }}{% endfor %}",
    "{{ '%5s|%-4d|%.2f|%x' % ('a', 7, 3.14159, 255) }}",
    "{{ '%(a)3s' % {'a': 'b'} }}{{ '%s' % [1, 2] }}{{ '%d%%' % 5 }}",
    "{{ '{0:>8}|{1:.3f}|{a!r}|{0[1]}'.format('ab', 3.14159, a='q') }}{{ '{x}'.format_map({'x': 1}) }}",
    "{{ 'a'|center(9) }}|{{ 'a\nb\n\nc'|indent(2, true) }}|{{ 'a\nb'|indent('> ', blank=true) }}",
    "{{ range(5)|join(', ') }}|{{ messages|join('/', attribute='role') }}|{{ 'abc'|join('-') }}",
    "{{ 'a-b-c'|replace('-', '+') }}|{{ 'aaa'|replace('a', 'bb', 2) }}|{{ 'ab'|replace('', '.') }}",
    "{{ 'one two three four'|wordwrap(7) }}|{{ 'x y'|wordwrap(1, wrapstring='/') }}",
    "{{ '%s-%s'|format(1, 2) }}|{{ '%(a)s'|format(a=3) }}|{{ [1, 2, 3]|batch(2, 0)|list }}|{{ range(5)|slice(2)|list }}",
    "{{ [[1], [2]]|sum(start=[]) }}|{{ range(10)|sum }}|{{ messages|map(attribute='content')|map('length')|sum }}",
    "{{ messages|tojson }}|{{ messages|tojson(indent=2) }}|{{ {'b': 1, 'a': [1]}|tojson(separators=(',', ':')) }}",
    "{{ 'a'.center(5) }}|{{ 'a'.ljust(3) }}|{{ '7'.zfill(3) }}|{{ 'a\tb'.expandtabs(4) }}|{{ ','.join(['a', 'b']) }}",
    "{{ 'aXa'.replace('a', 'bb') }}|{{ 'abc'.translate({97: 'zz'}) }}|{{ (258).to_bytes(2, 'big')|list }}",
    "{{ 2 ** 100 }}|{{ 10 ** 10 ** 10 }}|{{ 2 ** -2 }}|{{ 2.5 ** 3 }}|{{ 3 * 4 }}|{{ (10 ** 50) * (10 ** 50) }}",
    "{{ [1, 'a', {'b': none}] }}|{{ [[1, 2]] * 3 }}|{{ (['ab'] * 3)|string }}|{{ ['b', 'a']|sort }}",
    "{% for x in [[1, [2]], [3]] recursive %}{{ x if x is number else loop(x) }}{{ loop.length }}{% endfor %}",
    ("{% for m in messages %}{{ loop.index }}/{{ loop.length }}{{ loop.last }}{% else %}none{% endfor %}"
    "{% for c in 'abc' if c != 'b' %}{{ c }}{% endfor %}{% for k, v in {'a': 1}.items() %}{{ k }}{{ v }}{% endfor %}"),
    ("{% set s %}{% for m in messages %}<{{ m.role }}>{% endfor %}{% endset %}{{ s }}"
    "{% macro m(x) %}[{{ x }}]{% endmacro %}{{ m(1) }}{% filter upper %}abc{% endfilter %}"),
    ("{% set ns = namespace(n=0, s='') %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
    "{% set ns.s = ns.s ~ m.content %}{% endfor %}{{ ns.n }} {{ ns.s }} {{ ns }}"),
]


@pytest.mark.parametrize("template", FINE)
def test_a_template_within_the_limits_renders_as_stock_jinja_does(template):
    assert render(template) == stock_render(template)


def test_real_chat_template_with_a_long_conversation_is_quick():
    template = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM<|im_end|>\n' }}{% endif %}"
                "{{'<|im_start|>' + message['role'] + '\n' + message['content'] | trim + '<|im_end|>' + '\n'}}"
                "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    messages = [{"role": "user" if i % 2 else "assistant", "content": "word " * 200} for i in range(2000)]
    tokenizer = Tokenizer(BACKEND, chat_template=template)
    start = time.perf_counter()
    assert tokenizer.apply_chat_template(messages).count("<|im_start|>") == 2002
    assert time.perf_counter() - start < 0.5


# ---- fuzz ---------------------------------------------------------------------------------------

_NUMBERS = st.sampled_from(["0", "1", "2", "3", "10", "99", "4096", "1000000", "999999999", "2 ** 40", "-5", "1.5"])
_STRINGS = st.sampled_from(["'x'", "''", "'ab\\n cd'", "'%999999999s'", "'%*s'", "'%s%s'", "'{:999999999}'",
                            "'{0}{0}{0}'", "'\\t'", "'a b c d'", "'x' * 1000000", "messages[0]['content']"])
_OTHERS = st.sampled_from(["messages", "range(1000)", "range(100000)", "[1, 2]", "ns.v", "[ns.v, ns.v]",
                           "{'a': ns.v}", "(ns.v, 'x')", "loop_value"])
_OPERATORS = st.sampled_from(["~", "*", "**", "%", "+"])
_FILTERS = st.sampled_from(["center({n})", "indent({n})", "indent({e})", "format({e})", "format({e}, {e})", "join",
                            "join({e})", "replace('x', {e})", "replace('', {e})", "wordwrap({n})", "batch({n}, 'x')",
                            "slice({n})", "sum(start=[])", "list", "tojson", "tojson(indent={n})", "string", "upper",
                            "sort", "unique", "trim", "truncate({n})", "length", "map('center', {n})", "pprint",
                            "first", "reverse", "urlize", "title"])
_METHODS = st.sampled_from(["center({n})", "ljust({n})", "zfill({n})", "expandtabs({n})", "join({e})",
                            "replace('x', {e})", "format({e})", "format({e}, {e})", "split()", "translate({120: {e}})",
                            "encode()"])


def _apply(template: str, number: str, first: str, second: str) -> str:
    return template.replace("{n}", number).replace("{e}", first, 1).replace("{e}", second, 1)


def _expressions(children):

    binary = st.tuples(children, _OPERATORS, children).map(lambda t: f"({t[0]} {t[1]} {t[2]})")
    filtered = st.tuples(children, _FILTERS, _NUMBERS, children, children).map(
        lambda t: f"({t[0]}|{_apply(*t[1:])})")
    called = st.tuples(children, _METHODS, _NUMBERS, children, children).map(
        lambda t: f"({t[0]}).{_apply(*t[1:])}")
    return binary | filtered | called


_EXPRESSIONS = st.recursive(_NUMBERS | _STRINGS | _OTHERS, _expressions, max_leaves=6)


def _statements(children):
    loop = st.tuples(_EXPRESSIONS, st.lists(children, min_size=1, max_size=2)).map(
        lambda t: "{% for loop_value in " + t[0] + " %}" + "".join(t[1]) + "{% endfor %}")
    block = st.lists(children, min_size=1, max_size=2).map(lambda b: "{% set ns.v %}" + "".join(b) + "{% endset %}")
    return loop | block


_STATEMENTS = st.recursive(
    _EXPRESSIONS.map(lambda e: "{{ " + e + " }}") | _EXPRESSIONS.map(lambda e: "{% set ns.v = " + e + " %}"),
    _statements, max_leaves=4)
_TEMPLATES = st.lists(_STATEMENTS, min_size=1, max_size=3).map(
    lambda body: "{% set ns = namespace(v='x') %}{% set loop_value = 1 %}" + "".join(body))

FUZZ_TIME_LIMIT = 0.25  # the rendering deadline during the fuzz, to keep it short
FUZZ_MEMORY = 1 << 30  # peak Python memory of one rendering: what the size limits allow, with room


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(template=_TEMPLATES)
def test_fuzz_template_operators(template):
    """Whatever the template, rendering ends within the deadline (and the time one bounded
    operation takes), fails only with the clean error types, stays under the memory bound, and
    when it succeeds gives stock jinja's output."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(template_module, "CHAT_TEMPLATE_TIME_LIMIT", FUZZ_TIME_LIMIT)
            rendered = render(template)
    except (ChatTemplateError, InvalidParameterError) as exc:
        rendered = None
        assert "MemoryError" not in str(exc), template
    finally:
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert elapsed < FUZZ_TIME_LIMIT + 2, (elapsed, template)
    assert peak < FUZZ_MEMORY, (peak, template)
    if rendered is not None:
        assert rendered == stock_render(template), template

