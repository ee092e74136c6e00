"""Issue 25's acceptance check of the demo model, run as the issue states it, on held-out numbers and cities.

1. `dsv32 serve` with no model argument (the packaged demo model) and `--speculative-config '{"method": "mtp",
   "num_speculative_tokens": 1}'` is ready (GET /health answers 200) within 4 minutes;
2. ten "What is A + B?" (A, B two-digit, held out of training), thinking on, temperature 0, max_tokens 256: the sum
   appears in the content, >= 8 of 10;
3. five "What's the weather like in CITY?" (cities never seen in training), tools exactly `get_weather` and
   `calculator`, no `tool_choice`, temperature 0, max_tokens 96: the first tool call is `get_weather` with
   `{"city": CITY}`, >= 4 of 5;
4. over those requests, `vllm:spec_decode_num_accepted_tokens / vllm:spec_decode_num_draft_tokens` in `/metrics`
   >= 0.30.

The prompts and their scoring are `dsv32 eval demo`'s (`dsv32.eval.demo`); `--seed` picks other held-out draws.
Prints a markdown report (and writes it with --output); exit status 0 when every criterion passes, 1 otherwise.

usage: python benchmarks/demo_acceptance.py [--model DIR] [--seed 0] [--output FILE.md]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from datetime import datetime
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.serving import (  # noqa: E402  (the repository root, not benchmarks/, holds the package)
    RunningServer,
    ServerSpec,
    checkout_description,
    clean_env,
    free_port,
    machine_description,
)
from dsv32.eval.demo import Record, arithmetic_cases, evaluate, tools_cases  # noqa: E402

READY_LIMIT_S = 240.0
SPEC_CONFIG = json.dumps({"method": "mtp", "num_speculative_tokens": 1})


def spec_decode_counts(metrics_text: str) -> tuple[float, float]:
    """(accepted, drafted) tokens from a Prometheus exposition of vLLM's speculative-decoding counters."""
    values = {"vllm:spec_decode_num_accepted_tokens": 0.0, "vllm:spec_decode_num_draft_tokens": 0.0}
    for line in metrics_text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0].removesuffix("_total")
        if name in values:
            values[name] += float(line.rsplit(" ", 1)[1])
    return values["vllm:spec_decode_num_accepted_tokens"], values["vllm:spec_decode_num_draft_tokens"]


def hits(records: list[Record]) -> int:
    return sum(record.scores["correct"] for record in records)


def report(header: str, ready_s: float, arithmetic: list[Record], tools: list[Record], accepted: float,
           drafted: float) -> tuple[str, bool]:
    """The markdown report (under ``header``, the run's line) and whether every criterion passed."""
    rate = accepted / drafted if drafted else 0.0
    criteria = [
        ("ready within 4 minutes", f"{ready_s:.0f} s", ready_s <= READY_LIMIT_S),
        ("sum in the content, >= 8 of 10", f"{hits(arithmetic)} of {len(arithmetic)}", hits(arithmetic) >= 8),
        ("first call get_weather {city}, >= 4 of 5", f"{hits(tools)} of {len(tools)}", hits(tools) >= 4),
        ("accepted / drafted tokens >= 0.30", f"{accepted:.0f} / {drafted:.0f} = {rate:.2f}", rate >= 0.30),
    ]
    lines = [header, "", "| criterion | measured | pass |", "|---|---|---|"]
    lines += [f"| {name} | {measured} | {'yes' if passed else '**no**'} |" for name, measured, passed in criteria]
    lines += ["", "| prompt | answer (content, or the first tool call) | right |", "|---|---|---|"]
    for record in arithmetic + tools:
        message = record.message
        calls = message.get("tool_calls") or []
        shown = (f"{calls[0]['function']['name']}({calls[0]['function']['arguments']})" if calls
                 else (message.get("content") or "").strip())
        question = record.case.request["messages"][-1]["content"]
        lines.append(f"| {question} | {shown[:120].replace('|', '/').replace(chr(10), ' ')} | "
                     f"{'yes' if record.scores['correct'] else 'no'} |")
    return "\n".join(lines) + "\n", all(passed for _, _, passed in criteria)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a checkpoint folder to serve instead of the packaged demo model")
    parser.add_argument("--seed", type=int, default=0, help="which held-out numbers and cities (dsv32 eval demo's)")
    parser.add_argument("--output", type=Path, help="also write the report here")
    parser.add_argument("--log", type=Path, default=Path("/tmp/dsv32_demo_acceptance.log"), help="the server's log")
    args = parser.parse_args(argv)
    port = free_port()
    command = [sys.executable, "-m", "dsv32.cli", "serve", *([args.model] if args.model else []),
               "--port", str(port), "--speculative-config", SPEC_CONFIG]
    start = time.monotonic()
    with RunningServer(ServerSpec("dsv32", command, clean_env()), port, args.log):
        ready_s = time.monotonic() - start
        root = f"http://127.0.0.1:{port}"
        arithmetic = asyncio.run(evaluate(root, None, arithmetic_cases(10, args.seed), args.seed)).records
        tools = asyncio.run(evaluate(root, None, tools_cases(5, args.seed), args.seed)).records
        accepted, drafted = spec_decode_counts(httpx.get(f"{root}/metrics", timeout=30).text)
    header = (f"{datetime.now():%Y-%m-%d %H:%M}, {machine_description(2)}, dsv32 {checkout_description()}, "
              f"model {args.model or 'demo (packaged)'}, held-out draw seed {args.seed}.")
    text, passed = report(header, ready_s, arithmetic, tools, accepted, drafted)
    print(text)
    if args.output:
        args.output.write_text(text)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
