"""What serving LoRA adapters costs: 16 concurrent greedy requests on the embedded SmolLM2, as
the base model alone and as a batch mixing 4 random rank-16 adapters (4 requests each, every
linear projection targeted), in the fused native decoder (which applies the adapters itself) and
through the PyTorch modules (`enforce_eager`), with the factors stored as bf16 (the default
on this packed base) and as fp32, one process, variants alternating, median of
`--repeats`; each ratio is the median of the per-repeat ratios.

    .venv/bin/python benchmarks/bench_lora.py [--threads 2] [--batch 16] [--max-tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lmserve import LLM, LoRARequest, SamplingParams  # noqa: E402
from lmserve.quant.native import describe_cpu  # noqa: E402
from tests.lora_adapters import write_random_adapter  # noqa: E402

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def run(llm: LLM, params, loras) -> tuple[float, int, int]:
    """(wall seconds, engine steps, generated tokens) of one generate call."""
    steps = llm.engine.num_steps
    start = time.perf_counter()
    outputs = llm.generate([PROMPT] * len(loras), params, use_tqdm=False, lora_request=loras)
    return (time.perf_counter() - start, llm.engine.num_steps - steps,
            sum(len(o.outputs[0].token_ids) for o in outputs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    llm = LLM(threads=args.threads, kv_cache_memory="256MiB", enable_lora=True)
    eager = LLM(threads=args.threads, kv_cache_memory="256MiB", enable_lora=True, enforce_eager=True)
    fp32 = LLM(threads=args.threads, kv_cache_memory="256MiB", enable_lora=True, lora_dtype="float32")
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    with tempfile.TemporaryDirectory() as root:
        adapters = [LoRARequest(f"a{i}", i + 1, write_random_adapter(Path(root) / f"a{i}", llm.engine.model_config,
                                                                     ALL_LINEAR, rank=args.rank, alpha=32, seed=i))
                    for i in range(4)]
        mixed = [adapters[i % 4] for i in range(args.batch)]
        variants = {"base model (fused native decode)": (llm, [None] * args.batch),
                    "base model through the modules (enforce_eager)": (eager, [None] * args.batch),
                    f"4 rank-{args.rank} adapters mixed (fused native decode)": (llm, mixed),
                    f"4 rank-{args.rank} adapters mixed, fp32 factors (--lora-dtype float32)": (fp32, mixed),
                    f"4 rank-{args.rank} adapters mixed through the modules": (eager, mixed)}
        for engine, loras in variants.values():  # warm-up (adapters loaded here)
            run(engine, SamplingParams(max_tokens=4), loras)
        times = {name: [] for name in variants}
        for _ in range(args.repeats):
            for name, (engine, loras) in variants.items():
                times[name].append(run(engine, params, loras))
    print(f"CPU: {describe_cpu()}; {args.threads} threads; SmolLM2-135M-Instruct Q4_1; {args.batch} concurrent greedy "
          f"requests x {args.max_tokens} tokens; adapters on all 7 projections; median of {args.repeats}")
    print("| variant | tokens/s | ms / step | vs base |")
    print("| --- | ---: | ---: | ---: |")
    base_runs = next(iter(times.values()))
    for name, runs in times.items():
        seconds = statistics.median(r[0] for r in runs)
        steps, tokens = runs[0][1], runs[0][2]
        # each repeat runs the variants back to back, so its ratio shares the machine's state of
        # the moment: the median of those ratios, not a ratio of medians taken minutes apart
        ratio = statistics.median((base[0] / base[2]) / (run[0] / run[2]) for base, run in zip(base_runs, runs))
        print(f"| {name} | {tokens / seconds:.1f} | {seconds / steps * 1000:.2f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
