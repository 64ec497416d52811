"""The `lmserve` command line on the embedded model: streamed generate, multi-turn chat."""

import io
import sys

from lmserve import LLM, SamplingParams
from lmserve.entrypoints.cli import main


def test_generate_streams_the_greedy_reply_and_reports_timing(capsys):
    assert main(["generate", "What is 2+2?", "--chat", "--max-tokens", "16"]) == 0
    captured = capsys.readouterr()
    llm = LLM()
    expected = llm.chat([{"role": "user", "content": "What is 2+2?"}],
                        SamplingParams(max_tokens=16, temperature=0), use_tqdm=False)[0].outputs[0].text
    assert captured.out == expected + "\n"
    assert "TTFT" in captured.err and "tokens/s" in captured.err


def test_chat_keeps_the_conversation(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("My name is Ada.\nWhat is my name?\n\n"))
    assert main(["chat", "--max-tokens", "24", "--system", "You are concise."]) == 0
    out = capsys.readouterr().out
    llm = LLM()
    params = SamplingParams(max_tokens=24, temperature=0)
    messages = [{"role": "system", "content": "You are concise."}, {"role": "user", "content": "My name is Ada."}]
    first = llm.chat(messages, params, use_tqdm=False)[0].outputs[0].text
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "What is my name?"}]
    second = llm.chat(messages, params, use_tqdm=False)[0].outputs[0].text
    assert out == f"{first}\n{second}\n"



def test_generate_with_a_draft_model_gives_the_plain_greedy_reply(capsys):
    """The embedded model drafting for itself (the CLI flags reach the engine; greedy output unchanged)."""
    args = ["generate", "What is 2+2?", "--chat", "--max-tokens", "16"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main(args + ["--speculative-method", "draft", "--speculative-model", "smollm2-135m",
                        "--num-speculative-tokens", "3"]) == 0
    captured = capsys.readouterr()
    assert captured.out == plain
    assert "speculation: 100% of" in captured.err  # the model drafting for itself is always right


def test_generate_constrained_by_flags(capsys, tmp_path):
    assert main(["generate", "Capital of France?", "--chat", "--choice", "Paris", "--choice", "Lyon"]) == 0
    assert capsys.readouterr().out.strip() in ("Paris", "Lyon")
    grammar = tmp_path / "yes_no.gbnf"
    grammar.write_text('root ::= ("yes" | "no") "!"')
    assert main(["generate", "Is water wet?", "--chat", "--grammar", str(grammar)]) == 0
    assert capsys.readouterr().out.strip() in ("yes!", "no!")
    assert main(["generate", "x", "--regex", "(unclosed"]) == 2
    assert "structured_outputs" in capsys.readouterr().err
