"""Soak run of `lmserve serve` (a script, not a test): the server on loopback with the default
model under N minutes of mixed traffic at bounded concurrency — chat and completions, streamed
and not, streams the client drops half-way, and malformed requests that must get a 4xx — while
the server's RSS, its KV-cache usage (/metrics) and the request latencies are sampled every 10 s.

Writes soak.csv (one row per sample), soak.png (RSS, KV usage and latency over time) and the
server's log to --out, and prints a summary: requests by kind, failed valid requests (must be
0), malformed requests answered otherwise than expected, the KV usage once the traffic has
drained (must be 0), and the RSS growth after warm-up (the first quarter of the run, at most 5
minutes). Exits 1 when any of these does not hold.

    .venv/bin/python benchmarks/soak_server.py [--minutes 30] [--concurrency 4] [--out soak-results]

Needs the `bench` extra (matplotlib, psutil): pip install -e ".[bench]".
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import random
import re
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

SAMPLE_SECONDS = 10.0
KINDS = {  # kind -> weight in the mix
    "chat": 25, "chat_stream": 20, "completion": 12, "completion_stream": 10, "abort_stream": 15, "malformed": 18,
}
TOPICS = ["the sea", "a lighthouse keeper", "prime numbers", "how bread rises", "the moon landing", "a lost key",
          "autumn in a city", "why the sky is blue", "a robot learning to paint", "the history of tea"]
LONG_TEXT = ("The quick brown fox jumps over the lazy dog while the river runs to the sea and the market "
             "opens at dawn with bakers selling bread. ") * 12
CHAT_MODEL = None  # the served model name is read from /v1/models at start

# Malformed requests: (name, method, path, body as bytes or JSON, the status the server must answer)
MALFORMED = [
    ("invalid JSON", "POST", "/v1/chat/completions", b'{"messages": [', 400),
    ("max_tokens of the wrong type", "POST", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"}, 400),
    ("messages missing", "POST", "/v1/chat/completions", {"max_tokens": 4}, 400),
    ("empty messages", "POST", "/v1/chat/completions", {"messages": [], "max_tokens": 4}, 400),
    ("bad role", "POST", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400),
    ("lone surrogate", "POST", "/v1/completions", b'{"prompt": "a\\udc80b", "max_tokens": 2}', 400),
    ("unknown model", "POST", "/v1/completions", {"model": "no-such-model", "prompt": "hi", "max_tokens": 2}, 404),
    ("n too large", "POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2, "n": 100000}, 400),
    ("negative temperature", "POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2, "temperature": -1}, 400),
    ("empty prompt", "POST", "/v1/completions", {"prompt": "", "max_tokens": 2}, 400),
    ("prompt over the context", "POST", "/v1/completions", {"prompt": "word " * 20000, "max_tokens": 2}, 400),
    ("body over the size limit", "POST", "/v1/completions", b'{"prompt": "' + b"x" * (5 << 20) + b'"}', 413),
    ("unknown route", "POST", "/v1/no-such-route", {"prompt": "hi"}, 404),
    ("wrong method", "GET", "/v1/chat/completions", None, 405),
    ("tokenize with both prompt and messages", "POST", "/tokenize",
     {"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}, 400),
]


@dataclass
class Result:
    kind: str
    end: float  # seconds since the start of the run
    ok: bool
    latency: float | None = None  # end to end, valid requests
    ttft: float | None = None  # streams
    detail: str = ""


@dataclass
class Run:
    start: float = field(default_factory=time.perf_counter)
    results: list[Result] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)

    def now(self) -> float:
        return time.perf_counter() - self.start


# ---- the server ---------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(args, log) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "lmserve.entrypoints.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    if args.model:
        command += ["--model", args.model]
    command += args.server_arg
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}; see {log.name}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise SystemExit(f"the server did not answer /health within 300 s; see {log.name}")


def rss_bytes(pid: int) -> int:
    try:
        import psutil
        return psutil.Process(pid).memory_info().rss
    except ImportError:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    return 0


_GAUGE = re.compile(r"^(lmserve_[a-z_]+)(?:\{[^}]*\})? ([-+0-9.eEinfa]+)$", re.MULTILINE)


async def scrape(client: httpx.AsyncClient) -> dict[str, float]:
    response = await client.get("/metrics", timeout=10)
    response.raise_for_status()
    return {name: float(value) for name, value in _GAUGE.findall(response.text)}


# ---- traffic ------------------------------------------------------------------------------------

def chat_body(rng: random.Random, stream: bool) -> dict:
    messages = [{"role": "system", "content": "You are concise."}] if rng.random() < 0.5 else []
    content = f"Write two sentences about {rng.choice(TOPICS)}."
    if rng.random() < 0.2:
        content = LONG_TEXT[: rng.randrange(200, len(LONG_TEXT))] + "\nSummarise that."
    messages.append({"role": "user", "content": content})
    body = {"model": CHAT_MODEL, "messages": messages, "max_tokens": rng.randrange(8, 48),
            "temperature": rng.choice([0.0, 0.7, 1.0]), "stream": stream}
    if stream and rng.random() < 0.5:
        body["stream_options"] = {"include_usage": True}
    if rng.random() < 0.1:
        body["n"] = 2
    return body


def completion_body(rng: random.Random, stream: bool) -> dict:
    prompt = rng.choice(["Once upon a time", "The capital of France is", "def fibonacci(n):", "1, 2, 3, 4,",
                         LONG_TEXT[: rng.randrange(100, len(LONG_TEXT))]])
    return {"model": CHAT_MODEL, "prompt": prompt, "max_tokens": rng.randrange(8, 48),
            "temperature": rng.choice([0.0, 0.8]), "stream": stream}


async def non_streaming(client: httpx.AsyncClient, path: str, body: dict, kind: str, run: Run) -> Result:
    start = time.perf_counter()
    response = await client.post(path, json=body)
    latency = time.perf_counter() - start
    if response.status_code != 200:
        return Result(kind, run.now(), False, detail=f"{response.status_code} {response.text[:200]}")
    choices = response.json().get("choices") or []
    if len(choices) != body.get("n", 1) or any(c.get("finish_reason") not in ("stop", "length") for c in choices):
        return Result(kind, run.now(), False, detail=f"choices {json.dumps(choices)[:200]}")
    return Result(kind, run.now(), True, latency=latency)


async def streaming(client: httpx.AsyncClient, path: str, body: dict, kind: str, run: Run,
                    drop_after: int | None = None) -> Result:
    """A stream read to its end ([DONE] after a finish_reason per choice), or dropped by closing
    the connection after `drop_after` events."""
    start, ttft, events, finished = time.perf_counter(), None, 0, 0
    async with client.stream("POST", path, json=body) as response:
        if response.status_code != 200:
            await response.aread()
            return Result(kind, run.now(), False, detail=f"{response.status_code} {response.text[:200]}")
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                ok = finished == body.get("n", 1)
                return Result(kind, run.now(), ok, latency=time.perf_counter() - start, ttft=ttft,
                              detail="" if ok else f"{finished} finish_reason(s)")
            chunk = json.loads(data)
            if "error" in chunk:
                return Result(kind, run.now(), False, detail=f"error event {data[:200]}")
            ttft = ttft if ttft is not None else time.perf_counter() - start
            finished += sum(1 for c in chunk.get("choices", []) if c.get("finish_reason"))
            events += 1
            if drop_after is not None and events >= drop_after:
                return Result(kind, run.now(), True, ttft=ttft, detail="dropped")  # leaving closes the connection
    if drop_after is not None:  # ended before the client could drop it: fine
        return Result(kind, run.now(), True, ttft=ttft, detail="ended before the drop")
    return Result(kind, run.now(), False, detail="stream ended without [DONE]")


async def malformed(client: httpx.AsyncClient, rng: random.Random, run: Run) -> Result:
    name, method, path, body, expected = rng.choice(MALFORMED)
    if isinstance(body, bytes):
        response = await client.request(method, path, content=body, headers={"content-type": "application/json"})
    elif body is None:
        response = await client.request(method, path)
    else:
        response = await client.request(method, path, json=body)
    ok = response.status_code == expected
    return Result("malformed", run.now(), ok,
                  detail="" if ok else f"{name}: expected {expected}, got {response.status_code} {response.text[:150]}")


async def one_request(client: httpx.AsyncClient, rng: random.Random, run: Run) -> Result:
    kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
    try:
        if kind == "chat":
            return await non_streaming(client, "/v1/chat/completions", chat_body(rng, False), kind, run)
        if kind == "chat_stream":
            return await streaming(client, "/v1/chat/completions", chat_body(rng, True), kind, run)
        if kind == "completion":
            return await non_streaming(client, "/v1/completions", completion_body(rng, False), kind, run)
        if kind == "completion_stream":
            return await streaming(client, "/v1/completions", completion_body(rng, True), kind, run)
        if kind == "abort_stream":
            body = chat_body(rng, True) if rng.random() < 0.5 else completion_body(rng, True)
            body["max_tokens"] = 64
            path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
            return await streaming(client, path, body, kind, run, drop_after=rng.randrange(1, 6))
        return await malformed(client, rng, run)
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        return Result(kind, run.now(), False, detail=f"{type(exc).__name__}: {exc}")


async def worker(url: str, seed: int, end: float, run: Run) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(120, connect=10)) as client:
        while run.now() < end:
            result = await one_request(client, rng, run)
            run.results.append(result)
            if not result.ok:
                print(f"  [{result.end:7.1f} s] FAILED {result.kind}: {result.detail}", flush=True)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def sample(client: httpx.AsyncClient, pid: int, run: Run, since: float) -> dict:
    gauges = await scrape(client)
    window = [r for r in run.results if r.end >= since]
    latencies = [r.latency for r in window if r.ok and r.latency is not None and r.ttft is None]
    ttfts = [r.ttft for r in window if r.ok and r.ttft is not None]
    ms = lambda value: None if value is None else round(value * 1000, 1)
    row = {
        "elapsed_s": round(run.now(), 1),
        "rss_mib": round(rss_bytes(pid) / 2**20, 1),
        "kv_cache_usage": gauges.get("lmserve_kv_cache_usage_ratio"),
        "running": gauges.get("lmserve_num_requests_running"),
        "waiting": gauges.get("lmserve_num_requests_waiting"),
        "requests_in_window": len(window),
        "requests_total": len(run.results),
        "failed_valid_total": sum(1 for r in run.results if not r.ok and r.kind != "malformed"),
        "malformed_unexpected_total": sum(1 for r in run.results if not r.ok and r.kind == "malformed"),
        "e2e_p50_ms": ms(percentile(latencies, 0.5)), "e2e_p95_ms": ms(percentile(latencies, 0.95)),
        "ttft_p50_ms": ms(percentile(ttfts, 0.5)), "ttft_p95_ms": ms(percentile(ttfts, 0.95)),
    }
    run.samples.append(row)
    return row


async def sampler(url: str, pid: int, end: float, run: Run, writer, csv_file) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        since = 0.0
        while run.now() < end:
            await asyncio.sleep(min(SAMPLE_SECONDS, max(0.0, end - run.now())))
            row = await sample(client, pid, run, since)
            since = row["elapsed_s"]
            writer.writerow(row)
            csv_file.flush()
            print(f"  [{row['elapsed_s']:7.1f} s] rss {row['rss_mib']:7.1f} MiB  kv {row['kv_cache_usage']:.3f}  "
                  f"requests {row['requests_total']:5d} (+{row['requests_in_window']})  "
                  f"e2e p50 {row['e2e_p50_ms']} ms  ttft p50 {row['ttft_p50_ms']} ms  "
                  f"failed {row['failed_valid_total']}", flush=True)


async def drained(url: str, timeout: float = 60) -> dict[str, float]:
    """The gauges once nothing is running or waiting any more (or after `timeout`)."""
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        deadline = time.perf_counter() + timeout
        while True:
            gauges = await scrape(client)
            idle = not gauges.get("lmserve_num_requests_running") and not gauges.get("lmserve_num_requests_waiting")
            if idle or time.perf_counter() > deadline:
                await asyncio.sleep(1)  # aborts of dropped streams land within a step
                return await scrape(client)
            await asyncio.sleep(0.5)


# ---- report -------------------------------------------------------------------------------------

def slope_mib_per_min(rows: list[dict]) -> float:
    if len(rows) < 2:
        return 0.0
    xs = [r["elapsed_s"] / 60 for r in rows]
    ys = [r["rss_mib"] for r in rows]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0


def plot(rows: list[dict], warmup_s: float, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [r["elapsed_s"] / 60 for r in rows]
    figure, axes = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    axes[0].plot(minutes, [r["rss_mib"] for r in rows], marker=".", color="tab:blue")
    axes[0].set_ylabel("server RSS (MiB)")
    axes[1].plot(minutes, [r["kv_cache_usage"] for r in rows], marker=".", color="tab:green")
    axes[1].set_ylabel("KV-cache usage")
    axes[1].set_ylim(-0.02, 1.02)
    for key, style in (("e2e_p50_ms", "-"), ("e2e_p95_ms", "--"), ("ttft_p50_ms", "-"), ("ttft_p95_ms", "--")):
        points = [(m, r[key]) for m, r in zip(minutes, rows) if r[key] is not None]
        if points:
            axes[2].plot(*zip(*points), style, marker=".", label=key.replace("_ms", "").replace("_", " "))
    axes[2].set_ylabel("latency (ms)")
    axes[2].set_xlabel("minutes")
    axes[2].legend(loc="upper left", fontsize="small", ncol=4)
    for axis in axes:
        axis.axvline(warmup_s / 60, color="grey", linestyle=":", linewidth=1)
        axis.grid(alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def summarize(run: Run, rows: list[dict], idle: dict[str, float], warmup_s: float, args) -> bool:
    by_kind: dict[str, list[Result]] = {}
    for result in run.results:
        by_kind.setdefault(result.kind, []).append(result)
    failed_valid = [r for r in run.results if not r.ok and r.kind != "malformed"]
    unexpected = [r for r in run.results if not r.ok and r.kind == "malformed"]
    after = [r for r in rows if r["elapsed_s"] >= warmup_s]
    base = after[0]["rss_mib"] if after else rows[0]["rss_mib"]
    growth = rows[-1]["rss_mib"] - base
    latencies = [r.latency for r in run.results if r.ok and r.latency is not None and r.ttft is None]
    idle_kv = idle.get("lmserve_kv_cache_usage_ratio")

    print(f"\n==== soak summary: {run.now() / 60:.1f} min, concurrency {args.concurrency} ====")
    for kind, results in sorted(by_kind.items()):
        print(f"  {kind:18s} {len(results):6d} requests, {sum(not r.ok for r in results)} failed")
    print(f"  total              {len(run.results):6d} requests ({len(run.results) / run.now():.2f}/s)")
    print(f"  failed valid requests: {len(failed_valid)}")
    for result in failed_valid[:10]:
        print(f"    {result.kind}: {result.detail}")
    print(f"  malformed requests answered otherwise than expected: {len(unexpected)}")
    for result in unexpected[:10]:
        print(f"    {result.detail}")
    print(f"  RSS: {rows[0]['rss_mib']:.0f} MiB at the first sample, {base:.0f} MiB after warm-up "
          f"({warmup_s / 60:.1f} min), {rows[-1]['rss_mib']:.0f} MiB at the end, max "
          f"{max(r['rss_mib'] for r in rows):.0f} MiB: growth after warm-up {growth:+.1f} MiB "
          f"(slope {slope_mib_per_min(after):+.2f} MiB/min)")
    kv = [r["kv_cache_usage"] for r in rows if r["kv_cache_usage"] is not None]
    print(f"  KV-cache usage: mean {statistics.fmean(kv):.3f}, max {max(kv):.3f} under load; "
          f"{idle_kv} once drained")
    if latencies:
        print(f"  non-streamed latency: p50 {percentile(latencies, 0.5) * 1000:.0f} ms, "
              f"p95 {percentile(latencies, 0.95) * 1000:.0f} ms")
    ok = not failed_valid and not unexpected and idle_kv == 0.0 and growth <= args.max_rss_growth
    print(f"  verdict: {'OK' if ok else 'FAILED'} (failed valid 0, malformed as expected, KV 0 once drained, "
          f"RSS growth after warm-up <= {args.max_rss_growth:g} MiB)")
    return ok


async def soak(args) -> bool:
    global CHAT_MODEL
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    log = (out / "server.log").open("wb")
    proc, url = start_server(args, log)
    try:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            CHAT_MODEL = (await client.get("/v1/models")).json()["data"][0]["id"]
        print(f"server pid {proc.pid} at {url}, model {CHAT_MODEL}; {args.minutes:g} min of traffic at "
              f"concurrency {args.concurrency}; results in {out}", flush=True)
        run = Run()
        end = args.minutes * 60
        warmup_s = min(300.0, end / 4)
        with (out / "soak.csv").open("w", newline="") as csv_file:
            writer = csv.DictWriter(csv_file, fieldnames=[
                "elapsed_s", "rss_mib", "kv_cache_usage", "running", "waiting", "requests_in_window",
                "requests_total", "failed_valid_total", "malformed_unexpected_total", "e2e_p50_ms", "e2e_p95_ms",
                "ttft_p50_ms", "ttft_p95_ms"])
            writer.writeheader()
            async with httpx.AsyncClient(base_url=url, timeout=10) as client:  # a first sample, before traffic
                writer.writerow(await sample(client, proc.pid, run, 0.0))
            await asyncio.gather(sampler(url, proc.pid, end, run, writer, csv_file),
                                 *(worker(url, args.seed + i, end, run) for i in range(args.concurrency)))
            idle = await drained(url)
            async with httpx.AsyncClient(base_url=url, timeout=10) as client:  # a last sample, drained
                writer.writerow(await sample(client, proc.pid, run, run.now()))
        rows = run.samples
        plot(rows, warmup_s, out / "soak.png",
             f"lmserve serve soak: {args.minutes:g} min, concurrency {args.concurrency}, {len(run.results)} requests")
        ok = summarize(run, rows, idle, warmup_s, args)
        print(f"  wrote {out / 'soak.csv'}, {out / 'soak.png'}, {out / 'server.log'}")
        return ok
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="how long the traffic runs (default 30)")
    parser.add_argument("--concurrency", type=int, default=4, help="clients sending requests at once (default 4)")
    parser.add_argument("--out", type=Path, default=Path("soak-results"), help="directory for the CSV, plot, log")
    parser.add_argument("--model", default=None, help="model to serve (default: the embedded default model)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the traffic mix")
    parser.add_argument("--max-rss-growth", type=float, default=64.0,
                        help="RSS growth after warm-up (MiB) above which the run fails (default 64)")
    parser.add_argument("--server-arg", action="append", default=[],
                        help="an extra argument for `lmserve serve` (repeatable), e.g. --server-arg=--max-waiting=64")
    args = parser.parse_args()
    return 0 if asyncio.run(soak(args)) else 1


if __name__ == "__main__":
    sys.exit(main())
