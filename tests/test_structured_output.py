"""Structured output on SmolLM2: seeded samples at temperature 1 under a JSON schema, any JSON
object, a regex, a choice list and a GBNF grammar all satisfy their constraint; unconstrained
greedy requests batched with constrained ones are unchanged; a constraint that does not compile
is refused naming the problem; max_tokens mid-structure reports "length"."""

import json
import re

import jsonschema
import pytest

from lmserve import LLM, SamplingParams
from lmserve.errors import InvalidParameterError
from lmserve.sampling_params import StructuredOutputs

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 24},
                   "age": {"type": "integer", "minimum": 0, "maximum": 120},
                   "city": {"enum": ["Paris", "Berlin", "Rome"]},
                   "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3}},
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Describe a person as JSON with name, age, city and tags."}]


@pytest.fixture(scope="module")
def llm(smollm2_path):
    return LLM(smollm2_path, max_num_seqs=32)


def _sample(llm, structured, count, max_tokens=96, messages=ASK, **params):
    outputs = llm.chat([messages] * count, [SamplingParams(temperature=1.0, seed=seed, max_tokens=max_tokens,
                                                            structured=structured, **params)
                                             for seed in range(count)], use_tqdm=False)
    return [o.outputs[0] for o in outputs]


def test_json_schema_samples_all_validate(llm):
    samples = _sample(llm, StructuredOutputs(json=PERSON), 50)
    for sample in samples:
        assert sample.finish_reason == "stop", sample.text
        jsonschema.validate(json.loads(sample.text), PERSON)
    assert len({s.text for s in samples}) > 10  # really sampled, not one forced answer
    assert llm.engine.block_manager.num_used_blocks == 0


def test_json_schema_as_text_and_any_json_object(llm):
    for sample in _sample(llm, StructuredOutputs(json=json.dumps(PERSON)), 4):
        jsonschema.validate(json.loads(sample.text), PERSON)
    for sample in _sample(llm, StructuredOutputs(json_object=True), 8, max_tokens=200):
        if sample.finish_reason == "stop":
            assert isinstance(json.loads(sample.text), dict)
        else:  # a free-form object may run on; what was produced is still its valid beginning
            assert sample.finish_reason == "length" and sample.text.startswith("{")


def test_regex_choice_and_grammar_samples_all_match(llm):
    ask = [{"role": "user", "content": "Give me a phone number."}]
    for sample in _sample(llm, StructuredOutputs(regex=r"\(\d{3}\) \d{3}-\d{4}"), 20, messages=ask):
        assert re.fullmatch(r"\(\d{3}\) \d{3}-\d{4}", sample.text) and sample.finish_reason == "stop"
    ask = [{"role": "user", "content": "Which is the capital of France?"}]
    choices = ["Paris", "Lyon", "New York City"]
    samples = _sample(llm, StructuredOutputs(choice=choices), 20, messages=ask)
    assert all(s.text in choices and s.finish_reason == "stop" for s in samples)
    assert len({s.text for s in samples}) > 1
    grammar = 'root ::= answer " because " reason\nanswer ::= "yes" | "no"\nreason ::= [a-z ]{3,20} "."'
    for sample in _sample(llm, StructuredOutputs(grammar=grammar), 10, messages=ask):
        assert re.fullmatch(r"(yes|no) because [a-z ]{3,20}\.", sample.text), sample.text
    lark = 'start: ("0" | "1")+ "!"'
    for sample in _sample(llm, StructuredOutputs(grammar=lark), 5, messages=ask, max_tokens=200):
        assert re.fullmatch(r"[01]+!", sample.text) or sample.finish_reason == "length"


def test_n_samples_each_follow_the_constraint(llm):
    output = llm.chat([ASK], SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=96,
                                            structured=StructuredOutputs(json=PERSON)), use_tqdm=False)[0]
    assert len(output.outputs) == 4
    for sample in output.outputs:
        jsonschema.validate(json.loads(sample.text), PERSON)


def test_unconstrained_greedy_outputs_unchanged_by_constrained_neighbours(llm):
    prompts = [[{"role": "user", "content": text}] for text in
               ("What is 2 + 2?", "Name a colour.", "Write a haiku about rain.")]
    greedy = SamplingParams(temperature=0, max_tokens=24)
    alone = [o.outputs[0].token_ids for o in llm.chat(prompts, greedy, use_tqdm=False)]
    constrained = SamplingParams(temperature=1.0, seed=7, max_tokens=48, structured=StructuredOutputs(json=PERSON))
    mixed = llm.chat([prompts[0], ASK, prompts[1], ASK, prompts[2]],
                     [greedy, constrained, greedy, constrained, greedy], use_tqdm=False)
    assert [mixed[i].outputs[0].token_ids for i in (0, 2, 4)] == alone


def test_max_tokens_mid_structure_reports_length(llm):
    sample = _sample(llm, StructuredOutputs(json=PERSON), 1, max_tokens=5)[0]
    assert sample.finish_reason == "length" and len(sample.token_ids) == 5
    assert sample.text.startswith('{"')


@pytest.mark.parametrize("structured, names", [
    (StructuredOutputs(regex="(unclosed"), "regex"),
    (StructuredOutputs(grammar="root ::= ("), "grammar"),
    (StructuredOutputs(grammar="start: undefined_rule"), "undefined_rule"),
    (StructuredOutputs(json='{"type": "object", "properties": '), "JSON schema"),
    (StructuredOutputs(json={"type": "objekt"}), "objekt"),
])
def test_constraint_that_does_not_compile_is_refused_naming_it(llm, structured, names):
    with pytest.raises(InvalidParameterError) as error:
        llm.generate(["hi"], SamplingParams(structured=structured), use_tqdm=False)
    assert error.value.field == "structured_outputs" and names in str(error.value)
    assert not llm.engine.has_unfinished_requests()


def test_structured_outputs_needs_exactly_one_constraint():
    with pytest.raises(InvalidParameterError, match="exactly one"):
        StructuredOutputs(regex="a", choice=["a"])
    with pytest.raises(InvalidParameterError, match="exactly one"):
        StructuredOutputs()
    with pytest.raises(InvalidParameterError, match="choice"):
        StructuredOutputs(choice=[])


def test_compiled_constraints_are_cached_by_their_text(llm):
    backend = llm.engine.structured.backend
    _sample(llm, StructuredOutputs(regex="[a-c]{2}"), 2, max_tokens=4)
    size = len(backend._cache)
    _sample(llm, StructuredOutputs(regex="[a-c]{2}"), 2, max_tokens=4)
    assert len(backend._cache) == size
    _sample(llm, StructuredOutputs(regex="[a-d]{2}"), 1, max_tokens=4)
    assert len(backend._cache) == size + 1


def test_constrained_requests_skip_speculation_and_still_validate(smollm2_path):
    llm = LLM(smollm2_path, speculative={"method": "ngram", "num_speculative_tokens": 4})
    samples = _sample(llm, StructuredOutputs(json=PERSON), 4)
    for sample in samples:
        jsonschema.validate(json.loads(sample.text), PERSON)
    assert llm.engine.stats().spec.num_proposed == 0
