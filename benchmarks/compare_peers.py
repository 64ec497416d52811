"""lmserve against llama.cpp and Hugging Face transformers on the same GGUF file and threads.

One run measures, for each engine in its own process (so peak RSS is its own):
load time, prefill tokens/s (one 512-token prompt; lmserve also with bf16 GEMMs, in a process of
its own), decode tokens/s at batch 1 (128 tokens), aggregate decode tokens/s with 4 and 16
parallel sequences (32-token prompts, 128 tokens each; with --sweep 1 to 32, and --plot draws them),
peak RSS, and the achieved weight bandwidth (weight bytes read per decode step x steps/s; of a
mixture of experts, only the top-k experts a token uses) against this machine's measured copy
bandwidth. Then the quality report: perplexity on the same text in llama.cpp's windows, and KL
divergence / top-1 agreement against the same weights in fp32, for lmserve's packed path (fp32 and
bf16 prefill GEMMs) and for llama.cpp.

llama.cpp runs its own tools (llama-bench, llama-batched-bench, llama-perplexity) built by
benchmarks/build_llamacpp.sh; transformers loads the GGUF dequantized (fp32 and bf16).

    .venv/bin/python benchmarks/compare_peers.py --threads 2            # everything (~15 min)
    .venv/bin/python benchmarks/compare_peers.py --skip-transformers --skip-quality
    .venv/bin/python benchmarks/compare_peers.py --model FILE.gguf --skip-transformers --skip-quality
    .venv/bin/python benchmarks/compare_peers.py --skip-transformers --skip-quality --sweep \
        --plot benchmarks/batch_sweep.png

A mixture-of-experts file both engines run: benchmarks/make_moe_gguf.py.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # this checkout's lmserve, not whichever one the interpreter has installed
PROMPT_TOKENS, DECODE_TOKENS, PARALLEL_PROMPT = 512, 128, 32
SWEEP = (1, 2, 4, 8, 16, 32)  # --sweep: the batch sizes of the plot


# ---- workers (each runs in its own process and prints one JSON line) -----------------------------

def _prompt(tokenizer, n: int, salt: int = 0) -> list[int]:
    text = " ".join(f"word{(i * 7919 + salt) % 1000}" for i in range(n))
    return tokenizer.encode(text)[:n]


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker_lmserve(args) -> dict:
    import torch

    from lmserve import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(args.model, threads=args.threads, kv_cache_memory="256MiB", max_num_seqs=32)
    load = time.perf_counter() - start
    tok = llm.tokenizer
    greedy = dict(temperature=0.0, ignore_eos=True)

    def timed(prompts, max_tokens):
        start = time.perf_counter()
        llm.generate(prompts, SamplingParams(max_tokens=max_tokens, **greedy), use_tqdm=False)
        return time.perf_counter() - start

    timed([_prompt(tok, 64, 99)], 4)  # warm-up
    prefill = min(timed([_prompt(tok, PROMPT_TOKENS, s)], 1) for s in range(2))
    single = _prompt(tok, PARALLEL_PROMPT)
    # Best of several runs, as llama-bench repeats its own: this VM's timings are noisy.
    decode_b1 = (DECODE_TOKENS - 1) / min(timed([single], DECODE_TOKENS) - timed([single], 1) for _ in range(3))
    batched = {}
    for n in args.batches:
        prompts = [_prompt(tok, PARALLEL_PROMPT, s) for s in range(n)]
        first = timed(prompts, 1)
        batched[n] = n * (DECODE_TOKENS - 1) / min(timed(prompts, DECODE_TOKENS) - first for _ in range(2))
    model = llm.engine.model
    step_bytes = _matrix_bytes(model) - _embedding_table_bytes(model) - _idle_expert_bytes(model)
    return dict(load_s=load, prefill=PROMPT_TOKENS / prefill, decode_b1=decode_b1,
                **{f"decode_x{n}": v for n, v in batched.items()}, rss_mib=_peak_rss_mib(),
                weight_bytes_per_token=step_bytes, threads=torch.get_num_threads())


def _matrix_bytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers())
               if t.dim() >= 2)


def _idle_expert_bytes(model) -> int:
    """A decode step at batch 1 reads only the top-k experts of each mixture-of-experts layer."""
    from lmserve.layers.moe import SparseMoeBlock

    return sum(_matrix_bytes(block.experts) * (block.experts.num_experts - block.top_k) // block.experts.num_experts
               for block in model.modules() if isinstance(block, SparseMoeBlock))


def _embedding_table_bytes(model) -> int:
    """A decode step gathers a few embedding rows, it does not read the table (unless the head
    shares the table's storage, in which case the head reads it)."""
    table = model.model.embed_tokens
    head = getattr(model, "lm_head", None)
    stored = table.packed.q if table.packed is not None else table.weight
    shares = head is not None and getattr(head, "packed", None) is not None and \
        getattr(head.packed, "q", None) is not None and head.packed.q.data_ptr() == stored.data_ptr()
    tied_dense = head is not None and head.packed is None and head.tied_to is not None
    if shares or tied_dense:
        return 0
    return sum(t.numel() * t.element_size() for t in (table.packed.buffers() if table.packed is not None
                                                      else [table.weight]))


def worker_prefill(args) -> dict:
    """lmserve's prefill alone with `--prefill-precision` (its own process: another engine's RSS)."""
    from lmserve import LLM, SamplingParams

    llm = LLM(args.model, threads=args.threads, kv_cache_memory="256MiB", prefill_precision=args.prefill_precision)
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    llm.generate([_prompt(llm.tokenizer, 64, 99)], params, use_tqdm=False)  # warm-up
    best = float("inf")
    for salt in range(3):
        prompt = _prompt(llm.tokenizer, PROMPT_TOKENS, salt)
        start = time.perf_counter()
        llm.generate([prompt], params, use_tqdm=False)
        best = min(best, time.perf_counter() - start)
    return {f"prefill_{args.prefill_precision}": PROMPT_TOKENS / best}


def worker_transformers(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    path = Path(args.model)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype).eval()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    load = time.perf_counter() - start

    def generate(ids, max_new):
        batch = torch.tensor(ids)
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=max_new,
                           min_new_tokens=max_new, do_sample=False, pad_token_id=tok.eos_token_id)
        return time.perf_counter() - start

    generate([_prompt(tok, 64, 99)], 4)
    prefill = min(generate([_prompt(tok, PROMPT_TOKENS, s)], 1) for s in range(2))
    single = [_prompt(tok, PARALLEL_PROMPT)]
    decode_b1 = (DECODE_TOKENS - 1) / (generate(single, DECODE_TOKENS) - generate(single, 1))
    batched = {}
    for n in args.batches:
        prompts = [_prompt(tok, PARALLEL_PROMPT, s) for s in range(n)]
        first = generate(prompts, 1)
        batched[n] = n * (DECODE_TOKENS - 1) / (generate(prompts, DECODE_TOKENS) - first)
    return dict(load_s=load, prefill=PROMPT_TOKENS / prefill, decode_b1=decode_b1,
                **{f"decode_x{n}": v for n, v in batched.items()}, rss_mib=_peak_rss_mib())


