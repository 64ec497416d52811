"""Tensor parallelism on this CPU: greedy decode tokens/s of the embedded SmolLM2 at batch 1 and 16,
the model whole in one process with `--threads` threads against the model split over `--tp`
processes with threads / tp threads each, each through the fused native decoder and through the
PyTorch modules; and, on rank 0, the time per step spent in the collectives (all-reduces of the
row-parallel layers and the embedding, the logits' all-gather).

    .venv/bin/python benchmarks/bench_tensor_parallel.py [--threads 2] [--tp 2] [--max-tokens 48]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lmserve import LLM, SamplingParams, parallel
from lmserve.quant.native import describe_cpu

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


class CollectiveTimer:
    """Times rank 0's all-reduces and all-gathers (class-level wrappers around TPGroup's methods)."""

    def __init__(self):
        self.seconds = 0.0
        self.calls = 0
        for name in ("all_reduce", "all_gather_last"):
            original = getattr(parallel.TPGroup, name)
            setattr(parallel.TPGroup, name, self._timed(original))

    def _timed(self, original):
        def timed(group, *args):
            if group.size == 1:
                return original(group, *args)
            start = time.perf_counter()
            try:
                return original(group, *args)
            finally:
                self.seconds += time.perf_counter() - start
                self.calls += 1
        return timed


def decode_rate(llm: LLM, batch: int, max_tokens: int, repeats: int) -> tuple[float, float]:
    """(generated tokens/s, ms per step) of `batch` identical greedy requests, median of repeats."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    llm.generate([PROMPT] * batch, SamplingParams(max_tokens=2), use_tqdm=False)
    runs = []
    for _ in range(repeats):
        steps = llm.engine.num_steps
        start = time.perf_counter()
        llm.generate([PROMPT] * batch, params, use_tqdm=False)
        runs.append((time.perf_counter() - start, llm.engine.num_steps - steps))
    seconds, steps = statistics.median(r[0] for r in runs), runs[0][1]
    return batch * max_tokens / seconds, seconds / steps * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    timer = CollectiveTimer()
    rows = []
    split = {"tensor_parallel_size": args.tp}
    for label, kwargs in (("whole, fused decode", {}), ("whole, PyTorch modules", {"enforce_eager": True}),
                          (f"split over {args.tp} processes, fused decode", split),
                          (f"split over {args.tp} processes, PyTorch modules", {**split, "enforce_eager": True})):
        torch.set_num_threads(args.threads)
        llm = LLM(threads=args.threads, kv_cache_memory="256MiB", **kwargs)
        for batch in (1, 16):
            timer.seconds, timer.calls = 0.0, 0
            steps_before = llm.engine.num_steps
            rate, step_ms = decode_rate(llm, batch, args.max_tokens, args.repeats)
            steps = llm.engine.num_steps - steps_before
            collective = timer.seconds / steps * 1000 if timer.calls else None
            rows.append((label, batch, rate, step_ms, collective, timer.calls / steps if timer.calls else 0))
        llm.engine.close()
    print(f"CPU: {describe_cpu()}; {args.threads} threads in all; SmolLM2-135M-Instruct Q4_1; greedy, "
          f"{args.max_tokens} tokens per request; median of {args.repeats}")
    print("| model | batch | tokens/s | ms / step | collectives ms / step (calls) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for label, batch, rate, step_ms, collective, calls in rows:
        shown = f"{collective:.2f} ({calls:.0f})" if collective is not None else ""
        print(f"| {label} | {batch} | {rate:.1f} | {step_ms:.2f} | {shown} |")


if __name__ == "__main__":
    main()
