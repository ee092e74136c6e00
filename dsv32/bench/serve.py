"""`dsv32 bench serve`: load an OpenAI-compatible server with streamed requests, measured as `vllm bench serve` does.

Metric definitions (client side, `time.perf_counter()`, identical to vLLM's):
- TTFT: from sending the request to the first SSE chunk that has `choices` (text may be empty).
- ITL: the gaps between successive chunks with `choices`, one per chunk (a multi-token chunk is one gap).
- E2EL (latency): from sending to the last chunk with `choices` (the trailing usage-only chunk is not counted).
- TPOT: (E2EL - TTFT) / (output_tokens - 1) for requests with more than one output token.
- output tokens: `usage.completion_tokens` (we ask for `stream_options.include_usage`), else the generated text
  re-tokenized; input tokens: `usage.prompt_tokens` when the server reports it, else the dataset's count.
- throughputs divide by the wall time from the first dispatch to the last completion; peak output tokens/s counts
  chunk arrivals per 1-second bucket; peak concurrent requests is the exact maximum overlap of [start, end).
Statistics are numpy's mean / median / std / percentile (linear interpolation) over successful requests.
When the server exposes vLLM's speculative-decoding counters on /metrics (`vllm:spec_decode_*`), the run also
reports what it saw between its start and end: acceptance length (1 + accepted / drafts), acceptance rate, and
the acceptance rate per draft position.
`--concurrency-sweep` repeats the run per concurrency level and prints the table of `dsv32.bench.report`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families
from tqdm import tqdm

from dsv32.bench import report
from dsv32.bench.datasets import SampleRequest, TokenCounter, sample_random_requests, sample_sharegpt_requests
from dsv32.client.sse import apayloads, error_message, response_error

METRIC_NAMES = ("ttft", "tpot", "itl", "e2el")
DEFAULT_PERCENTILE_METRICS = "ttft,tpot,itl"
# Per-request lists that vLLM keeps in the saved JSON only with --save-detailed. Unlike vLLM we always keep
# "errors": the reason a request failed is the first thing a user needs.
DETAILED_KEYS = ("input_lens", "output_lens", "ttfts", "itls", "latencies", "start_times", "generated_texts")
READY_POLL_INTERVAL_S = 0.5
SPEC_DECODE_PREFIX = "vllm:spec_decode_"
SPEC_DECODE_PER_POS = "vllm:spec_decode_num_accepted_tokens_per_pos"


@dataclass
class RequestOutcome:
    """What one streamed request produced; times in seconds, `start_time` relative to the benchmark start."""

    prompt_len: int
    start_time: float = 0.0
    success: bool = False
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    generated_text: str = ""
    output_tokens: int | None = None
    error: str = ""


@dataclass(frozen=True)
class MetricSummary:
    """mean / median / std and the requested percentiles of one latency metric, in milliseconds."""

    mean_ms: float
    median_ms: float
    std_ms: float
    percentiles_ms: list[tuple[float, float]]

    @classmethod
    def of(cls, values_s: list[float], percentiles: list[float]) -> MetricSummary:
        # vLLM reports 0 for a metric with no samples (e.g. TPOT when every output is one token).
        data = np.asarray(values_s if values_s else [0.0], dtype=np.float64) * 1000.0
        return cls(
            mean_ms=float(np.mean(data)),
            median_ms=float(np.median(data)),
            std_ms=float(np.std(data)),
            percentiles_ms=[(p, float(np.percentile(data, p))) for p in percentiles],
        )


@dataclass(frozen=True)
class ServingMetrics:
    """The aggregate numbers of one benchmark run; per-request samples kept for tables and plots."""

    completed: int
    failed: int
    total_input: int
    total_output: int
    output_lens: list[int]
    request_throughput: float
    request_goodput: float
    output_throughput: float
    total_token_throughput: float
    max_output_tokens_per_s: float
    max_concurrent_requests: int
    ttfts: list[float]
    tpots: list[float]
    itls: list[float]
    e2els: list[float]

    def samples(self, metric: str) -> list[float]:
        return {"ttft": self.ttfts, "tpot": self.tpots, "itl": self.itls, "e2el": self.e2els}[metric]

    def summary(self, metric: str, percentiles: list[float]) -> MetricSummary:
        return MetricSummary.of(self.samples(metric), percentiles)


def request_tpot(outcome: RequestOutcome, output_len: int) -> float | None:
    """Time per output token after the first; None for outputs of at most one token."""
    if output_len <= 1:
        return None
    return (outcome.latency - outcome.ttft) / (output_len - 1)


def chunk_times(outcome: RequestOutcome) -> list[float]:
    """Arrival time of every chunk with choices, rebuilt as start + ttft + running sum of the ITLs."""
    times = [outcome.start_time + outcome.ttft]
    for gap in outcome.itl:
        times.append(times[-1] + gap)
    return times


def peak_output_tokens_per_s(outcomes: list[RequestOutcome]) -> float:
    """Most chunk arrivals in one 1-second bucket counted from the earliest successful start (vLLM's definition)."""
    successes = [o for o in outcomes if o.success]
    if not successes:
        return 0.0
    origin = min(o.start_time for o in successes)
    buckets = Counter(int(t - origin) for o in successes for t in chunk_times(o))
    return float(max(buckets.values()))


def peak_concurrency(outcomes: list[RequestOutcome]) -> int:
    """Exact maximum number of successful requests in flight, each occupying [start, start + latency)."""
    # At equal times the end (-1) sorts before the start (+1): a request that ends as another starts does not overlap.
    successes = [o for o in outcomes if o.success]
    events = sorted([(o.start_time, 1) for o in successes] + [(o.start_time + o.latency, -1) for o in successes])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


def compute_metrics(
    outcomes: list[RequestOutcome],
    duration_s: float,
    count_tokens: TokenCounter | None,
    goodput_slos_ms: dict[str, float] | None = None,
) -> ServingMetrics:
    """Aggregate per-request outcomes into vLLM's serving metrics (output_lens holds 0 for failed requests)."""
    output_lens: list[int] = []
    ttfts: list[float] = []
    tpots: list[float] = []
    itls: list[float] = []
    e2els: list[float] = []
    good = 0
    total_input = 0
    for outcome in outcomes:
        if not outcome.success:
            output_lens.append(0)
            continue
        output_len = outcome.output_tokens
        if not output_len:
            # No usage from the server: count the text (may differ by a token from the server's own count).
            output_len = count_tokens.count(outcome.generated_text) if count_tokens else 1
        output_lens.append(output_len)
        total_input += outcome.prompt_len
        tpot = request_tpot(outcome, output_len)
        if tpot is not None:
            tpots.append(tpot)
        ttfts.append(outcome.ttft)
        e2els.append(outcome.latency)
        itls.extend(outcome.itl)
        if goodput_slos_ms:
            # A one-token output has TPOT 0 for the SLO check, as in vLLM.
            measured = {"ttft": outcome.ttft, "tpot": tpot or 0.0, "e2el": outcome.latency}
            good += all(measured[name] * 1000.0 <= slo for name, slo in goodput_slos_ms.items())
    completed = len(ttfts)
    total_output = sum(output_lens)
    return ServingMetrics(
        completed=completed,
        failed=len(outcomes) - completed,
        total_input=total_input,
        total_output=total_output,
        output_lens=output_lens,
        request_throughput=completed / duration_s,
        request_goodput=good / duration_s,
        output_throughput=total_output / duration_s,
        total_token_throughput=(total_input + total_output) / duration_s,
        max_output_tokens_per_s=peak_output_tokens_per_s(outcomes),
        max_concurrent_requests=peak_concurrency(outcomes),
        ttfts=ttfts,
        tpots=tpots,
        itls=itls,
        e2els=e2els,
    )


def percentile_key(p: float) -> str:
    """vLLM's spelling of a percentile in result keys: 99 -> "99", 99.9 -> "99.9"."""
    return str(int(p)) if int(p) == p else str(p)


def result_dict(
    metrics: ServingMetrics,
    outcomes: list[RequestOutcome],
    duration_s: float,
    percentile_metrics: list[str],
    percentiles: list[float],
    with_goodput: bool,
) -> dict[str, Any]:
    """The benchmark result under vLLM's JSON keys (per-request lists included; see DETAILED_KEYS)."""
    result: dict[str, Any] = {
        "duration": duration_s,
        "completed": metrics.completed,
        "failed": metrics.failed,
        "total_input_tokens": metrics.total_input,
        "total_output_tokens": metrics.total_output,
        "request_throughput": metrics.request_throughput,
        "request_goodput": metrics.request_goodput if with_goodput else None,
        "output_throughput": metrics.output_throughput,
        "total_token_throughput": metrics.total_token_throughput,
        "input_lens": [o.prompt_len for o in outcomes],
        "output_lens": metrics.output_lens,
        "ttfts": [o.ttft for o in outcomes],
        "itls": [o.itl for o in outcomes],
        "latencies": [o.latency for o in outcomes],
        "start_times": [o.start_time for o in outcomes],
        "generated_texts": [o.generated_text for o in outcomes],
        "errors": [o.error for o in outcomes],
        "max_output_tokens_per_s": metrics.max_output_tokens_per_s,
        "max_concurrent_requests": metrics.max_concurrent_requests,
    }
    for metric in METRIC_NAMES:
        if metric not in percentile_metrics:
            continue
        summary = metrics.summary(metric, percentiles)
        result[f"mean_{metric}_ms"] = summary.mean_ms
        result[f"median_{metric}_ms"] = summary.median_ms
        result[f"std_{metric}_ms"] = summary.std_ms
        for p, value in summary.percentiles_ms:
            result[f"p{percentile_key(p)}_{metric}_ms"] = value
    return result


def arrival_offsets(num_requests: int, request_rate: float, burstiness: float, rng: np.random.Generator) -> list[float]:
    """Send time of each request from the start: 0 for an infinite rate, else gamma-distributed gaps.

    Gaps have shape `burstiness` and scale 1/(rate*burstiness) (burstiness 1 = Poisson), then are rescaled so the
    last request goes out at num_requests / rate, which keeps the offered load exact for any seed (as vLLM does).
    """
    if request_rate <= 0 or burstiness <= 0:
        raise ValueError("--request-rate and --burstiness must be positive")
    if request_rate == float("inf"):
        return [0.0] * num_requests
    if burstiness == float("inf"):
        gaps = np.full(num_requests, 1.0 / request_rate)
    else:
        gaps = rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=num_requests)
    offsets = np.cumsum(gaps)
    offsets *= (num_requests / request_rate) / offsets[-1]
    return offsets.tolist()