def worker_quality(args) -> dict:
    """lmserve's packed path against the same file dequantized to fp32, on llama.cpp's windows."""
    from lmserve import LLM
    from lmserve.quality import quality_report, text_windows

    packed = LLM(args.model, threads=args.threads, kv_cache_memory="64MiB", prefill_precision=args.prefill_precision)
    reference = LLM(args.model, threads=args.threads, kv_cache_memory="64MiB", quantization="none")
    windows = text_windows(packed.tokenizer, Path(args.text).read_text(), 512, args.max_windows)
    report = quality_report(packed.engine.score, windows, reference.engine.score)
    return {k: v for k, v in vars(report).items() if isinstance(v, (int, float))}


# ---- llama.cpp ---------------------------------------------------------------------------------

def _run(cmd: list[str]) -> tuple[str, float]:
    """stdout+stderr of a command and its peak RSS in MiB."""
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        out.seek(0)
        text = out.read()
    if status != 0:
        raise RuntimeError(f"{cmd[0]} failed:\n{text[-2000:]}")
    return text, usage.ru_maxrss / 1024


def llama_cpp(bin_dir: Path, model: str, threads: int, batches: list[int]) -> dict:
    text, rss = _run([str(bin_dir / "llama-bench"), "-m", model, "-t", str(threads), "-p", str(PROMPT_TOKENS),
                      "-n", str(DECODE_TOKENS), "-r", "3", "-o", "jsonl"])
    rows = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    result = {"rss_mib": rss}
    for row in rows:
        key = "prefill" if row["n_prompt"] else "decode_b1"
        result[key] = max(row.get("samples_ts") or [row["avg_ts"]])  # best repetition, as for lmserve
    npl = ",".join(str(n) for n in batches)
    text, rss_batched = _run([str(bin_dir / "llama-batched-bench"), "-m", model, "-t", str(threads), "-c", "8192",
                              "-npp", str(PARALLEL_PROMPT), "-ntg", str(DECODE_TOKENS), "-npl", npl,
                              "--output-format", "jsonl"])
    for line in text.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            result[f"decode_x{row['pl']}"] = row["speed_tg"]
    result["rss_mib"] = max(rss, rss_batched)
    return result


