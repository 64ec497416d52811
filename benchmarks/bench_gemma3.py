"""Decode speed of the embedded Gemma 3 270M (Q4_K_M) next to the embedded SmolLM2-135M (Q4_1),
both run packed (lmserve's default for GGUF), at batch 1 and with 16 parallel sequences.

    .venv/bin/python benchmarks/bench_gemma3.py [--threads 2] [--decode-tokens 64]
"""

from __future__ import annotations

import argparse
import time

from lmserve import LLM, SamplingParams


def measure(model: str, threads: int, decode_tokens: int) -> dict:
    start = time.perf_counter()
    llm = LLM(model, threads=threads, kv_cache_memory="256MiB")
    load = time.perf_counter() - start
    tok = llm.tokenizer

    def timed(prompts, max_tokens):
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - start

    prompts = [tok.encode(f"Story {i}: once upon a time, in a small village by the sea,") for i in range(16)]
    timed(prompts[:1], 4)  # warm-up
    rates = {}
    for n in (1, 16):
        rates[n] = n * (decode_tokens - 1) / (timed(prompts[:n], decode_tokens) - timed(prompts[:n], 1))
    model_obj = llm.engine.model
    params = sum(t.numel() for t in model_obj.parameters())
    packed = sum(t.numel() * t.element_size() for t in model_obj.buffers())
    return dict(load_s=load, decode_b1=rates[1], decode_x16=rates[16], dense_params=params,
                packed_mib=packed / 2**20, layers=llm.engine.model_config.num_layers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--decode-tokens", type=int, default=64)
    args = parser.parse_args()
    rows = {name: measure(name, args.threads, args.decode_tokens) for name in ("smollm2-135m", "gemma3-270m")}
    print("| model | layers | load (s) | packed weights (MiB) | decode tok/s, batch 1 | decode tok/s, 16 sequences |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, r in rows.items():
        print(f"| {name} | {r['layers']} | {r['load_s']:.1f} | {r['packed_mib']:.0f} | {r['decode_b1']:.1f} | "
              f"{r['decode_x16']:.1f} |")


if __name__ == "__main__":
    main()