@dataclass(frozen=True)
class RequestSettings:
    """Where and how to send: the endpoint URL, the model name and the sampling fields merged into every body."""

    api_url: str
    model: str
    chat: bool
    ignore_eos: bool
    extra_body: dict[str, Any]


def request_body(settings: RequestSettings, sample: SampleRequest) -> dict[str, Any]:
    """The JSON body vLLM's `openai` / `openai-chat` backends send (chat content as a list of text parts)."""
    body: dict[str, Any] = {"model": settings.model, "stream": True, "stream_options": {"include_usage": True}}
    if settings.chat:
        body["messages"] = [{"role": "user", "content": [{"type": "text", "text": sample.prompt}]}]
        body["max_completion_tokens"] = sample.expected_output_len
    else:
        body["prompt"] = sample.prompt
        body["max_tokens"] = sample.expected_output_len
    if settings.ignore_eos:
        body["ignore_eos"] = True
    return {**body, **settings.extra_body}


def _chunk_text(choice: dict[str, Any], chat: bool) -> str:
    if not chat:
        return choice.get("text") or ""
    delta = choice.get("delta") or {}
    # Reasoning is output too: count it when the server gives no usage (vLLM names it `reasoning`, SGLang
    # `reasoning_content`; servers that send both carry the same string).
    reasoning = delta.get("reasoning_content") or delta.get("reasoning") or ""
    return reasoning + (delta.get("content") or "")


