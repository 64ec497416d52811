"""Structured output (JSON-schema constrained decoding) against free decoding on the embedded
SmolLM2 (Q4_1, packed): the same 16 chat prompts ("describe a person / product / city as JSON")
sent together, all constrained by a JSON schema (three schemas, one per kind of subject) against
all unconstrained, greedy, same max_tokens, EOS honoured in both. A constrained output ends when
its JSON is complete, so it is often shorter and the batch thins sooner; a third variant,
unconstrained with each request's length fixed to its constrained output's (ignore_eos), has the
same batch shape step by step and isolates the per-token cost of the constraint. One engine runs
all three, alternating run by run; the median of `--repeats` runs of each is reported.

Reported: output tokens/s (tokens generated / wall time) of each and the ratios (goal >= 0.9x);
time per step, in the forward and in the sampler; the mask cost: time computing bitmasks on the
grammar worker thread per step and per sequence-step, the part the engine thread waited for (the
rest ran behind the forward), the same masks recomputed with nothing else running, and the
engine-thread costs of applying the masks in the sampler and advancing the matchers; how many
outputs parse as JSON and validate against their schema.

    .venv/bin/python benchmarks/bench_structured.py [--threads 2] [--max-tokens 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections import Counter

import torch

import lmserve.engine.sampler as sampler_module
import lmserve.engine.structured_output as structured_module
from lmserve import LLM, SamplingParams, StructuredOutputs
from lmserve.quant.native import describe_cpu

TEXT = {"type": "string", "maxLength": 40}  # bounded, as real schemas often are: a small model may loop in a string
PERSON = {"type": "object", "properties": {
    "name": TEXT, "age": {"type": "integer"}, "city": TEXT,
    "occupation": TEXT,
    "hobbies": {"type": "array", "items": TEXT, "maxItems": 4}},
    "required": ["name", "age", "city", "occupation", "hobbies"], "additionalProperties": False}
PRODUCT = {"type": "object", "properties": {
    "name": TEXT, "category": TEXT, "price": {"type": "number"},
    "in_stock": {"type": "boolean"},
    "features": {"type": "array", "items": TEXT, "maxItems": 4}},
    "required": ["name", "category", "price", "in_stock", "features"], "additionalProperties": False}
CITY = {"type": "object", "properties": {
    "name": TEXT, "country": TEXT, "population": {"type": "integer"},
    "landmarks": {"type": "array", "items": TEXT, "maxItems": 4},
    "climate": {"type": "string", "enum": ["tropical", "dry", "temperate", "continental", "polar"]}},
    "required": ["name", "country", "population", "landmarks", "climate"], "additionalProperties": False}

SUBJECTS = [  # (what to describe, schema)
    ("a fictional person who works as a nurse in Lisbon", PERSON),
    ("a wireless keyboard sold by an electronics shop", PRODUCT),
    ("the city of Kyoto", CITY),
    ("a retired teacher who loves gardening", PERSON),
    ("a stainless steel water bottle", PRODUCT),
    ("the city of Nairobi", CITY),
    ("a young software engineer living in Berlin", PERSON),
    ("a pair of trail running shoes", PRODUCT),
    ("the city of Buenos Aires", CITY),
    ("a fisherman from a small Norwegian village", PERSON),
    ("an electric kettle", PRODUCT),
    ("the city of Toronto", CITY),
    ("a pastry chef who runs a bakery in Paris", PERSON),
    ("a folding camping chair", PRODUCT),
    ("the city of Melbourne", CITY),
    ("a student pilot learning to fly", PERSON),
]


def requests(n: int) -> list[tuple[list[dict], dict]]:
    out = []
    for i in range(n):
        subject, schema = SUBJECTS[i % len(SUBJECTS)]
        fields = ", ".join(schema["properties"])
        out.append(([{"role": "user", "content": f"Describe {subject} as a JSON object with the fields {fields}. "
                                                 "Reply with the JSON only."}], schema))
    return out


class Probe:
    """Counts engine steps and times the forward, the sampler and the engine-thread work that
    constrained decoding adds (applying the bitmasks, advancing the matchers), by wrapping those
    functions in place."""

    def __init__(self, llm: LLM):
        self.steps = 0
        self.seconds = {"forward": 0.0, "sampler": 0.0, "apply": 0.0, "accept": 0.0}
        engine = llm.engine
        step = engine.step

        def counted_step():
            self.steps += 1
            return step()
        engine.step = counted_step
        engine.runner.execute = self._timed("forward", engine.runner.execute)
        engine.sampler = self._timed("sampler", engine.sampler)
        sampler_module._apply_token_masks = self._timed("apply", sampler_module._apply_token_masks)
        structured_module._LLGuidanceMatcher.accept = self._timed("accept", structured_module._LLGuidanceMatcher.accept)

    def _timed(self, name: str, fn):
        def timed(*args):
            start = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self.seconds[name] += time.perf_counter() - start
        return timed

    def snapshot(self, llm: LLM) -> dict:
        s = llm.engine.structured
        return {"steps": self.steps, **self.seconds, "mask": s.mask_seconds, "masks": s.num_masks,
                "batches": s.num_batches, "wait": s.wait_seconds}


def run(llm: LLM, probe: Probe, chats, params) -> dict:
    before = probe.snapshot(llm)
    start = time.perf_counter()
    results = llm.chat(chats, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    after = probe.snapshot(llm)
    outputs = [r.outputs[0] for r in results]
    tokens = sum(len(o.token_ids) for o in outputs)
    return {"rate": tokens / elapsed, "seconds": elapsed, "tokens": tokens, "outputs": outputs,
            **{k: after[k] - before[k] for k in after}}


def isolated_masks(llm: LLM, constrained, outputs) -> tuple[float, int, int]:
    """Replay the constrained outputs on fresh matchers with nothing else running: each step's
    bitmasks for all sequences still going, computed on this thread (no forward competing for the
    cores). (seconds in fill_masks, steps, sequence-steps)."""
    structured = llm.engine.structured
    matchers = [structured.compile(p.structured) for p in constrained]
    tokens = [list(o.token_ids) for o in outputs]
    seconds, steps, seq_steps = 0.0, 0, 0
    for position in range(max(map(len, tokens))):
        live = [i for i, t in enumerate(tokens) if position < len(t)]
        bitmask = torch.zeros(len(live), structured_module.bitmask_words(structured.vocab_size), dtype=torch.int32)
        start = time.perf_counter()
        structured.backend.fill_masks([matchers[i] for i in live], bitmask)
        seconds += time.perf_counter() - start
        steps, seq_steps = steps + 1, seq_steps + len(live)
        for i in live:
            matchers[i].accept(tokens[i][position])
    return seconds, steps, seq_steps


def json_ok(text: str, schema: dict, validator) -> tuple[bool, bool]:
    """(parses as JSON, validates against `schema`)."""
    try:
        value = json.loads(text)
    except ValueError:
        return False, False
    return True, validator is not None and not list(validator(schema).iter_errors(value))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    try:
        from jsonschema import Draft202012Validator as validator
    except ImportError:  # a test dependency; without it outputs are only parsed
        validator = None

    load = _load()
    llm = LLM(threads=args.threads)
    probe = Probe(llm)
    work = requests(args.requests)
    chats = [chat for chat, _ in work]
    free = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=False)
    constrained = [SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=False,
                                  structured=StructuredOutputs(json=schema)) for _, schema in work]

    # one-off costs, outside the timed runs: the grammar engine's start and each schema's compile
    start = time.perf_counter()
    _ = llm.engine.structured.backend
    init = time.perf_counter() - start
    compile_ms = []
    for schema in (PERSON, PRODUCT, CITY):
        start = time.perf_counter()
        llm.engine.structured.compile(StructuredOutputs(json=schema))
        compile_ms.append((time.perf_counter() - start) * 1e3)
    # warm-up at the full batch (it also puts the prompts in the prefix cache, for every variant
    # alike); the constrained one at full length gives the lengths of the matched variant (greedy,
    # so every repeat generates the same tokens)
    run(llm, probe, chats, dataclasses.replace(free, max_tokens=4))
    lengths = [len(o.token_ids) for o in run(llm, probe, chats, constrained)["outputs"]]
    matched = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in lengths]

    variants = {"free": ("unconstrained", free), "json": ("JSON schema", constrained),
                "matched": ("unconstrained, JSON run's lengths", matched)}
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for _ in range(args.repeats):  # alternate, so a slow phase of the machine hits all
        for name, (_, params) in variants.items():
            runs[name].append(run(llm, probe, chats, params))

    date = datetime.date.today().isoformat()
    command = " ".join([".venv/bin/python", "benchmarks/bench_structured.py", *sys.argv[1:]])
    print(f"Date: {date}. CPU: {_cpu_name()} ({describe_cpu()}), {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, {platform.python_implementation()} {platform.python_version()}; "
          f"load average at the start {load}.")
    print(f"Command: `{command}`")
    print(f"{args.requests} concurrent chat requests, greedy, max_tokens {args.max_tokens}; median of "
          f"{args.repeats} runs each, alternating. One-off: llguidance start {init * 1e3:.0f} ms; schema compile "
          f"{', '.join(f'{ms:.1f}' for ms in compile_ms)} ms (person, product, city; cached after).")
    print()
    print("| variant | output tok/s | vs unconstrained | tokens | wall (s) | steps | mean batch | ms / step "
          "| forward ms / step | sampler ms / step | finish | valid JSON |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |")
    rates = {name: statistics.median(r["rate"] for r in rs) for name, rs in runs.items()}
    for name, (label, _) in variants.items():
        rs = runs[name]
        mid = sorted(rs, key=lambda r: r["rate"])[len(rs) // 2]
        finish = Counter(o.finish_reason for o in mid["outputs"])
        checks = [json_ok(o.text, schema, validator) for o, (_, schema) in zip(mid["outputs"], work)]
        valid = (f"{sum(v for _, v in checks)}/{len(checks)}" if validator is not None
                 else f"{sum(p for p, _ in checks)}/{len(checks)} parse")
        ratio = "" if name == "free" else f"{rates[name] / rates['free']:.2f}x"
        per_step = {k: mid[k] / mid["steps"] * 1e3 for k in ("seconds", "forward", "sampler")}
        print(f"| {label} | {rates[name]:.1f} | {ratio} | {mid['tokens']} | {mid['seconds']:.2f} | {mid['steps']} | "
              f"{mid['tokens'] / mid['steps']:.1f} | {per_step['seconds']:.1f} | {per_step['forward']:.1f} | "
              f"{per_step['sampler']:.2f} | {', '.join(f'{k} {v}' for k, v in sorted(finish.items()))} | {valid} |")
    print(f"\nJSON schema / unconstrained at the same lengths: {rates['json'] / rates['matched']:.2f}x "
          "(the per-token cost of the constraint, batch shape equal).")
    each = "; ".join(label + " " + ", ".join(f"{r['rate']:.1f}" for r in runs[name])
                     for name, (label, _) in variants.items())
    print(f"Each run, in order (tok/s): {each}.")
    same = all(len({tuple(map(tuple, (o.token_ids for o in r["outputs"]))) for r in rs}) == 1 for rs in runs.values())
    print(f"Same tokens in every repeat of each variant: {same}.")
    print()
    rs = runs["json"]
    total = {k: sum(r[k] for r in rs) for k in ("mask", "masks", "batches", "wait", "apply", "accept", "seconds", "steps")}
    batches, masks = max(total["batches"], 1), max(total["masks"], 1)
    per_step_ms = total["mask"] / batches * 1e3
    step_ms = total["seconds"] / total["steps"] * 1e3
    alone, alone_steps, alone_seq_steps = isolated_masks(llm, constrained, rs[0]["outputs"])
    print("| mask cost (JSON-schema runs, all repeats) | value |")
    print("| --- | ---: |")
    print(f"| mask batches (steps with constrained rows) | {total['batches']} |")
    print(f"| bitmask time per step, worker thread (wall) | {per_step_ms:.3f} ms ({per_step_ms / step_ms:.1%} of a step) |")
    print(f"| bitmask time per sequence-step, worker thread (wall) | {total['mask'] / masks * 1e6:.1f} µs |")
    print(f"| engine thread waited for the masks, per step | {total['wait'] / batches * 1e3:.3f} ms |")
    print(f"| bitmask time hidden behind the forward | {1 - total['wait'] / max(total['mask'], 1e-12):.1%} |")
    print(f"| the same masks recomputed alone (nothing else running), per step | {alone / alone_steps * 1e3:.3f} ms |")
    print(f"| the same masks recomputed alone, per sequence-step | {alone / alone_seq_steps * 1e6:.1f} µs |")
    print(f"| applying the masks in the sampler (engine thread), per step | {total['apply'] / batches * 1e3:.3f} ms |")
    print(f"| advancing the matchers (engine thread), per sequence-step | {total['accept'] / masks * 1e6:.1f} µs |")


def _load() -> str:
    try:
        with open("/proc/loadavg") as f:
            return f.read().split()[0]
    except OSError:
        return "?"


def _cpu_name() -> str:
    """The model name, family and model from /proc/cpuinfo, and the cores this process may use."""
    try:
        with open("/proc/cpuinfo") as f:
            info = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in f if ":" in line)}
    except OSError:
        info = {}
    name = info.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in info:
        name += f" family {info['cpu family']} model {info.get('model', '?')}"
    return f"{name}, {len(os.sched_getaffinity(0))} cores"


if __name__ == "__main__":
    main()
