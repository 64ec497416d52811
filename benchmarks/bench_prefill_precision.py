"""Prefill with fp32 or bf16 GEMMs on packed weights (`prefill_precision`): prefill tokens/s of a
512-token prompt on the embedded SmolLM2, the two engines alternating in one process (median of
`--repeats`), and the bf16 path's quality against the exact fp32 path over 512-token windows of
this repository's documentation (mean KL, top-1 agreement, perplexity).

    .venv/bin/python benchmarks/bench_prefill_precision.py [--threads 2] [--repeats 5] [--windows 8]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from lmserve import LLM
from lmserve.quality import quality_report, text_windows
from lmserve.quant.native import describe_cpu

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--windows", type=int, default=8)
    args = parser.parse_args()
    text = "\n\n".join(p.read_text() for p in (REPO / "README.md", REPO / "docs" / "architecture.md"))
    engines = {precision: LLM(threads=args.threads, kv_cache_memory="256MiB", prefill_precision=precision).engine
               for precision in ("fp32", "bf16")}
    prompt = engines["fp32"].tokenizer.encode(text)[:512]
    times = {precision: [] for precision in engines}
    for _ in range(args.repeats + 1):  # the first round warms up
        for precision, engine in engines.items():
            start = time.perf_counter()
            engine.score(prompt)
            times[precision].append(time.perf_counter() - start)
    rates = {precision: len(prompt) / statistics.median(t[1:]) for precision, t in times.items()}
    windows = text_windows(engines["fp32"].tokenizer, text, 512, args.windows)
    report = quality_report(engines["bf16"].score, windows, engines["fp32"].score)
    print(f"CPU: {describe_cpu()}; {args.threads} threads; SmolLM2-135M-Instruct Q4_1; 512-token prompt, "
          f"median of {args.repeats}; quality over {report.num_windows} x 512-token windows")
    print("| prefill precision | prefill tok/s | vs fp32 | perplexity | mean KL vs fp32 | top-1 agreement |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    print(f"| fp32 (exact) | {rates['fp32']:.1f} | 1.00x | {report.reference_perplexity:.4f} | | |")
    print(f"| bf16 | {rates['bf16']:.1f} | {rates['bf16'] / rates['fp32']:.2f}x | {report.perplexity:.4f} | "
          f"{report.mean_kl:.6f} | {report.top1_agreement:.2%} |")


if __name__ == "__main__":
    main()
