"""KV-cache management on the embedded SmolLM2-135M-Instruct, each feature on vs off in one run:

1. TTFT of a request sharing a ~1,000-token system prompt with an earlier one, prefix cache on vs off;
2. p99 inter-token latency of 8 decoding streams while a ~4,000-token prompt arrives, chunked
   prefill (max_num_batched_tokens 512) vs one-shot prefill (budget larger than the prompt);
3. throughput and completed requests when the KV cache holds a quarter of the working set,
   recompute vs swap preemption;
4. tokens that fit in the same KV memory with an int8 cache vs the model dtype.

Small counts so it runs in a few minutes on 2 cores:
    .venv/bin/python benchmarks/kv_management.py [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from lmserve import LLM, SamplingParams
from lmserve.config import EngineConfig
from lmserve.engine.model_builder import num_kv_blocks_for
from lmserve.loader import open_checkpoint

GREEDY = dict(temperature=0, ignore_eos=True)
KV_MEMORY = "256MiB"


def prefix_ttft(threads: int, caching: bool) -> float:
    llm = LLM(threads=threads, enable_prefix_caching=caching, kv_cache_memory=KV_MEMORY)
    system = "You are a meticulous assistant. Answer with care, cite facts and keep a friendly tone. " * 60
    system_ids = llm.tokenizer.encode(system)[:1000]
    first, second = system_ids + llm.tokenizer.encode(" Q: Where is Peru?"), \
        system_ids + llm.tokenizer.encode(" Q: Where is Chad?")
    llm.generate([first], SamplingParams(max_tokens=1, **GREEDY), use_tqdm=False)
    out = llm.generate([second], SamplingParams(max_tokens=1, **GREEDY), use_tqdm=False)[0]
    return out.metrics.time_to_first_token


def p99_itl_with_long_prompt(threads: int, budget: int) -> float:
    llm = LLM(threads=threads, max_num_batched_tokens=budget, enable_prefix_caching=False, kv_cache_memory=KV_MEMORY)
    engine = llm.engine
    streams = [engine.add_request(f"Story {i}: once upon a time", SamplingParams(max_tokens=12, **GREEDY))
               for i in range(8)]
    last_token_time: dict[str, float] = {}
    gaps: list[float] = []
    long_prompt = (llm.tokenizer.encode("The history of the river valley is long and varied. " * 400))[:4000]
    step = 0
    while engine.has_unfinished_requests():
        if step == 3:  # the streams are decoding: the long prompt arrives
            engine.add_request(long_prompt, SamplingParams(max_tokens=1, **GREEDY))
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            if out.request_id in streams and out.outputs[0].delta_token_ids:
                if out.request_id in last_token_time:
                    gaps.append(now - last_token_time[out.request_id])
                last_token_time[out.request_id] = now
        step += 1
    return float(np.percentile(gaps, 99))


def constrained_throughput(threads: int, mode: str) -> tuple[float, int]:
    prompts = [f"Request {i}: list facts about the number {i} and its properties." for i in range(8)]
    output_len, block_size = 24, 16
    tokenizer = open_checkpoint(None).tokenizer
    working_set = sum(len(tokenizer.encode(p)) + output_len for p in prompts)
    blocks = max(-(-working_set // (4 * block_size)), -(-(working_set // len(prompts)) // block_size) + 1)
    llm = LLM(threads=threads, num_kv_blocks=blocks, block_size=block_size, preemption_mode=mode)
    start = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(max_tokens=output_len, **GREEDY), use_tqdm=False)
    elapsed = time.perf_counter() - start
    done = sum(o.finished for o in outs)
    return sum(len(o.outputs[0].token_ids) for o in outs) / elapsed, done


def kv_capacity(kv_cache_dtype: str) -> int:
    config = EngineConfig(kv_cache_dtype=kv_cache_dtype, kv_cache_memory=KV_MEMORY)
    return num_kv_blocks_for(open_checkpoint(None).config, config) * config.block_size


def _report(name: str, a_name: str, a: float, b_name: str, b: float) -> None:
    print(f"{name:62} {a_name:>16} {a:10.3f} {b_name:>14} {b:10.3f} {a / b:7.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    print(f"{'measure':62} {'A':>16} {'value':>10} {'B':>14} {'value':>10} {'A/B':>7}")
    _report(f"tokens in {KV_MEMORY} of KV cache", "int8", kv_capacity("int8"), "model dtype", kv_capacity("auto"))
    _report("TTFT, request sharing a 1,000-token prefix (s)", "prefix cache on", prefix_ttft(args.threads, True),
            "off", prefix_ttft(args.threads, False))
    (rec_tps, rec_done), (swap_tps, swap_done) = (constrained_throughput(args.threads, m)
                                                  for m in ("recompute", "swap"))
    _report("output tok/s, KV = 1/4 of the working set", "swap", swap_tps, "recompute", rec_tps)
    _report("completed requests (of 8), same", "swap", swap_done, "recompute", rec_done)
    _report("p99 inter-token latency, 8 streams + 4,000-token prompt (s)", "chunked 512",
            p99_itl_with_long_prompt(args.threads, 512), "unchunked", p99_itl_with_long_prompt(args.threads, 4096))


if __name__ == "__main__":
    main()
