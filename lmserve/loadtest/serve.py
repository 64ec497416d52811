"""`lmserve bench serve`: a load generator for any OpenAI-compatible completions server.

Sends a bounded number of streaming `/v1/completions` requests — synthetic prompts of a given
input length, or prompts from a JSONL file — either at a Poisson arrival rate or at a fixed
maximum concurrency, and reports time to first token (TTFT), time per output token (TPOT),
inter-token latency (ITL) and end-to-end latency (mean, median, p99), request and token
throughput. The same tool measures lmserve and its peers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import httpx

_WORDS = ("time person year way day thing man world life hand part child eye woman place work week case "
          "point government company number group problem fact river mountain city light music").split()


@dataclass
class RequestResult:
    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""


def synthetic_prompts(count: int, input_len: int, seed: int) -> list[str]:
    """Prompts of about `input_len` tokens (one common word is about one token)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(input_len)) for _ in range(count)]


def dataset_prompts(path: str, count: int) -> list[str]:
    prompts = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                item = json.loads(line)
                prompts.append(item["prompt"] if isinstance(item, dict) else str(item))
    if not prompts:
        raise SystemExit(f"error: {path} holds no prompts")
    return [prompts[i % len(prompts)] for i in range(count)]


async def _one_request(client: httpx.AsyncClient, url: str, payload: dict) -> RequestResult:
    import httpx

    start = time.perf_counter()
    result = RequestResult(ok=False)
    last = None
    try:
        async with client.stream("POST", url, json=payload) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    result.prompt_tokens = chunk["usage"].get("prompt_tokens", 0)
                    result.output_tokens = chunk["usage"].get("completion_tokens", result.output_tokens)
                if not chunk.get("choices") or not chunk["choices"][0].get("text"):
                    continue
                now = time.perf_counter()
                if last is None:
                    result.ttft = now - start
                else:
                    result.itl.append(now - last)
                last = now
        result.latency = time.perf_counter() - start
        result.output_tokens = result.output_tokens or (len(result.itl) + 1 if last else 0)
        result.ok = last is not None
        if not result.ok:
            result.error = "no tokens received"
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    return result


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean_ms": 0.0, "median_ms": 0.0, "p99_ms": 0.0}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]
    return {"mean_ms": statistics.fmean(values) * 1000, "median_ms": statistics.median(values) * 1000,
            "p99_ms": p99 * 1000}


async def run_benchmark(base_url: str, model: str | None, prompts: list[str], output_len: int,
                        request_rate: float, max_concurrency: int | None, seed: int,
                        api_key: str | None = None, timeout: float = 600.0) -> dict:
    import httpx  # here, so that the CLI's other commands start without it

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    url = base_url.rstrip("/") + "/v1/completions"
    async with httpx.AsyncClient(timeout=timeout, headers=headers) as client:
        if model is None:
            listing = (await client.get(base_url.rstrip("/") + "/v1/models")).json()
            if not listing.get("data"):
                raise SystemExit("error: the server lists no models in /v1/models 'data'; pass --model")
            model = listing["data"][0]["id"]
        gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        rng = random.Random(seed)

        async def limited(payload):
            if gate is None:
                return await _one_request(client, url, payload)
            async with gate:
                return await _one_request(client, url, payload)

        tasks = []
        start = time.perf_counter()
        for prompt in prompts:
            payload = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0,
                       "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            tasks.append(asyncio.create_task(limited(payload)))
            if request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    ok = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in ok)
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    return {
        "base_url": base_url, "model": model, "num_requests": len(results), "completed": len(ok),
        "failed": len(results) - len(ok), "errors": sorted({r.error for r in results if r.error})[:5],
        "request_rate": request_rate, "max_concurrency": max_concurrency, "duration_s": duration,
        "request_throughput": len(ok) / duration,
        "output_token_throughput": output_tokens / duration,
        "total_token_throughput": (output_tokens + sum(r.prompt_tokens for r in ok)) / duration,
        "ttft": _stats([r.ttft for r in ok]), "tpot": _stats(tpot),
        "itl": _stats([x for r in ok for x in r.itl]), "e2e_latency": _stats([r.latency for r in ok]),
    }


def print_report(result: dict) -> None:
    print(f"requests: {result['completed']} completed, {result['failed']} failed in {result['duration_s']:.2f} s")
    print(f"request throughput: {result['request_throughput']:.2f} req/s; output tokens: "
          f"{result['output_token_throughput']:.1f} tok/s; total tokens: {result['total_token_throughput']:.1f} tok/s")
    for key, label in (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2e_latency", "E2E")):
        s = result[key]
        print(f"{label:<5} mean {s['mean_ms']:9.1f} ms   median {s['median_ms']:9.1f} ms   p99 {s['p99_ms']:9.1f} ms")
    for error in result["errors"]:
        print(f"error: {error}")


def add_parser(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="benchmarks")
    kinds = bench.add_subparsers(dest="bench_command", required=True)
    p = kinds.add_parser("serve", help="load-test an OpenAI-compatible server")
    p.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="model name (default: the server's first model)")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", type=int, default=128, help="synthetic prompt length in words (~tokens)")
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--dataset", default=None, help="JSONL file of {\"prompt\": ...} lines instead of synthetic")
    p.add_argument("--request-rate", type=float, default=float("inf"), help="Poisson rate (req/s); inf = all at once")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--api-key", default=None)
    p.add_argument("--result-file", default=None, help="write the JSON result here")


def cmd_bench(args: argparse.Namespace) -> None:
    from lmserve.errors import InvalidParameterError

    for name in ("num_prompts", "input_len", "output_len"):
        if getattr(args, name) < 1:
            raise InvalidParameterError(f"--{name.replace('_', '-')}", f"must be >= 1, got {getattr(args, name)}")
    if args.request_rate <= 0:
        raise InvalidParameterError("--request-rate", f"must be > 0, got {args.request_rate}")
    prompts = (dataset_prompts(args.dataset, args.num_prompts) if args.dataset
               else synthetic_prompts(args.num_prompts, args.input_len, args.seed))
    result = asyncio.run(run_benchmark(args.base_url, args.model, prompts, args.output_len, args.request_rate,
                                       args.max_concurrency, args.seed, args.api_key))
    print_report(result)
    if args.result_file:
        with open(args.result_file, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
