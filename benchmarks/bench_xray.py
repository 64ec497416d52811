"""What the inference X-ray costs per engine step: the same batch of greedy chat requests on the
embedded SmolLM2 with `SamplingParams(xray=False)` (the default) and `xray=True`, one engine in
one process, variants alternating, median of `--repeats`; outputs are checked to be equal.

    .venv/bin/python benchmarks/bench_xray.py [--threads 2] [--batch 8] [--max-tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

from lmserve import LLM, SamplingParams
from lmserve.quant.native import describe_cpu

QUESTIONS = ["What is the capital of France?", "Write a haiku about rain.", "Explain what a CPU cache is.",
             "Name three rivers in Africa.", "How do vaccines work?", "Give me a recipe for pancakes.",
             "What is 17 times 23?", "Describe the water cycle."]


def run(llm: LLM, chats, params) -> tuple[float, int, list[list[int]]]:
    """(wall seconds, engine steps, token ids) of one generate call."""
    steps = llm.engine.num_steps
    start = time.perf_counter()
    outputs = llm.chat(chats, params, use_tqdm=False)
    return time.perf_counter() - start, llm.engine.num_steps - steps, [o.outputs[0].token_ids for o in outputs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    llm = LLM(threads=args.threads, kv_cache_memory="128MiB")
    chats = [[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}] for i in range(args.batch)]
    variants = {flag: SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True, xray=flag)
                for flag in (False, True)}
    run(llm, chats[:1], SamplingParams(max_tokens=4, temperature=0))  # warm-up
    per_step: dict[bool, list[float]] = {False: [], True: []}
    tokens: dict[bool, list[list[int]]] = {}
    for _ in range(args.repeats):
        for flag, params in variants.items():
            seconds, steps, tokens[flag] = run(llm, chats, params)
            per_step[flag].append(seconds / steps * 1e3)
    off, on = statistics.median(per_step[False]), statistics.median(per_step[True])
    print(f"CPU: {describe_cpu()}; {args.threads} threads; SmolLM2-135M-Instruct Q4_1; {args.batch} greedy chat "
          f"requests x {args.max_tokens} tokens; median of {args.repeats}")
    print("| X-ray | ms / step | added per step | same tokens |")
    print("| --- | ---: | ---: | --- |")
    print(f"| off | {off:.2f} | | |")
    print(f"| on (every request) | {on:.2f} | {on - off:+.2f} ms ({on / off - 1:+.0%}) | {tokens[True] == tokens[False]} |")


if __name__ == "__main__":
    main()
