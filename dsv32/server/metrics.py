"""Prometheus metrics for ``GET /metrics``, named as vLLM names them so its dashboards and ``vllm bench serve``
work unchanged.

Two sources: the engine's own counters (running/waiting requests, KV-cache blocks, prefix-cache queries and hits,
preemptions, token totals, speculative-decoding drafts and acceptances) are read from ``engine.stats()`` at scrape
time by ``EngineStatsCollector``; per-request timings (TTFT, inter-token latency, end-to-end latency) and outcomes
are observed by the serving code through ``RequestMetrics``; every error answered (``ErrorCountingMiddleware``, and
errors sent inside a stream that had started) is counted by status code. Each server owns its registry, so several
apps in one process (tests) do not collide.

``examples/monitoring/`` has a Grafana dashboard over these series (its test checks that every series it queries is
one exported here).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dsv32.engine.outputs import EngineStats

# vLLM's bucket edges, so histograms line up with theirs in the same dashboard.
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0)
_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                    480.0, 960.0, 1920.0, 7680.0)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000, 200000)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class EngineStatsCollector(Collector):
    """Reads the engine's counters when Prometheus scrapes, so they are never stale and cost nothing in between."""

    def __init__(self, stats: Callable[[], EngineStats], model_name: str) -> None:
        self._stats = stats
        self._labels = {"model_name": model_name, "engine": "0"}

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        family = GaugeMetricFamily(name, doc, labels=list(self._labels))
        family.add_metric(list(self._labels.values()), value)
        return family

    def _counter(self, name: str, doc: str, value: float) -> CounterMetricFamily:
        family = CounterMetricFamily(name, doc, labels=list(self._labels))
        family.add_metric(list(self._labels.values()), value)
        return family

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        yield self._gauge("vllm:num_requests_running", "Number of requests in model execution batches.",
                          s.num_running)
        yield self._gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", s.num_waiting)
        yield self._gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", s.kv_cache_usage)
        yield self._gauge("vllm:gpu_cache_usage_perc", "KV-cache usage (the older vLLM name).", s.kv_cache_usage)
        yield self._gauge("dsv32:kv_cache_total_blocks", "Blocks in the paged KV cache.", s.num_total_blocks)
        yield self._gauge("dsv32:kv_cache_free_blocks",
                          "KV-cache blocks no running request holds (prefix-cached blocks count as free).",
                          s.num_free_blocks)
        yield self._counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                            s.prefix_cache_queries)
        yield self._counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.", s.prefix_cache_hits)
        yield self._counter("vllm:num_preemptions", "Cumulative number of preemptions from the engine.",
                            s.num_preemptions)
        yield self._counter("vllm:prompt_tokens", "Number of prefill tokens processed.", s.prompt_tokens_total)
        yield self._counter("vllm:generation_tokens", "Number of generation tokens processed.",
                            s.generation_tokens_total)
        spec = s.spec_decode
        if spec is None:
            return
        yield self._counter("vllm:spec_decode_num_drafts", "Number of spec decoding drafts.", spec.num_drafts)
        yield self._counter("vllm:spec_decode_num_draft_tokens", "Number of draft tokens.", spec.num_draft_tokens)
        yield self._counter("vllm:spec_decode_num_accepted_tokens", "Number of accepted tokens.",
                            spec.num_accepted_tokens)
        per_pos = CounterMetricFamily("vllm:spec_decode_num_accepted_tokens_per_pos",
                                      "Accepted tokens per draft position.", labels=[*self._labels, "position"])
        for position, count in enumerate(spec.accepted_per_pos):
            per_pos.add_metric([*self._labels.values(), str(position)], count)
        yield per_pos


