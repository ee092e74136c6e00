"""How benchmark results are shown: vLLM's "Serving Benchmark Result" block (with its speculative-decoding section
when the server reported acceptance counters), the concurrency-sweep table with USD per 1K tokens, and the sweep
plot (matplotlib, the optional `plot` extra)."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

BANNER_WIDTH = 50
SECONDS_PER_HOUR = 3600.0
# (key in the result, name in the block, section title), in vLLM's order.
METRIC_SECTIONS = (
    ("ttft", "TTFT", "Time to First Token"),
    ("tpot", "TPOT", "Time per Output Token (excl. 1st token)"),
    ("itl", "ITL", "Inter-token Latency"),
    ("e2el", "E2EL", "End-to-end Latency"),
)


def _line(label: str, value: Any) -> str:
    if isinstance(value, float):
        return f"{label:<40} {value:<10.2f}"
    return f"{label:<40} {value:<10}"


def format_result_block(result: dict[str, Any]) -> str:
    """The block `vllm bench serve` prints, built from a result dict with vLLM's JSON keys.

    Optional lines follow vLLM: concurrency only when limited, rate only when finite, goodput only with SLOs, and a
    latency section for each metric whose `mean_<metric>_ms` is present (i.e. selected by --percentile-metrics).
    """
    lines = [" Serving Benchmark Result ".center(BANNER_WIDTH, "=")]
    lines.append(_line("Successful requests:", result["completed"]))
    lines.append(_line("Failed requests:", result["failed"]))
    if result.get("max_concurrency") is not None:
        lines.append(_line("Maximum request concurrency:", result["max_concurrency"]))
    if result.get("request_rate", "inf") != "inf":
        lines.append(_line("Request rate configured (RPS):", float(result["request_rate"])))
    lines.append(_line("Benchmark duration (s):", float(result["duration"])))
    lines.append(_line("Total input tokens:", result["total_input_tokens"]))
    lines.append(_line("Total generated tokens:", result["total_output_tokens"]))
    lines.append(_line("Request throughput (req/s):", float(result["request_throughput"])))
    if result.get("request_goodput") is not None:
        lines.append(_line("Request goodput (req/s):", float(result["request_goodput"])))
    lines.append(_line("Output token throughput (tok/s):", float(result["output_throughput"])))
    lines.append(_line("Peak output token throughput (tok/s):", float(result["max_output_tokens_per_s"])))
    lines.append(_line("Peak concurrent requests:", float(result["max_concurrent_requests"])))
    lines.append(_line("Total Token throughput (tok/s):", float(result["total_token_throughput"])))
    for key, name, title in METRIC_SECTIONS:
        if f"mean_{key}_ms" not in result:
            continue
        lines.append(title.center(BANNER_WIDTH, "-"))
        lines.append(_line(f"Mean {name} (ms):", float(result[f"mean_{key}_ms"])))
        lines.append(_line(f"Median {name} (ms):", float(result[f"median_{key}_ms"])))
        percentile = re.compile(rf"^p(\d+(?:\.\d+)?)_{key}_ms$")
        for result_key, value in result.items():
            if match := percentile.match(result_key):
                lines.append(_line(f"P{match.group(1)} {name} (ms):", float(value)))
    if "spec_decode_acceptance_length" in result:
        lines.append("Speculative Decoding".center(BANNER_WIDTH, "-"))
        lines.append(_line("Acceptance rate (%):", float(result["spec_decode_acceptance_rate"])))
        lines.append(_line("Acceptance length:", float(result["spec_decode_acceptance_length"])))
        lines.append(_line("Drafts:", result["spec_decode_num_drafts"]))
        lines.append(_line("Draft tokens:", result["spec_decode_draft_tokens"]))
        lines.append(_line("Accepted tokens:", result["spec_decode_accepted_tokens"]))
        lines.append("Per-position acceptance (%):")
        for position, rate in enumerate(result["spec_decode_per_position_acceptance_rates"]):
            lines.append(_line(f"  Position {position}:", float(rate)))
    lines.append("=" * BANNER_WIDTH)
    return "\n".join(lines)


def format_errors(errors: list[str], limit: int = 5) -> str:
    """The distinct errors of failed requests, most frequent first, with their counts."""
    counts = Counter(error for error in errors if error)
    lines = [f"Failed requests by error ({len(counts)} distinct):"]
    lines += [f"  {count} x {error}" for error, count in counts.most_common(limit)]
    if len(counts) > limit:
        lines.append(f"  ... and {len(counts) - limit} more")
    return "\n".join(lines)


@dataclass(frozen=True)
class SweepRow:
    """One concurrency level of a sweep, in the units of the table."""

    concurrency: int
    completed: int
    failed: int
    output_throughput: float
    total_token_throughput: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    tpot_p50_ms: float
    tpot_p99_ms: float


def usd_per_1k_tokens(tokens_per_s: float, gpu_hourly_usd: float, num_gpus: int) -> float:
    """What 1000 tokens cost when `num_gpus` GPUs at `gpu_hourly_usd` each produce `tokens_per_s` (inf if none)."""
    if tokens_per_s <= 0:
        return float("inf")
    return gpu_hourly_usd * num_gpus / SECONDS_PER_HOUR / tokens_per_s * 1000.0


def _usd(value: float) -> str:
    return "n/a" if value == float("inf") else f"USD {value:.4f}"


def sweep_table(rows: list[SweepRow], gpu_hourly_usd: float | None = None, num_gpus: int = 1) -> str:
    """A markdown table of a concurrency sweep; with a GPU price, two cost columns and a line saying what they count."""
    header = [
        "Concurrency",
        "Successful",
        "Failed",
        "Output tok/s",
        "Total tok/s",
        "TTFT p50 (ms)",
        "TTFT p99 (ms)",
        "TPOT p50 (ms)",
        "TPOT p99 (ms)",
    ]
    if gpu_hourly_usd is not None:
        header += ["USD/1K output tokens", "USD/1K total tokens"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [
            str(row.concurrency),
            str(row.completed),
            str(row.failed),
            f"{row.output_throughput:.2f}",
            f"{row.total_token_throughput:.2f}",
            f"{row.ttft_p50_ms:.2f}",
            f"{row.ttft_p99_ms:.2f}",
            f"{row.tpot_p50_ms:.2f}",
            f"{row.tpot_p99_ms:.2f}",
        ]
        if gpu_hourly_usd is not None:
            cells.append(_usd(usd_per_1k_tokens(row.output_throughput, gpu_hourly_usd, num_gpus)))
            cells.append(_usd(usd_per_1k_tokens(row.total_token_throughput, gpu_hourly_usd, num_gpus)))
        lines.append("| " + " | ".join(cells) + " |")
    if gpu_hourly_usd is not None:
        lines.append(
            f"\nCost = {num_gpus} GPU x USD {gpu_hourly_usd:.2f}/h / throughput. Output tokens are the generated "
            "tokens (output token throughput); total tokens are prompt + generated (total token throughput)."
        )
    return "\n".join(lines)


def plot_sweep(rows: list[SweepRow], path: str) -> None:
    """Save a PNG: throughput (output, total) and latency (TTFT, TPOT p50/p99) against concurrency."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("--plot needs matplotlib: pip install 'dsv32[plot]'") from None
    matplotlib.use("Agg")  # files only: no display on servers
    from matplotlib import pyplot

    levels = [row.concurrency for row in rows]
    figure, (throughput, latency) = pyplot.subplots(1, 2, figsize=(11, 4.2))
    throughput.plot(levels, [r.output_throughput for r in rows], "o-", label="output tok/s")
    throughput.plot(levels, [r.total_token_throughput for r in rows], "s-", label="total tok/s")
    throughput.set(title="Throughput", xlabel="concurrency", ylabel="tokens/s")
    latency.plot(levels, [r.ttft_p50_ms for r in rows], "o-", label="TTFT p50")
    latency.plot(levels, [r.ttft_p99_ms for r in rows], "o--", label="TTFT p99")
    latency.plot(levels, [r.tpot_p50_ms for r in rows], "s-", label="TPOT p50")
    latency.plot(levels, [r.tpot_p99_ms for r in rows], "s--", label="TPOT p99")
    latency.set(title="Latency", xlabel="concurrency", ylabel="ms")
    for axes in (throughput, latency):
        if len(set(levels)) > 1 and min(levels) > 0:
            axes.set_xscale("log", base=2)
        axes.set_xticks(levels, [str(level) for level in levels])
        axes.grid(True, alpha=0.3)
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot.close(figure)
