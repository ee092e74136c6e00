"""Reusable test helpers: run `bench serve` against any base URL (the fake server here, `dsv32 serve` later)."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from dsv32.bench import serve


def bench_args(base_url: str, *flags: str) -> argparse.Namespace:
    """Parse `bench serve` flags as the CLI would, with a small, quiet default workload."""
    parser = argparse.ArgumentParser()
    serve.add_bench_serve_arguments(parser)
    defaults = ["--num-prompts", "6", "--random-input-len", "16", "--random-output-len", "4", "--disable-tqdm"]
    return parser.parse_args(["--base-url", base_url, *defaults, *flags])


def run_bench(base_url: str, *flags: str) -> list[dict[str, Any]]:
    """Run the benchmark and return each run's full result dict (one per concurrency level)."""
    args = bench_args(base_url, *flags)
    serve.validate_args(args)
    return [run.result for run in asyncio.run(serve.benchmark(args))]
