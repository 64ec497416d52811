"""`lmserve batch`: one result line per input line, errors per line, and resume after interruption."""

import json

import pytest

from lmserve import LLM, SamplingParams
from lmserve.entrypoints.batch import run_batch


@pytest.fixture(scope="module")
def llm(smollm2_path):
    return LLM(str(smollm2_path), deterministic=True)


def _write_input(path):
    items = [
        {"id": "a", "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0},
        {"id": "b", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8, "temperature": 0},
        {"id": "c", "prompt": "1, 2, 3,", "max_tokens": 6, "temperature": 0, "stop": [","]},
        {"id": "bad", "prompt": "x", "temperature": -3},
        {"id": "d", "prompt": [504, 3458, 282], "max_tokens": 5, "temperature": 0},
        {"id": "long", "prompt": "hi", "max_tokens": 100000},
    ]
    lines = [json.dumps(i) for i in items] + ["{not json"]
    path.write_text("\n".join(lines) + "\n")
    return items


def test_batch_results_errors_and_resume(llm, tmp_path):
    source = tmp_path / "in.jsonl"
    items = _write_input(source)
    full = tmp_path / "full.jsonl"
    assert run_batch(llm, source, full, chunk_size=2, use_tqdm=False) == 7
    rows = [json.loads(line) for line in full.read_text().splitlines()]
    assert [r["line"] for r in rows] == list(range(7))
    assert [r["id"] for r in rows] == ["a", "b", "c", "bad", "d", "long", None]
    expected = llm.generate(items[0]["prompt"], SamplingParams(max_tokens=8, temperature=0), use_tqdm=False)[0]
    assert rows[0]["text"] == expected.outputs[0].text
    assert rows[2]["finish_reason"] in ("stop", "length") and "," not in rows[2]["text"]
    assert rows[3]["error"].startswith("temperature") and "JSON" in rows[6]["error"]
    assert "context limit" in rows[5]["error"] and rows[4]["usage"]["prompt_tokens"] == 3

    # An interrupted job: two complete lines and a torn third one.
    resumed = tmp_path / "resumed.jsonl"
    complete = full.read_text().splitlines(keepends=True)
    resumed.write_text("".join(complete[:2]) + complete[2][:15])
    assert run_batch(llm, source, resumed, chunk_size=2, use_tqdm=False) == 5
    assert resumed.read_text() == full.read_text()
    assert run_batch(llm, source, resumed, use_tqdm=False) == 0


def test_line_separators_inside_json_strings_do_not_split_lines(llm, tmp_path):
    """U+2028, U+2029 and U+0085 may stand raw inside a JSON string: lines end at LF (or CRLF) only."""
    items = [{"id": "a", "prompt": "one\u2028two\u0085three\u2029four", "max_tokens": 2, "temperature": 0},
             {"id": "b", "prompt": "five", "max_tokens": 2, "temperature": 0}]
    source, results = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_bytes("".join(json.dumps(i, ensure_ascii=False) + "\r\n" for i in items).encode())
    assert run_batch(llm, source, results, use_tqdm=False) == 2
    rows = [json.loads(line) for line in results.read_text(encoding="utf-8").split("\n")[:-1]]
    assert [(r["id"], "error" in r) for r in rows] == [("a", False), ("b", False)]