async def send_request(
    client: httpx.AsyncClient, settings: RequestSettings, sample: SampleRequest, origin: float
) -> RequestOutcome:
    """Stream one request and time its chunks; every failure ends up in `error`, nothing is raised."""
    outcome = RequestOutcome(prompt_len=sample.prompt_len)
    sent = time.perf_counter()
    outcome.start_time = sent - origin
    last_chunk = sent
    received = False
    try:
        async with client.stream("POST", settings.api_url, json=request_body(settings, sample)) as response:
            if response.status_code != 200:
                outcome.error = response_error(response.status_code, await response.aread())
                return outcome
            async for chunk in apayloads(response.aiter_lines()):
                if "error" in chunk:
                    outcome.error = f"stream error: {error_message(chunk)}"
                    return outcome
                if chunk.get("choices"):
                    now = time.perf_counter()
                    if received:
                        outcome.itl.append(now - last_chunk)
                    else:
                        outcome.ttft = now - sent
                        received = True
                    last_chunk = now
                    outcome.generated_text += _chunk_text(chunk["choices"][0], settings.chat)
                if usage := chunk.get("usage"):
                    outcome.output_tokens = usage.get("completion_tokens")
                    outcome.prompt_len = usage.get("prompt_tokens") or outcome.prompt_len
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as error:
        outcome.error = f"{type(error).__name__}: {error}"
        return outcome
    if not received:
        outcome.error = "Never received a valid chunk to calculate TTFT."
        return outcome
    outcome.latency = last_chunk - sent
    outcome.success = True
    return outcome