def llama_cpp_quality(bin_dir: Path, model: str, reference: str, text: str, threads: int,
                      max_windows: int | None) -> dict:
    base = tempfile.mktemp(suffix=".kld")
    chunks = ["--chunks", str(max_windows)] if max_windows else []
    common = ["-f", text, "-c", "512", "-t", str(threads), *chunks]
    _run([str(bin_dir / "llama-perplexity"), "-m", reference, *common, "--kl-divergence-base", base])
    out, _ = _run([str(bin_dir / "llama-perplexity"), "-m", model, *common, "--kl-divergence-base", base,
                   "--kl-divergence"])
    os.unlink(base)
    result = {}
    for key, pattern in (("perplexity", r"Mean PPL\(Q\)\s*:\s*([\d.]+)"),
                         ("reference_perplexity", r"Mean PPL\(base\)\s*:\s*([\d.]+)"),
                         ("mean_kl", r"Mean\s+KLD:\s*([\d.]+)"),
                         ("top1_agreement", r"Same top p:\s*([\d.]+)")):
        match = re.search(pattern, out)
        if match:
            result[key] = float(match.group(1)) / (100 if key == "top1_agreement" else 1)
    return result


# ---- orchestration -----------------------------------------------------------------------------

def copy_bandwidth_gbs() -> float:
    import torch

    src = torch.empty(256 * 2**20, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() / best / 1e9  # read + write


def worker_bandwidth(args) -> dict:
    import torch

    torch.set_num_threads(os.cpu_count())  # the machine's bandwidth, whatever --threads the engines get
    return {"copy_gbs": copy_bandwidth_gbs()}


def _worker(kind: str, args, extra: list[str] = ()) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--model", args.model, "--threads", str(args.threads),
           *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if out.returncode != 0:
        raise RuntimeError(f"{kind} worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _default_text() -> Path:
    """About 6,000 tokens of English prose from this repository's documentation."""
    path = Path(tempfile.gettempdir()) / "lmserve-quality-text.txt"
    parts = [REPO / "README.md", REPO / "docs" / "architecture.md", REPO.parent / "shared" / "DESIGN.md"]
    path.write_text("\n\n".join(p.read_text() for p in parts if p.exists()))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="GGUF file (default: the embedded SmolLM2 Q4_1)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--llama-bin", default=None, help="llama.cpp bin directory (default: build or reuse "
                                                          "it with benchmarks/build_llamacpp.sh)")
    parser.add_argument("--text", default=None, help="text for the quality report (default: repo docs)")
    parser.add_argument("--max-windows", type=int, default=8, help="512-token windows in the quality report")
    parser.add_argument("--skip-llamacpp", action="store_true")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--json", default=None, help="also write all figures to this file")
    parser.add_argument("--sweep", action="store_true", help=f"decode at batch sizes {SWEEP} (default 4 and 16)")
    parser.add_argument("--plot", default=None, help="with --sweep: write tokens/s against batch size to this PNG")
    parser.add_argument("--batches", default="4,16", help=argparse.SUPPRESS)
    parser.add_argument("--prefill-precision", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="fp32", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.batches = list(SWEEP) if args.sweep else [int(n) for n in args.batches.split(",")]
    if args.model is None:
        from lmserve.default_model import DEFAULT_MODEL, resolve_embedded
        args.model = resolve_embedded(DEFAULT_MODEL)
    if args.worker:
        workers = {"lmserve": worker_lmserve, "transformers": worker_transformers, "quality": worker_quality,
                   "bandwidth": worker_bandwidth, "prefill": worker_prefill}
        print(json.dumps(workers[args.worker](args)))
        return

    import platform

    results: dict[str, dict] = {}
    # In a worker too: a child's peak RSS starts from this process's at the fork, so this one
    # stays small (no PyTorch, no copy buffers) for the engines' peaks to be their own.
    bandwidth = _worker("bandwidth", args)["copy_gbs"]
    print(f"model {args.model}, {args.threads} threads, {platform.processor() or platform.machine()}, "
          f"copy bandwidth {bandwidth:.1f} GB/s", flush=True)
    batches = ["--batches", ",".join(map(str, args.batches))]
    results["lmserve"] = _worker("lmserve", args, batches)
    results["lmserve"].update(_worker("prefill", args, ["--prefill-precision", "bf16"]))
    print("lmserve done", flush=True)
    bin_dir = None
    if not args.skip_llamacpp:
        bin_dir = Path(args.llama_bin) if args.llama_bin else Path(subprocess.run(
            ["bash", str(REPO / "benchmarks" / "build_llamacpp.sh")], capture_output=True, text=True,
            check=True).stdout.strip().splitlines()[-1])
        results["llama.cpp"] = llama_cpp(bin_dir, args.model, args.threads, args.batches)
        print("llama.cpp done", flush=True)
    if not args.skip_transformers:
        for dtype in ("fp32", "bf16"):
            results[f"transformers {dtype}"] = _worker("transformers", args, ["--dtype", dtype, *batches])
            print(f"transformers {dtype} done", flush=True)
    _print_speed_table(results, bandwidth, args.batches)
    if args.plot:
        _plot_sweep(results, args.batches, args.plot, f"{Path(args.model).name}, {args.threads} threads\n"
                                                       f"{_cpu_label()}")
    quality = {}
    if not args.skip_quality:
        text = args.text or str(_default_text())
        for precision in ("fp32", "bf16"):
            name = "lmserve" if precision == "fp32" else "lmserve, bf16 prefill GEMMs"
            quality[name] = _worker("quality", args, ["--text", text, "--max-windows", str(args.max_windows),
                                                      "--prefill-precision", precision])
        if bin_dir is not None:
            with tempfile.TemporaryDirectory() as tmp:
                reference = str(Path(tmp) / "reference-f32.gguf")
                subprocess.run([sys.executable, "-m", "lmserve.entrypoints.cli", "quantize", args.model, reference,
                                "--type", "f32"], check=True, capture_output=True, cwd=REPO)
                quality["llama.cpp"] = llama_cpp_quality(bin_dir, args.model, reference, text, args.threads,
                                                         args.max_windows)
        _print_quality_table(quality)
    if args.json:
        Path(args.json).write_text(json.dumps({"speed": results, "quality": quality, "copy_gbs": bandwidth},
                                              indent=2))


ROWS = [("load_s", "load time (s)"), ("prefill", f"prefill tok/s ({PROMPT_TOKENS}-token prompt)"),
        ("decode_b1", f"decode tok/s, batch 1 ({DECODE_TOKENS} tokens)"),
        ("rss_mib", "peak RSS (MiB)")]


def _print_speed_table(results: dict[str, dict], bandwidth: float, batches: list[int]) -> None:
    ours = results["lmserve"]
    peers = [name for name in results if name != "lmserve"]
    header = ["metric", "lmserve", *peers, *[f"lmserve / {p}" for p in peers]]
    print("\n| " + " | ".join(header) + " |\n|" + " --- |" * len(header))
    rows = [*ROWS[:3], ("prefill_bf16", f"prefill tok/s, bf16 GEMMs (--prefill-precision bf16)"),
            *[(f"decode_x{n}", f"aggregate decode tok/s, {n} sequences") for n in batches if n > 1], ROWS[3]]
    for key, label in rows:
        cells = [label, _fmt(ours.get(key))] + [_fmt(results[p].get(key)) for p in peers]
        cells += [_ratio(ours.get(key), results[p].get(key)) for p in peers]
        print("| " + " | ".join(cells) + " |")
    per_token = ours["weight_bytes_per_token"]
    achieved = per_token * ours["decode_b1"] / 1e9
    print(f"\nlmserve reads {per_token / 1e6:.1f} MB of weights per decode step: {achieved:.1f} GB/s at batch 1, "
          f"{100 * achieved / bandwidth:.0f}% of the {bandwidth:.1f} GB/s copy bandwidth "
          f"(floor: {bandwidth * 1e9 / per_token:.0f} tok/s)")
    if "llama.cpp" in results:
        theirs = per_token * results["llama.cpp"]["decode_b1"] / 1e9
        print(f"llama.cpp at the same bytes per token: {theirs:.1f} GB/s, {100 * theirs / bandwidth:.0f}%")


def _plot_sweep(results: dict[str, dict], batches: list[int], path: str, title: str) -> None:
    """Aggregate decode tokens/s against the number of sequences, one line per engine."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, figures in results.items():
        points = [(n, figures.get(f"decode_x{n}")) for n in batches]
        points = [(n, v) for n, v in points if v]
        ax.plot([n for n, _ in points], [v for _, v in points], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(n) for n in batches])
    ax.set_xlabel("sequences decoded together")
    ax.set_ylabel("aggregate decode tokens/s")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


def _cpu_label() -> str:
    from lmserve.quant.native import cpu_name, describe_cpu

    return f"{cpu_name()}; {describe_cpu()}"


def _print_quality_table(quality: dict[str, dict]) -> None:
    print("\n| quality (same text, 512-token windows) | " + " | ".join(quality) + " |")
    print("| --- |" + " --- |" * len(quality))
    for key in ("perplexity", "reference_perplexity", "mean_kl", "top1_agreement"):
        print(f"| {key} | " + " | ".join(_fmt(q.get(key), 4) for q in quality.values()) + " |")


def _fmt(value, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _ratio(ours, theirs) -> str:
    return "—" if not ours or not theirs else f"{ours / theirs:.2f}x"


if __name__ == "__main__":
    main()