class ServerMetrics:
    """The registry behind ``/metrics`` plus the per-request histograms and counters the server observes."""

    def __init__(self, model_name: str, engine_stats: Callable[[], EngineStats], devices: int = 1) -> None:
        """``devices``: the processes (GPUs, or CPU ranks) the model runs over, exported so a dashboard can turn a
        price per device-hour into a cost per token."""
        self.registry = CollectorRegistry()
        self.model_name = model_name
        self.registry.register(EngineStatsCollector(engine_stats, model_name))
        labels = ["model_name", "engine"]

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=self.registry)

        self.time_to_first_token = histogram("vllm:time_to_first_token_seconds",
                                             "Histogram of time to first token in seconds.", _TTFT_BUCKETS)
        self.inter_token_latency = histogram("vllm:inter_token_latency_seconds",
                                             "Histogram of inter-token latency in seconds.", _ITL_BUCKETS)
        self.time_per_output_token = histogram("vllm:time_per_output_token_seconds",
                                               "Histogram of time per output token in seconds.", _ITL_BUCKETS)
        self.e2e_latency = histogram("vllm:e2e_request_latency_seconds",
                                     "Histogram of end to end request latency in seconds.", _LATENCY_BUCKETS)
        self.prompt_tokens = histogram("vllm:request_prompt_tokens", "Number of prefill tokens processed.",
                                       _TOKEN_BUCKETS)
        self.generation_tokens = histogram("vllm:request_generation_tokens",
                                           "Number of generation tokens processed.", _TOKEN_BUCKETS)
        self.params_n = histogram("vllm:request_params_n", "Histogram of the n request parameter.",
                                  (1, 2, 5, 10, 20))
        self.params_max_tokens = histogram("vllm:request_params_max_tokens",
                                           "Histogram of the max_tokens request parameter.", _TOKEN_BUCKETS)
        self.request_success = Counter("vllm:request_success", "Count of finished requests, by finish reason.",
                                       labels + ["finished_reason"], registry=self.registry)
        self.rejected = Counter("dsv32:requests_rejected", "Requests refused before they reached the engine.",
                                labels + ["reason"], registry=self.registry)
        self.errors = Counter("dsv32:request_errors",
                              "Requests answered with an error, by HTTP status code (an error sent inside a stream "
                              "that had started counts under its own code).", labels + ["code"],
                              registry=self.registry)
        self.labels = (model_name, "0")
        Gauge("dsv32:engine_devices", "Devices (GPUs, or CPU ranks) the model runs over.", labels,
              registry=self.registry).labels(*self.labels).set(devices)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def track(self, n: int, max_tokens: int) -> RequestMetrics:
        self.params_n.labels(*self.labels).observe(n)
        self.params_max_tokens.labels(*self.labels).observe(max_tokens)
        return RequestMetrics(self)

    def count_rejected(self, reason: str) -> None:
        self.rejected.labels(*self.labels, reason).inc()

    def count_error(self, status_code: int) -> None:
        self.errors.labels(*self.labels, str(status_code)).inc()


class ErrorCountingMiddleware:
    """Counts every response with an error status (4xx, 5xx), whoever answered it: a route, the error handlers, the
    middlewares that refuse a request before any route runs, or Starlette itself (an unknown route)."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self._app = app
        self._metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] >= 400:
                self._metrics.count_error(message["status"])
            await send(message)

        await self._app(scope, receive, counting_send)


class RequestMetrics:
    """Timings of one request, fed by the serving loop each time the engine reports new tokens."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self._metrics = metrics
        self._arrival = time.perf_counter()
        self._first_token: float | None = None
        self._last_token: float | None = None
        self._tokens_seen = 0

    def on_tokens(self, total_generated: int) -> None:
        """Called with the cumulative number of generated tokens (over all ``n`` completions)."""
        new = total_generated - self._tokens_seen
        if new <= 0:
            return
        now = time.perf_counter()
        labels = self._metrics.labels
        if self._first_token is None:
            self._first_token = now
            self._metrics.time_to_first_token.labels(*labels).observe(now - self._arrival)
        elif self._last_token is not None:
            # Several tokens may arrive in one engine step (n > 1); spread the gap over them as vLLM does.
            gap = (now - self._last_token) / new
            for _ in range(new):
                self._metrics.inter_token_latency.labels(*labels).observe(gap)
                self._metrics.time_per_output_token.labels(*labels).observe(gap)
        self._last_token = now
        self._tokens_seen = total_generated

    def on_finish(self, finish_reason: str, prompt_tokens: int, generation_tokens: int) -> None:
        labels = self._metrics.labels
        self._metrics.e2e_latency.labels(*labels).observe(time.perf_counter() - self._arrival)
        self._metrics.prompt_tokens.labels(*labels).observe(prompt_tokens)
        self._metrics.generation_tokens.labels(*labels).observe(generation_tokens)
        self._metrics.request_success.labels(*labels, finish_reason).inc()