def api_root(base_url: str) -> str:
    """`http://host:port` from a base URL given with or without a trailing `/v1`."""
    root = base_url.rstrip("/")
    return root[: -len("/v1")] if root.endswith("/v1") else root


def server_root(base_url: str | None, host: str, port: int) -> str:
    """The server's root from `--base-url`, else from `--host` and `--port`."""
    return api_root(base_url) if base_url else f"http://{host}:{port}"


async def wait_for_server(client: httpx.AsyncClient, root: str, timeout_s: float) -> list[str]:
    """Poll `GET /v1/models` until the server answers; return the model ids it serves ([] if it has no such route)."""
    deadline = time.monotonic() + timeout_s
    announced = False
    while True:
        try:
            response = await client.get(f"{root}/v1/models")
        except httpx.TransportError as error:
            if time.monotonic() >= deadline:
                raise ValueError(f"cannot reach {root}: {error or type(error).__name__}") from None
            if not announced:  # a server still starting is normal; a wrong URL should not look like a hang
                print(f"waiting up to {timeout_s:.0f} s for {root} to answer (--ready-check-timeout-sec)",
                      file=sys.stderr)
                announced = True
            await asyncio.sleep(READY_POLL_INTERVAL_S)
            continue
        if response.status_code != 200:
            return []
        try:
            return [str(entry["id"]) for entry in response.json().get("data", [])]
        except (ValueError, KeyError, TypeError, AttributeError):
            return []


async def fetch_spec_decode_counters(client: httpx.AsyncClient, root: str) -> dict[str, float] | None:
    """The server's ``vllm:spec_decode_*`` counters (summed over engines; per position keyed ``per_pos:<i>``), or
    None when /metrics is missing or has none (no speculative decoding)."""
    try:
        response = await client.get(root + "/metrics")
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    counters: dict[str, float] = {}
    try:
        families = list(text_string_to_metric_families(response.text))
    except ValueError:
        return None
    for family in families:
        for sample in family.samples:
            if not sample.name.startswith(SPEC_DECODE_PREFIX) or not sample.name.endswith("_total"):
                continue
            name = sample.name.removesuffix("_total")
            key = f"per_pos:{sample.labels['position']}" if name == SPEC_DECODE_PER_POS else name
            counters[key] = counters.get(key, 0.0) + sample.value
    return counters if f"{SPEC_DECODE_PREFIX}num_drafts" in counters else None


