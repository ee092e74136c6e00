"""A long mixed load against `dsv32 serve`: normal requests, client cancels and hostile bodies, all at once.

usage: python benchmarks/fuzz_soak.py [--url http://127.0.0.1:8000 --engine-pid N] [--requests 5000]
       [--concurrency 32] [--seed 0] [--cancel-fraction 0.1] [--hostile-fraction 0.1] [--json-out FILE]

Without --url it starts the built-in tiny model itself (`dsv32 serve` with the test suite's small limits) and stops
it at the end. The plan is drawn from --seed before anything is sent, so a run can be repeated exactly:

* --cancel-fraction: a streamed chat completion the client drops mid-stream (after 0-3 events, or before headers);
* --hostile-fraction: a body drawn from tests/server/hostile.py (the generators test_adversarial.py sends one by one:
  lone surrogates, control characters, deep JSON, malformed structured outputs, non-finite and huge numbers,
  duplicate keys), judged by the same contract (2xx/4xx, OpenAI error envelope, in time);
* the rest: small chat and completions requests (streamed or not, max_tokens 1-8), each of which must be a 200
  (a stream must end with [DONE]).

Reported: counts by kind and status, lost requests (no answer within --timeout, or the connection failed), broken
contracts, the engine-core process's RSS before and after (its pid is in the server's log line "engine core process
N started"), whether the engine is idle again at the end (vllm:num_requests_running / _waiting and
vllm:kv_cache_usage_perc back at 0: no leaked request or KV block), whether the server still answers, and the total
time. The exit status is 1 when anything was lost, broken or leaked.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.server import hostile  # noqa: E402  (shared with tests/server/test_adversarial.py)

SERVE_ARGS = ("--max-model-len", "1024", "--max-num-batched-tokens", "512", "--dtype", "float32")
IDLE_KEYS = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")


@dataclass
class Planned:
    kind: str  # "normal", "cancel" or "hostile"
    path: str
    body: bytes
    stream: bool = False
    case: hostile.Hostile | None = None
    cancel_after: int = 0  # events read before a cancel drops the connection (-1: before the headers)


@dataclass
class Tally:
    statuses: Counter = field(default_factory=Counter)  # (kind, status or outcome) -> count
    lost: list[str] = field(default_factory=list)
    broken: Counter = field(default_factory=Counter)  # one line per distinct broken contract -> count
    latencies: list[float] = field(default_factory=list)


def plan(args: argparse.Namespace) -> list[Planned]:
    rng = random.Random(args.seed)
    pool = hostile.all_small_cases()
    planned: list[Planned] = []
    for _ in range(args.requests):
        roll = rng.random()
        if roll < args.cancel_fraction:
            body = hostile.chat_body("Tell me a story.", max_tokens=200, ignore_eos=True, stream=True)
            planned.append(Planned("cancel", hostile.CHAT, hostile.encode(body), True,
                                   cancel_after=rng.choice((-1, 0, 1, 2, 3))))
        elif roll < args.cancel_fraction + args.hostile_fraction:
            case = hostile.random_hostile(rng, pool)
            planned.append(Planned("hostile", case.path, case.body, case=case))
        else:
            stream = rng.random() < 0.5
            max_tokens = rng.randint(1, args.max_tokens)
            if rng.random() < 0.5:
                body = hostile.chat_body(rng.choice(("Hello", "What is 2+2?", "Name a colour.")), max_tokens,
                                         stream=stream)
                path = hostile.CHAT
            else:
                body = hostile.completion_body(rng.choice(("Once upon", "The capital of", "1, 2, 3,")), max_tokens,
                                               stream=stream)
                path = hostile.COMPLETIONS
            planned.append(Planned("normal", path, hostile.encode(body), stream))
    return planned


async def send(client: httpx.AsyncClient, item: Planned, args: argparse.Namespace, tally: Tally) -> None:
    started = time.monotonic()
    label = item.case.short() if item.case else f"{item.kind} POST {item.path}{' (stream)' if item.stream else ''}"
    try:
        async with asyncio.timeout(args.timeout):
            if item.kind == "cancel" and item.cancel_after < 0:
                task = asyncio.ensure_future(client.post(item.path, content=item.body))
                await asyncio.sleep(0.05)
                task.cancel()
                tally.statuses[(item.kind, "dropped before headers")] += 1
                return
            async with client.stream("POST", item.path, content=item.body) as response:
                if item.kind == "cancel":
                    events = 0
                    async for line in response.aiter_lines():
                        if line.startswith("data: "):
                            events += 1
                            if events > item.cancel_after:
                                break
                    tally.statuses[(item.kind, f"{response.status_code}, dropped mid-stream")] += 1
                    return
                body = await response.aread()
                status = response.status_code
    except TimeoutError:
        tally.lost.append(f"{label}: no answer within {args.timeout:.0f}s")
        tally.statuses[(item.kind, "lost: timeout")] += 1
        return
    except httpx.HTTPError as exc:
        tally.lost.append(f"{label}: {type(exc).__name__}: {exc}")
        tally.statuses[(item.kind, f"lost: {type(exc).__name__}")] += 1
        return
    elapsed = time.monotonic() - started
    tally.latencies.append(elapsed)
    tally.statuses[(item.kind, status)] += 1
    if item.kind == "hostile":
        assert item.case is not None
        # Under load, time limits stretch: only the status and the envelope are judged here.
        relaxed = hostile.Hostile(item.case.label, item.case.path, item.case.body, item.case.expect,
                                  item.case.status, item.case.field, max_seconds=args.timeout)
        problem = hostile.contract_violation(relaxed, status, body, elapsed)
        if problem:
            tally.broken[f"{item.case.short()} -> {problem[:200]}"] += 1
    elif status != 200:
        tally.broken[f"{label} -> {status}: {body[:200].decode(errors='replace')}"] += 1
    elif item.stream and b"data: [DONE]" not in body:
        tally.broken[f"{label} -> 200 stream without data: [DONE]"] += 1


async def soak(args: argparse.Namespace, base_url: str, planned: list[Planned]) -> Tally:
    tally = Tally()
    headers = {"Content-Type": "application/json"}
    if args.api_key:
        headers["Authorization"] = f"Bearer {args.api_key}"
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    queue: asyncio.Queue[Planned] = asyncio.Queue()
    for item in planned:
        queue.put_nowait(item)
    done = 0

    async with httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits, timeout=None) as client:
        async def worker() -> None:
            nonlocal done
            while not queue.empty():
                item = queue.get_nowait()
                await send(client, item, args, tally)
                done += 1
                if args.progress and done % max(1, len(planned) // 20) == 0:
                    print(f"  {done}/{len(planned)} sent, {len(tally.lost)} lost, {sum(tally.broken.values())} "
                          "broken", flush=True)

        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    return tally


# --------------------------------------------------------------------------------------------------------------------
# The server: started here, or given
# --------------------------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(log_path: Path, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("DSV32_API_KEY", None)
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "dsv32.cli", "serve", "--port", str(port), *SERVE_ARGS,
                                    *extra], stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        if process.poll() is not None:
            raise SystemExit(f"dsv32 serve exited with {process.returncode}; log: {log_path}")
        try:
            if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                return process, base_url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"dsv32 serve did not become healthy; log: {log_path}")
        time.sleep(0.3)


def engine_pid_from_log(log_path: Path) -> int | None:
    found = re.search(r"engine core process (\d+) started", log_path.read_text(errors="replace"))
    return int(found.group(1)) if found else None


def rss_mib(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def gauges(base_url: str) -> dict[str, float] | None:
    try:
        text = httpx.get(f"{base_url}/metrics", timeout=10).text
    except httpx.HTTPError:
        return None
    values: dict[str, float] = {}
    for line in text.splitlines():
        for key in IDLE_KEYS:
            if line.startswith(key + "{") or line.startswith(key + " "):
                values[key] = values.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return values


def wait_idle(base_url: str, timeout_s: float) -> dict[str, float] | None:
    deadline = time.monotonic() + timeout_s
    while True:
        values = gauges(base_url)
        if values is not None and all(v == 0.0 for v in values.values()):
            return values
        if time.monotonic() > deadline:
            return values
        time.sleep(0.5)


def still_serves(base_url: str, api_key: str | None) -> str | None:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        health = httpx.get(f"{base_url}/health", timeout=5)
        chat = httpx.post(f"{base_url}{hostile.CHAT}", json=hostile.chat_body(), headers=headers, timeout=30)
    except httpx.HTTPError as exc:
        return f"does not answer: {type(exc).__name__}"
    if health.status_code != 200 or chat.status_code != 200:
        return f"/health -> {health.status_code}, a plain chat completion -> {chat.status_code}"
    return None


# --------------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=None, help="A running server (default: start the tiny model here).")
    parser.add_argument("--engine-pid", type=int, default=None, help="With --url: its engine-core pid, for RSS.")
    parser.add_argument("--api-key", default=None, help="Bearer key (a started server gets this key too).")
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cancel-fraction", type=float, default=0.1)
    parser.add_argument("--hostile-fraction", type=float, default=0.1)
    parser.add_argument("--max-tokens", type=int, default=8, help="Most tokens a normal request asks for.")
    parser.add_argument("--timeout", type=float, default=60.0, help="Seconds before a request counts as lost.")
    parser.add_argument("--idle-timeout", type=float, default=60.0,
                        help="Seconds the engine gets to be idle again after the last request.")
    parser.add_argument("--json-out", type=Path, default=None, help="Also write the report here as JSON.")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)

    process = None
    log_path = None
    if args.url is None:
        log_path = Path(tempfile.mkdtemp(prefix="fuzz-soak-")) / "server.log"
        extra = ["--api-key", args.api_key] if args.api_key else []
        process, base_url = start_server(log_path, extra)
        engine_pid = engine_pid_from_log(log_path)
        print(f"started dsv32 serve at {base_url} (engine core pid {engine_pid}; log {log_path})", flush=True)
    else:
        base_url, engine_pid = args.url.rstrip("/"), args.engine_pid

    try:
        planned = plan(args)
        kinds = Counter(item.kind for item in planned)
        print(f"plan: {len(planned)} requests (seed {args.seed}): {dict(kinds)}; concurrency {args.concurrency}",
              flush=True)
        rss_before = rss_mib(engine_pid)
        started = time.monotonic()
        tally = asyncio.run(soak(args, base_url, planned))
        total_s = time.monotonic() - started
        idle = wait_idle(base_url, args.idle_timeout)
        rss_after = rss_mib(engine_pid)
        alive = still_serves(base_url, args.api_key)
    finally:
        if process is not None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    leaked = idle is None or any(v != 0.0 for v in idle.values())
    report = {
        "requests": len(planned), "concurrency": args.concurrency, "seed": args.seed, "total_s": round(total_s, 1),
        "by_kind_and_status": {f"{kind} {status}": n for (kind, status), n in sorted(tally.statuses.items(),
                                                                                       key=lambda kv: str(kv[0]))},
        "lost": len(tally.lost), "lost_examples": tally.lost[:20],
        "broken_contracts": sum(tally.broken.values()),
        "broken_distinct": [f"{n}x {line}" for line, n in tally.broken.most_common(40)],
        "engine_pid": engine_pid,
        "engine_rss_mib_before": None if rss_before is None else round(rss_before, 1),
        "engine_rss_mib_after": None if rss_after is None else round(rss_after, 1),
        "idle_at_end": idle, "leaked": leaked,
        "still_serves": alive or "yes",
        "latency_p50_s": round(sorted(tally.latencies)[len(tally.latencies) // 2], 3) if tally.latencies else None,
        "server_log": str(log_path) if log_path else None,
    }
    print(f"\n== fuzz soak: {len(planned)} requests at concurrency {args.concurrency} in {total_s:.1f}s ==")
    for key, n in report["by_kind_and_status"].items():
        print(f"  {key:<45} {n}")
    print(f"lost (no answer within {args.timeout:.0f}s or connection failed): {len(tally.lost)}")
    for line in tally.lost[:10]:
        print(f"  {line}")
    print(f"broken contracts: {report['broken_contracts']} ({len(tally.broken)} distinct)")
    for line in report["broken_distinct"]:
        print(f"  {line}")
    print(f"engine core RSS: {report['engine_rss_mib_before']} MiB before, {report['engine_rss_mib_after']} MiB after")
    print(f"engine idle at the end ({', '.join(IDLE_KEYS)} back at 0): {'no' if leaked else 'yes'} {idle}")
    print(f"server still serves: {report['still_serves']}")
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=2, default=str))
    failed = tally.lost or tally.broken or leaked or alive is not None
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
