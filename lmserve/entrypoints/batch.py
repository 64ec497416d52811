"""Offline batch jobs: `lmserve batch INPUT.jsonl OUTPUT.jsonl`.

Each input line is a JSON object with either `prompt` (text or token ids) or `messages` (a chat
conversation), any `SamplingParams` fields (`max_tokens`, `temperature`, ...) and an optional
`id`. Each output line holds the result for the input line of the same number, or an `error`.
Lines are run through the engine in chunks and written in order as each chunk completes, so an
interrupted job restarts after the last complete output line and loses nothing.
"""

from __future__ import annotations

import json
import os
from dataclasses import fields
from pathlib import Path

from tqdm import tqdm

from lmserve.errors import InvalidParameterError, LmserveError
from lmserve.sampling_params import SamplingParams

_PARAM_FIELDS = {f.name for f in fields(SamplingParams)}


def count_completed_lines(output: Path) -> int:
    """Number of complete result lines; a torn last line (the job died mid-write) is cut off."""
    if not output.exists():
        return 0
    data = output.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        with open(output, "r+b") as f:
            f.truncate(len(complete))
    return complete.count(b"\n")


def _jsonl_lines(text: str) -> list[str]:
    """Lines end at \\n only (\\r\\n is read as \\n): `str.splitlines` would also break at U+2028,
    U+0085 and other characters that JSON strings may hold raw."""
    lines = text.split("\n")
    return lines[:-1] if lines[-1] == "" else lines


def _parse_line(llm, line: str) -> tuple[str | list[int], SamplingParams]:
    try:
        item = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InvalidParameterError("line", f"not valid JSON ({exc.msg})") from None
    if not isinstance(item, dict):
        raise InvalidParameterError("line", "must be a JSON object")
    unknown = set(item) - _PARAM_FIELDS - {"prompt", "messages", "id"}
    if unknown:
        raise InvalidParameterError(sorted(unknown)[0], "unknown field")
    params = SamplingParams(**{k: v for k, v in item.items() if k in _PARAM_FIELDS})
    if ("prompt" in item) == ("messages" in item):
        raise InvalidParameterError("prompt", "give exactly one of 'prompt' or 'messages'")
    prompt = item["prompt"] if "prompt" in item else llm.apply_chat_template(item["messages"])
    return prompt, params


def _result(index: int, item_id, output) -> dict:
    completion = output.outputs[0]
    return {
        "line": index, "id": item_id,
        "outputs": [{"text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason}
                    for c in output.outputs],
        "text": completion.text, "finish_reason": completion.finish_reason,
        "usage": {"prompt_tokens": len(output.prompt_token_ids),
                  "completion_tokens": sum(len(c.token_ids) for c in output.outputs)},
    }


def _item_id(line: str):
    try:
        item = json.loads(line)
        return item.get("id") if isinstance(item, dict) else None
    except json.JSONDecodeError:
        return None


def _generate_each(llm, runnable: list) -> list:
    """[(line index, RequestOutput or the LmserveError that refused it)]: the chunk runs as one
    batch; if a request is refused (say, too long for the context) the chunk is re-run line by line."""
    if not runnable:
        return []
    try:
        outputs = llm.generate([p for _, p, _ in runnable], [s for _, _, s in runnable], use_tqdm=False)
        return [(i, out) for (i, _, _), out in zip(runnable, outputs)]
    except LmserveError:
        pass
    results = []
    for i, prompt, params in runnable:
        try:
            results.append((i, llm.generate([prompt], params, use_tqdm=False)[0]))
        except LmserveError as exc:
            results.append((i, exc))
    return results


def run_batch(llm, input_path: str | os.PathLike, output_path: str | os.PathLike, chunk_size: int = 64,
              use_tqdm: bool = True) -> int:
    """Run every input line not yet in the output; returns how many lines this call ran."""
    input_path, output_path = Path(input_path), Path(output_path)
    if not input_path.is_file():
        raise InvalidParameterError("input", f"{input_path}: no such file")
    lines = _jsonl_lines(input_path.read_text(encoding="utf-8"))
    done = count_completed_lines(output_path)
    if done > len(lines):
        raise InvalidParameterError("output", f"{output_path} has {done} lines but {input_path} only {len(lines)}")
    bar = tqdm(total=len(lines), initial=done, desc="batch", disable=not use_tqdm)
    with open(output_path, "a", encoding="utf-8") as out:
        for start in range(done, len(lines), chunk_size):
            chunk = list(range(start, min(start + chunk_size, len(lines))))
            results: dict[int, dict] = {}
            runnable = []
            for i in chunk:
                try:
                    runnable.append((i, *_parse_line(llm, lines[i])))
                except LmserveError as exc:
                    results[i] = {"line": i, "id": _item_id(lines[i]), "error": str(exc)}
            for i, output in _generate_each(llm, runnable):
                results[i] = (_result(i, _item_id(lines[i]), output) if not isinstance(output, LmserveError)
                              else {"line": i, "id": _item_id(lines[i]), "error": str(output)})
            for i in chunk:
                out.write(json.dumps(results[i], ensure_ascii=False) + "\n")
            out.flush()
            bar.update(len(chunk))
    bar.close()
    return len(lines) - done