def spec_decode_result(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """What this run added to the counters, with vLLM bench's result keys."""
    def delta(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    drafts = delta(f"{SPEC_DECODE_PREFIX}num_drafts")
    draft_tokens = delta(f"{SPEC_DECODE_PREFIX}num_draft_tokens")
    accepted = delta(f"{SPEC_DECODE_PREFIX}num_accepted_tokens")
    positions = sorted(int(key.split(":")[1]) for key in after if key.startswith("per_pos:"))
    return {
        "spec_decode_num_drafts": int(drafts),
        "spec_decode_draft_tokens": int(draft_tokens),
        "spec_decode_accepted_tokens": int(accepted),
        "spec_decode_acceptance_length": 1.0 + accepted / drafts if drafts else 0.0,
        "spec_decode_acceptance_rate": 100.0 * accepted / draft_tokens if draft_tokens else 0.0,
        "spec_decode_per_position_acceptance_rates": [
            100.0 * delta(f"per_pos:{p}") / drafts if drafts else 0.0 for p in positions],
    }


@dataclass
class LevelRun:
    """One benchmark run (one concurrency level): its result dict and its metrics."""

    result: dict[str, Any]
    metrics: ServingMetrics
    max_concurrency: int | None


async def _run_level(
    args: argparse.Namespace,
    client: httpx.AsyncClient,
    settings: RequestSettings,
    samples: list[SampleRequest],
    counter: TokenCounter,
    max_concurrency: int | None,
    root: str,
) -> LevelRun:
    print(f"Traffic request rate: {args.request_rate}")
    distribution = "Poisson process" if args.burstiness == 1.0 else "Gamma distribution"
    print(f"Burstiness factor: {args.burstiness} ({distribution})")
    print(f"Maximum request concurrency: {max_concurrency}")
    offsets = arrival_offsets(len(samples), args.request_rate, args.burstiness, np.random.default_rng(args.seed))
    semaphore = asyncio.Semaphore(max_concurrency or len(samples))
    spec_before = await fetch_spec_decode_counters(client, root)
    progress = tqdm(total=len(samples), disable=args.disable_tqdm, file=sys.stderr)
    origin = time.perf_counter()

    async def dispatch(sample: SampleRequest, offset: float) -> RequestOutcome:
        # Arrival follows the schedule; the semaphore then holds requests back beyond --max-concurrency.
        await asyncio.sleep(max(0.0, origin + offset - time.perf_counter()))
        async with semaphore:
            outcome = await send_request(client, settings, sample, origin)
        progress.update(1)
        return outcome

    outcomes = await asyncio.gather(*(dispatch(s, o) for s, o in zip(samples, offsets, strict=True)))
    duration = time.perf_counter() - origin
    progress.close()
    goodput = _parse_goodput(args.goodput)
    metrics = compute_metrics(list(outcomes), duration, counter, goodput)
    result = result_dict(
        metrics, list(outcomes), duration, _percentile_metrics(args), _percentiles(args), with_goodput=bool(goodput)
    )
    result = {**_run_header(args, settings, max_concurrency), **result}
    spec_after = await fetch_spec_decode_counters(client, root) if spec_before is not None else None
    if spec_before is not None and spec_after is not None:
        result.update(spec_decode_result(spec_before, spec_after))
    print(report.format_result_block(result))
    if metrics.failed:
        print(report.format_errors(result["errors"]))
    return LevelRun(result, metrics, max_concurrency)


def _run_header(args: argparse.Namespace, settings: RequestSettings, max_concurrency: int | None) -> dict[str, Any]:
    """The run's setup, saved ahead of the metrics as vLLM does."""
    return {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"),
        "endpoint_type": "openai-chat" if settings.chat else "openai",
        "backend": "openai-chat" if settings.chat else "openai",
        "label": None,
        "model_id": settings.model,
        "tokenizer_id": args.tokenizer,
        "num_prompts": args.num_prompts,
        "request_rate": args.request_rate if args.request_rate < float("inf") else "inf",
        "burstiness": args.burstiness,
        "max_concurrency": max_concurrency,
    }


def load_samples(args: argparse.Namespace, counter: TokenCounter) -> list[SampleRequest]:
    if args.num_prompts < 1:
        raise ValueError("--num-prompts must be at least 1")
    if args.dataset_name == "random":
        return sample_random_requests(
            counter,
            args.num_prompts,
            args.random_input_len,
            args.random_output_len,
            args.random_range_ratio,
            args.seed,
        )
    return sample_sharegpt_requests(counter, args.num_prompts, args.dataset_path, args.sharegpt_output_len, args.seed)


async def benchmark(args: argparse.Namespace) -> list[LevelRun]:
    """Run the benchmark as the parsed flags say: one run, or one per level of --concurrency-sweep."""
    levels = _sweep_levels(args.concurrency_sweep) if args.concurrency_sweep else [args.max_concurrency]
    if any(level is not None and level < 1 for level in levels):
        raise ValueError("concurrency levels must be at least 1")
    root = server_root(args.base_url, args.host, args.port)
    limits = httpx.Limits(max_connections=max((lv or 0) for lv in levels) or None, max_keepalive_connections=None)
    timeout = httpx.Timeout(6 * 3600.0, connect=60.0)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        served = await wait_for_server(client, root, args.ready_check_timeout_sec)
        counter = TokenCounter.load(args.tokenizer)
        samples = load_samples(args, counter)
        model = args.served_model_name or args.model or (served[0] if served else None)
        if model is None:
            raise ValueError("--model is required: the server lists no model at /v1/models")
        settings = RequestSettings(
            api_url=root + args.endpoint,
            model=model,
            chat=args.endpoint.rstrip("/").endswith("chat/completions"),
            # Like recent vLLM, random prompts always run to their output length: EOS would make lengths random.
            ignore_eos=args.ignore_eos or args.dataset_name == "random",
            extra_body={**_sampling_fields(args), **(args.extra_body or {})},
        )
        print("Starting initial single prompt test run...")
        probe = await send_request(client, settings, samples[0], time.perf_counter())
        if not probe.success:
            raise ValueError(f"initial test request to {settings.api_url} failed: {probe.error}")
        print("Initial test run completed.")
        if args.num_warmups:
            print(f"Warming up with {args.num_warmups} requests...")
            warmup_slots = asyncio.Semaphore(max((lv or 0) for lv in levels) or args.num_warmups)

            async def warmup() -> None:
                async with warmup_slots:
                    await send_request(client, settings, samples[0], time.perf_counter())

            await asyncio.gather(*(warmup() for _ in range(args.num_warmups)))
        runs = []
        for level in levels:
            print("Starting main benchmark run...")
            runs.append(await _run_level(args, client, settings, samples, counter, level, root))
    return runs


def _sampling_fields(args: argparse.Namespace) -> dict[str, Any]:
    fields = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k}
    return {name: value for name, value in fields.items() if value is not None}


def _percentile_metrics(args: argparse.Namespace) -> list[str]:
    return [m.strip() for m in (args.percentile_metrics or DEFAULT_PERCENTILE_METRICS).split(",") if m.strip()]


def _percentiles(args: argparse.Namespace) -> list[float]:
    return [float(p) for p in args.metric_percentiles.split(",") if p.strip()]


def _parse_goodput(pairs: list[str] | None) -> dict[str, float]:
    slos: dict[str, float] = {}
    for pair in pairs or []:
        name, _, value = pair.partition(":")
        if name not in ("ttft", "tpot", "e2el") or not value:
            raise ValueError(f"--goodput takes ttft:MS, tpot:MS or e2el:MS pairs, got {pair!r}")
        slos[name] = float(value)
    return slos


def _sweep_levels(text: str) -> list[int | None]:
    try:
        return [int(level) for level in text.split(",") if level.strip()]
    except ValueError:
        raise ValueError(f"--concurrency-sweep takes integers separated by commas, got {text!r}") from None


def validate_args(args: argparse.Namespace) -> None:
    """Reject flag combinations argparse cannot see, before any request is sent."""
    unknown = set(_percentile_metrics(args)) - set(METRIC_NAMES)
    if unknown:
        raise ValueError(f"--percentile-metrics: unknown {sorted(unknown)}, choose from {', '.join(METRIC_NAMES)}")
    try:
        percentiles = _percentiles(args)
    except ValueError:
        raise ValueError(
            f"--metric-percentiles takes numbers separated by commas, got {args.metric_percentiles!r}"
        ) from None
    if any(not 0 <= p <= 100 for p in percentiles):
        raise ValueError("--metric-percentiles must lie in [0, 100]")
    _parse_goodput(args.goodput)
    if args.plot and not args.concurrency_sweep:
        raise ValueError("--plot draws a --concurrency-sweep; give the levels too")
    if args.gpu_hourly_cost is not None and not args.concurrency_sweep:
        raise ValueError("--gpu-hourly-cost prices a --concurrency-sweep; give the levels too")
    if args.num_gpus < 1:
        raise ValueError("--num-gpus must be at least 1")
    if args.extra_body is not None and not isinstance(args.extra_body, dict):
        raise ValueError("--extra-body must be a JSON object")
    if args.num_warmups < 0:
        raise ValueError("--num-warmups must be >= 0")
    if not args.endpoint.startswith("/"):
        raise ValueError(f"--endpoint must start with '/', got {args.endpoint!r}")


def _result_path(args: argparse.Namespace, run: LevelRun, sweep: bool) -> str:
    if args.result_filename:
        name = args.result_filename
        if sweep:
            stem, ext = os.path.splitext(name)
            name = f"{stem}-concurrency{run.max_concurrency}{ext or '.json'}"
    else:
        concurrency = f"-concurrency{run.max_concurrency}" if run.max_concurrency is not None else ""
        model = str(run.result["model_id"]).split("/")[-1]
        name = f"openai-{args.request_rate}qps{concurrency}-{model}-{run.result['date']}.json"
    return os.path.join(args.result_dir, name) if args.result_dir else name


def save_results(args: argparse.Namespace, runs: list[LevelRun]) -> list[str]:
    """Write each run's JSON (per-request lists only with --save-detailed); return the paths written."""
    paths = []
    for run in runs:
        path = _result_path(args, run, sweep=len(runs) > 1 or bool(args.concurrency_sweep))
        if os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        saved = {k: v for k, v in run.result.items() if args.save_detailed or k not in DETAILED_KEYS}
        with open(path, "w", encoding="utf-8") as f:
            json.dump(saved, f)
        paths.append(path)
    return paths


def sweep_rows(runs: list[LevelRun]) -> list[report.SweepRow]:
    rows = []
    for run in runs:
        ttft = run.metrics.summary("ttft", [50.0, 99.0]).percentiles_ms
        tpot = run.metrics.summary("tpot", [50.0, 99.0]).percentiles_ms
        rows.append(
            report.SweepRow(
                concurrency=run.max_concurrency or 0,
                completed=run.metrics.completed,
                failed=run.metrics.failed,
                output_throughput=run.metrics.output_throughput,
                total_token_throughput=run.metrics.total_token_throughput,
                ttft_p50_ms=ttft[0][1],
                ttft_p99_ms=ttft[1][1],
                tpot_p50_ms=tpot[0][1],
                tpot_p99_ms=tpot[1][1],
            )
        )
    return rows


def add_bench_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `dsv32 bench serve`: vLLM's names and defaults, plus the sweep / cost / plot options."""
    server = parser.add_argument_group("server")
    server.add_argument("--base-url", default=None, help="server root, e.g. http://127.0.0.1:8000 (else host/port)")
    server.add_argument("--host", default="127.0.0.1")
    server.add_argument("--port", type=int, default=8000)
    server.add_argument(
        "--endpoint", default="/v1/completions", help="/v1/completions (default) or /v1/chat/completions"
    )
    server.add_argument("--model", default=None, help="model name to request (default: the first of /v1/models)")
    server.add_argument("--served-model-name", default=None, help="model name to send, if it differs from --model")
    server.add_argument(
        "--tokenizer", default=None, help="checkpoint folder or tokenizer.json (default: the DeepSeek-V3.x tokenizer)"
    )
    server.add_argument(
        "--ready-check-timeout-sec", type=float, default=600, help="how long to wait for the server to answer"
    )

    data = parser.add_argument_group("dataset")
    data.add_argument("--dataset-name", choices=("random", "sharegpt"), default="random")
    data.add_argument("--dataset-path", default=None, help="ShareGPT_V3_unfiltered_cleaned_split.json")
    data.add_argument("--num-prompts", type=int, default=1000)
    data.add_argument("--random-input-len", type=int, default=1024)
    data.add_argument("--random-output-len", type=int, default=128)
    data.add_argument("--random-range-ratio", type=float, default=0.0, help="lengths uniform in [L(1-r), L(1+r)]")
    data.add_argument("--sharegpt-output-len", type=int, default=None, help="fixed output length for sharegpt")
    data.add_argument("--seed", type=int, default=0)

    traffic = parser.add_argument_group("traffic")
    traffic.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (inf: all at once)")
    traffic.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of arrivals (1 = Poisson)")
    traffic.add_argument("--max-concurrency", type=int, default=None)
    traffic.add_argument("--num-warmups", type=int, default=0)
    traffic.add_argument(
        "--ignore-eos", action="store_true", help="generate past EOS (always on for --dataset-name random, as in vLLM)"
    )
    traffic.add_argument("--temperature", type=float, default=0.0, help="default 0.0 (greedy), as vLLM's bench")
    traffic.add_argument("--top-p", type=float, default=None)
    traffic.add_argument("--top-k", type=int, default=None)
    traffic.add_argument("--extra-body", type=json.loads, default=None, help="JSON object merged into every request")

    results = parser.add_argument_group("results")
    results.add_argument(
        "--percentile-metrics", default=None, help="comma-separated of ttft,tpot,itl,e2el (default ttft,tpot,itl)"
    )
    results.add_argument("--metric-percentiles", default="99", help='comma-separated, e.g. "50,90,99"')
    results.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS", help="SLOs, e.g. ttft:500 tpot:50")
    results.add_argument("--save-result", action="store_true")
    results.add_argument("--save-detailed", action="store_true", help="keep per-request lists in the JSON")
    results.add_argument("--result-dir", default=None)
    results.add_argument("--result-filename", default=None)
    results.add_argument("--disable-tqdm", action="store_true")

    sweep = parser.add_argument_group("concurrency sweep")
    sweep.add_argument("--concurrency-sweep", default=None, metavar="8,16,32", help="run once per concurrency level")
    sweep.add_argument(
        "--gpu-hourly-cost", type=float, default=None, metavar="USD", help="price of one GPU-hour, for USD/1K tokens"
    )
    sweep.add_argument("--num-gpus", type=int, default=1, help="GPUs the server uses (multiplies the hourly cost)")
    sweep.add_argument("--plot", default=None, metavar="FILE.png", help="draw throughput and latency vs concurrency")


def run_bench_serve(args: argparse.Namespace) -> int:
    """Run `bench serve` from parsed flags; a bad flag, file or server prints one line and returns 1."""
    try:
        validate_args(args)
        runs = asyncio.run(benchmark(args))
        if args.save_result:
            for path in save_results(args, runs):
                print(f"Saved {path}")
        if args.concurrency_sweep:
            rows = sweep_rows(runs)
            print(report.sweep_table(rows, args.gpu_hourly_cost, args.num_gpus))
            if args.plot:
                report.plot_sweep(rows, args.plot)
                print(f"Saved {args.plot}")
    except (ValueError, OSError, ImportError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dsv32 bench serve", description=__doc__.split("\n")[0])
    add_bench_serve_arguments(parser)
    return run_bench_serve(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
