"""The native kernels' instruction-set variants side by side, in one process: each variant this
CPU runs (`lmserve.quant.native.isa_variants()`, switched with `using_isa`) times

- the block matmul on SmolLM2-135M's layer shapes (qkv 960x576, o 576x576, gate_up 3072x576,
  down 576x1536), 4-bit and int8, at 1, 16 and 128 activation rows (best of 7 interleaved repeats);
- end-to-end greedy decode tokens/s on the embedded SmolLM2 Q4_1 GGUF at batch 1 and 16 (the
  fused decode step), and prefill tokens/s of one 512-token prompt (many rows: dequantize + GEMM,
  where only the kernels around the GEMM change);

and prints each figure with its ratio to the AVX2 variant.

    .venv/bin/python benchmarks/bench_isa.py [--threads 2] [--decode-tokens 64]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import platform
import time
from collections.abc import Callable

import torch

from lmserve.quant import native
from lmserve.quant.packed import BlockWeight, quantize_int4, quantize_int8

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}
ROWS = (1, 16, 128)


def best_seconds(calls: dict[str, Callable[[], object]], repeats: int = 7, min_time: float = 0.03) -> dict[str, float]:
    """Seconds per call of each variant's function: the best of `repeats` loops of at least
    min_time each, the variants' loops interleaved so that a busy phase of a shared VM hits all."""
    counts = {}
    for variant, f in calls.items():
        with native.using_isa(variant):
            f()
            counts[variant], start = 1, time.perf_counter()
            while time.perf_counter() - start < min_time:
                f()
                counts[variant] += 1
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(repeats):
        for variant, f in calls.items():
            with native.using_isa(variant):
                start = time.perf_counter()
                for _ in range(counts[variant]):
                    f()
                best[variant] = min(best[variant], (time.perf_counter() - start) / counts[variant])
    return best


def bench_matmuls(variants: list[str]) -> list[tuple[str, dict[str, float]]]:
    ext = native.load()
    rows_out = []
    for form, quantize in (("4-bit", quantize_int4), ("int8", quantize_int8)):
        for name, (n, k) in SHAPES.items():
            weight = BlockWeight(quantize(torch.randn(n, k, generator=torch.Generator().manual_seed(n + k))), ext)
            for m in ROWS:
                args = (torch.randn(m, k), weight.q, weight.scale, weight.bias, weight.group, weight.bits, n)
                seconds = best_seconds(dict.fromkeys(variants, functools.partial(ext.block_matmul, *args)))
                rows_out.append((f"{form} {name} {n}x{k}, {m} rows (us)", {v: t * 1e6 for v, t in seconds.items()}))
    return rows_out


def bench_model(variants: list[str], threads: int, decode_tokens: int) -> list[tuple[str, dict[str, float]]]:
    from lmserve import LLM, SamplingParams
    from lmserve.default_model import DEFAULT_MODEL, resolve_embedded

    llm = LLM(resolve_embedded(DEFAULT_MODEL), threads=threads, kv_cache_memory="256MiB", max_num_seqs=32)
    assert llm.engine.runner.fused_decode is not None, "the fused decode step is off"
    vocab = llm.engine.model_config.vocab_size
    g = torch.Generator().manual_seed(0)

    def prompts(count: int, length: int) -> list[list[int]]:
        return torch.randint(100, vocab - 100, (count, length), generator=g).tolist()

    def generate(batch: list[list[int]], max_tokens: int):
        return llm.generate(batch, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True),
                            use_tqdm=False)

    def prefill_rate() -> float:
        start = time.perf_counter()
        generate(prompts(1, 512), 1)
        return 512 / (time.perf_counter() - start)

    def decode_rate(count: int) -> float:
        """Tokens after each sequence's first, over the time after the last first token."""
        outs = generate(prompts(count, 32), decode_tokens)
        first = max(o.metrics.first_token_time for o in outs)
        return count * (decode_tokens - 1) / (max(o.metrics.finished_time for o in outs) - first)

    generate(prompts(1, 16), 4)  # warm-up
    # Fresh prompts for every call: a prompt seen before would be served from the prefix cache.
    figures = {"prefill, 512-token prompt (tok/s)": {}, "decode, batch 1 (tok/s)": {},
               "aggregate decode, 16 sequences (tok/s)": {}}
    for _ in range(3):  # variants alternate, so a busy phase of a shared VM hits each
        for variant in variants:
            with native.using_isa(variant):
                rates = {"prefill, 512-token prompt (tok/s)": prefill_rate(), "decode, batch 1 (tok/s)": decode_rate(1),
                         "aggregate decode, 16 sequences (tok/s)": decode_rate(16)}
            for label, rate in rates.items():
                figures[label][variant] = max(rate, figures[label].get(variant, 0.0))
    return list(figures.items())


def print_table(title: str, rows: list[tuple[str, dict[str, float]]], variants: list[str], labels: dict[str, str],
                higher_is_better: bool) -> None:
    print(f"\n{title}")
    print(" | ".join(["figure", *(labels[v] for v in variants), *(f"{labels[v]} speed-up" for v in variants[1:])]))
    for label, values in rows:
        base = values["avx2"]
        ratios = [(values[v] / base if higher_is_better else base / values[v]) for v in variants if v != "avx2"]
        print(" | ".join([label, *(f"{values[v]:.1f}" for v in variants), *(f"{r:.2f}x" for r in ratios)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--decode-tokens", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if native.load() is None:
        raise SystemExit("the native kernels did not build here")
    runnable = [(name, label) for name, label, runs in native.isa_variants() if runs]
    variants = ["avx2", *(name for name, _ in runnable if name != "avx2")]
    labels = dict(runnable)
    print(f"{datetime.date.today()}, {platform.processor() or platform.machine()}, {args.threads} threads")
    print(f"CPU: {native.describe_cpu()}")
    print(f"variants run here: {', '.join(labels[v] for v in variants)}; "
          f"not here: {', '.join(label for _, label, runs in native.isa_variants() if not runs) or 'none'}")
    print_table("block matmul, best of 7 (microseconds per call; speed-up = AVX2 time / variant time)",
                bench_matmuls(variants), variants, labels, higher_is_better=False)
    print_table("SmolLM2-135M Q4_1 end to end (tokens/s, best of 3; speed-up = variant / AVX2)",
                bench_model(variants, args.threads, args.decode_tokens), variants, labels, higher_is_better=True)


if __name__ == "__main__":
    main()
