"""Prometheus metrics of one server app, in a registry of its own (so several apps can coexist).

Counters and histograms are fed by the HTTP handlers through a per-request `RequestTimer`; the
queue and KV-cache gauges read the snapshot the engine thread publishes at scrape time.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

from lmserve.outputs import RequestOutput
from lmserve.server.async_engine import AsyncEngine

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0,
                    10.0, 20.0, 40.0, 80.0)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, engine: AsyncEngine):
        self.registry = registry = CollectorRegistry()
        self.http_requests = Counter("lmserve_http_requests", "HTTP requests to /v1 by response status code",
                                     ["status_code"], registry=registry)
        self.finished = Counter("lmserve_request_finished", "Generated choices by finish reason "
                                "(stop, length, abort, error)", ["finish_reason"], registry=registry)
        self.prompt_tokens = Counter("lmserve_prompt_tokens", "Prompt tokens processed", registry=registry)
        self.generation_tokens = Counter("lmserve_generation_tokens", "Tokens generated", registry=registry)
        self.ttft = Histogram("lmserve_time_to_first_token_seconds", "Time from arrival to the first token",
                              buckets=_LATENCY_BUCKETS, registry=registry)
        self.itl = Histogram("lmserve_inter_token_latency_seconds", "Time between consecutive outputs "
                             "of a request", buckets=_LATENCY_BUCKETS, registry=registry)
        self.e2e = Histogram("lmserve_e2e_request_latency_seconds", "Time from arrival to the last token",
                             buckets=_LATENCY_BUCKETS, registry=registry)
        Gauge("lmserve_num_requests_running", "Requests being generated", registry=registry) \
            .set_function(lambda: engine.stats.num_running)
        Gauge("lmserve_num_requests_waiting", "Requests queued, not yet started", registry=registry) \
            .set_function(lambda: engine.num_waiting)
        Gauge("lmserve_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use (0 to 1)", registry=registry) \
            .set_function(lambda: engine.stats.kv_cache_usage)
        Gauge("lmserve_prefix_cache_hit_rate", "Fraction of admitted prompt tokens found in the prefix cache "
              "since start", registry=registry).set_function(lambda: engine.stats.prefix_cache_hit_rate)
        spec = lambda: engine.stats.spec  # noqa: E731  (None when speculative decoding is off)
        Gauge("lmserve_spec_decode_acceptance_rate", "Fraction of speculative proposals accepted since start",
              registry=registry).set_function(lambda: spec().acceptance_rate if spec() else 0.0)
        Gauge("lmserve_spec_decode_mean_accepted_tokens", "Proposals accepted per verifying sequence-step since "
              "start", registry=registry).set_function(lambda: spec().mean_accepted if spec() else 0.0)
        Gauge("lmserve_spec_decode_proposer_seconds", "Time spent proposing tokens since start",
              registry=registry).set_function(lambda: spec().proposer_seconds if spec() else 0.0)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def timer(self) -> RequestTimer:
        return RequestTimer(self)


class RequestTimer:
    """Latency and token accounting of one engine request, fed with each of its outputs."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics
        self.start = self.last = time.perf_counter()
        self.first_seen = False

    def observe(self, output: RequestOutput) -> None:
        now = time.perf_counter()
        new_tokens = sum(len(c.delta_token_ids) for c in output.outputs)
        if new_tokens:
            if self.first_seen:
                self.metrics.itl.observe(now - self.last)
            else:
                self.metrics.ttft.observe(now - self.start)
                self.metrics.prompt_tokens.inc(len(output.prompt_token_ids))
            self.first_seen = True
            self.last = now
            self.metrics.generation_tokens.inc(new_tokens)
        if output.finished:
            self.metrics.e2e.observe(now - self.start)
            for choice in output.outputs:
                self.metrics.finished.labels(choice.finish_reason or "abort").inc()

    def fail(self, n: int, reason: str = "error") -> None:
        """The request ended without a final output (timeout, disconnect, engine error)."""
        self.metrics.finished.labels(reason).inc(n)
