"""The fused native decoder against the PyTorch module path, step kind by step kind, on a GGUF
model (default: the embedded SmolLM2 Q4_1), both engines in one process on the same weights:

- prefill: one prompt of N tokens, one step (time to the first token), for several N: where the
  native layer loop stops paying (the crossover that decides `FUSED_MAX_TOKENS` in the runner);
- decode: batch 1 and 16 sequences;
- mixed: 16 streams arriving while others decode (256-token prompts in chunks next to decode
  rows: the steps a busy server runs), output tokens/s.

    .venv/bin/python benchmarks/bench_fused_steps.py [--model X.gguf] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

from lmserve import LLM, SamplingParams
from lmserve.quant import native


def _timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure(llm: LLM, lengths: list[int], repeats: int) -> dict:
    vocab = llm.tokenizer.vocab_size
    greedy = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    results = {}
    for n in lengths:
        prompt = [(7 * i + 11) % (vocab - 100) + 50 for i in range(n)]
        results[f"prefill {n}"] = n / _timed(lambda: llm.generate([prompt], greedy, use_tqdm=False), repeats)
    for batch in (1, 16):
        prompts = [[60 + b, 61, 62, 63] for b in range(batch)]
        params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
        results[f"decode x{batch}"] = batch * 32 / _timed(lambda: llm.generate(prompts, params, use_tqdm=False),
                                                           repeats)
    prompts = [[(13 * i + s) % (vocab - 100) + 50 for i in range(256)] for s in range(16)]
    params = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    results["mixed 16x(256+64)"] = 16 * 64 / _timed(lambda: llm.generate(prompts, params, use_tqdm=False), 1)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="a GGUF file or embedded model name")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lengths", default="8,32,128,512,1024,2048")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model = args.model
    lengths = [int(x) for x in args.lengths.split(",")]
    rows = {}
    for label, eager in (("fused", False), ("modules", True)):
        llm = LLM(model, threads=args.threads, kv_cache_memory="512MiB", enforce_eager=eager,
                  max_num_batched_tokens=max(lengths), enable_prefix_caching=False)  # every repeat computes its prompt
        assert (llm.engine.runner.fused_decode is None) == eager, "the fused decoder does not run this model"
        rows[label] = measure(llm, lengths, args.repeats)
        del llm
    print(f"model: {model}\nCPU: {native.describe_cpu()}, {args.threads} threads\n")
    print(f"| tokens/s | fused | modules | fused / modules |\n| --- | ---: | ---: | ---: |")
    for key in rows["fused"]:
        f, m = rows["fused"][key], rows["modules"][key]
        print(f"| {key} | {f:.1f} | {m:.1f} | {f / m:.2f}x |")


if __name__ == "__main__":
    main()
