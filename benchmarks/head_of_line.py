"""Head-of-line stalls: do streaming decodes keep flowing while a long prompt prefills?

Starts ``dsv32 serve`` (tiny model, random weights) as a subprocess, starts ``--streams`` streaming chat completions
that decode for a long time (``ignore_eos``), then sends one long token-id prompt (``/v1/completions``, ``max_tokens``
1) and records every token arrival of the streams. Reports the max / p99 inter-token gap of the streams before,
during and after the long prefill, and the long prompt's time to first token (TTFT). Then sends a second long prompt
(other tokens: no prefix-cache hit), drops its connection mid-prefill and measures how long the engine keeps working
on it: the time from the disconnect until ``vllm:num_requests_running`` falls back to the streams alone, and the
first stream gap that ends after the disconnect. Saves a PNG of the gaps over time and a JSON of the numbers.

    .venv/bin/python benchmarks/head_of_line.py --prompt-tokens 65536 --out /tmp/hol
    .venv/bin/python benchmarks/head_of_line.py --source /path/to/other/checkout   # e.g. the code before a change

``--source`` runs the server from another checkout of the package (``PYTHONPATH``), with this venv.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.server.conftest import wait_until_healthy  # noqa: E402  (the test suite's server start-up wait)

PHASES = ("before", "during", "after")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


class Stream(threading.Thread):
    """One streaming chat completion; ``arrivals``: monotonic time of every content chunk."""

    def __init__(self, base: str, index: int, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.base, self.index, self.max_tokens = base, index, max_tokens
        self.arrivals: list[float] = []
        self.stop = threading.Event()
        self.error: str | None = None

    def run(self) -> None:
        prompt = f"Tell me a long story, number {self.index}."
        body = {"model": "tiny", "messages": [{"role": "user", "content": prompt}],
                "max_tokens": self.max_tokens, "stream": True, "ignore_eos": True, "temperature": 1.0}
        try:
            with httpx.Client(timeout=None) as client, client.stream("POST", f"{self.base}/v1/chat/completions",
                                                                     json=body) as response:
                for line in response.iter_lines():
                    if self.stop.is_set():
                        return
                    if line.startswith("data: {") and '"content"' in line:
                        self.arrivals.append(time.monotonic())
        except Exception as e:  # noqa: BLE001 - reported in the results
            self.error = repr(e)


def running_requests(client: httpx.Client, base: str) -> float | None:
    try:
        text = client.get(f"{base}/metrics", timeout=5).text
    except httpx.HTTPError:
        return None
    match = re.search(r"^vllm:num_requests_running(?:\{[^}]*\})? ([0-9.eE+-]+)$", text, re.M)
    return float(match.group(1)) if match else None


def long_prompt(num_tokens: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000, 100_000) for _ in range(num_tokens)]


def start_server(args: argparse.Namespace, log_path: Path) -> subprocess.Popen:
    env = dict(os.environ)
    if args.source:
        env["PYTHONPATH"] = str(Path(args.source).resolve()) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "dsv32.cli", "serve", "--port", str(args.port),
           "--max-model-len", str(args.max_model_len), *args.server_args]
    log = log_path.open("w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=args.source or None)
    if wait_until_healthy(proc, f"http://127.0.0.1:{args.port}", 300):
        return proc
    proc.kill()
    raise RuntimeError(f"server did not become healthy (exit code {proc.poll()}); see {log_path}")


def gaps_in(streams: list[Stream], start: float, end: float) -> list[float]:
    """Inter-token gaps of every stream whose later token arrived in ``[start, end)``."""
    out = []
    for s in streams:
        out += [b - a for a, b in zip(s.arrivals, s.arrivals[1:], strict=False) if start <= b < end]
    return out


def run_once(args: argparse.Namespace, out_dir: Path, tag: str) -> dict:
    proc = start_server(args, out_dir / f"server_{tag}.log")
    base = f"http://127.0.0.1:{args.port}"
    try:
        streams = [Stream(base, i, args.stream_max_tokens) for i in range(args.streams)]
        for s in streams:
            s.start()
        while any(len(s.arrivals) < 5 for s in streams):  # the streams are decoding
            time.sleep(0.05)
        t0 = time.monotonic()
        time.sleep(args.phase_s)

        # The long prompt, streamed so its first token marks the end of its prefill.
        body = {"model": "tiny", "prompt": long_prompt(args.prompt_tokens, seed=1), "max_tokens": 1, "stream": True,
                "ignore_eos": True}
        t_send = time.monotonic()
        t_first = None
        with httpx.Client(timeout=None) as client, client.stream("POST", f"{base}/v1/completions",
                                                                 json=body) as response:
            for line in response.iter_lines():
                if line.startswith("data: {") and t_first is None:
                    t_first = time.monotonic()
        t_done = time.monotonic()
        time.sleep(args.phase_s)
        t_after = time.monotonic()

        # Abort: a second long prompt (other tokens), dropped mid-prefill.
        abort = {}
        body["prompt"] = long_prompt(args.prompt_tokens, seed=2)
        with httpx.Client(timeout=None) as metrics:
            baseline_running = running_requests(metrics, base)

            def send_and_drop() -> None:
                try:
                    with httpx.Client(timeout=httpx.Timeout(None, read=args.abort_after_s)) as client, \
                            client.stream("POST", f"{base}/v1/completions", json=body) as response:
                        for _ in response.iter_lines():
                            pass
                except httpx.ReadTimeout:
                    pass  # the client gives up (closes its connection) mid-prefill

            sender = threading.Thread(target=send_and_drop, daemon=True)
            t_abort_send = time.monotonic()
            sender.start()
            # Wait until the engine runs it, then until the client drops it.
            while running_requests(metrics, base) == baseline_running and time.monotonic() - t_abort_send < 30:
                time.sleep(0.05)
            sender.join()
            t_disconnect = time.monotonic()
            stopped = None
            while time.monotonic() - t_disconnect < 600:
                if running_requests(metrics, base) == baseline_running:
                    stopped = time.monotonic()
                    break
                time.sleep(0.02)
            abort["disconnect_to_stopped_s"] = None if stopped is None else stopped - t_disconnect
            next_tokens = [a for s in streams for a in s.arrivals if a > t_disconnect]
            abort["disconnect_to_next_stream_token_s"] = min(next_tokens) - t_disconnect if next_tokens else None
            abort["max_gap_after_disconnect_s"] = max(gaps_in(streams, t_disconnect, t_disconnect + 5), default=None)
        time.sleep(1)
        t_end = time.monotonic()
        for s in streams:
            s.stop.set()

        result = {"tag": tag, "prompt_tokens": args.prompt_tokens, "ttft_s": (t_first or t_done) - t_send,
                  "stream_errors": [s.error for s in streams if s.error], "abort": abort}
        windows = {"before": (t0, t_send), "during": (t_send, t_done), "after": (t_done, t_after)}
        for phase, (start, end) in windows.items():
            gaps = gaps_in(streams, start, end)
            result[phase] = {"n": len(gaps), "max_s": max(gaps, default=float("nan")),
                             "p99_s": percentile(gaps, 99), "p50_s": percentile(gaps, 50)}
        series = [(b - t0, b - a) for s in streams for a, b in zip(s.arrivals, s.arrivals[1:], strict=False)
                  if t0 <= b < t_end]
        result["marks"] = {"send": t_send - t0, "first_token": (t_first or t_done) - t0, "after_end": t_after - t0,
                           "abort_send": t_abort_send - t0, "disconnect": t_disconnect - t0}
        (out_dir / f"gaps_{tag}.json").write_text(json.dumps({"series": series, "result": result}))
        plot(series, result, out_dir / f"gaps_{tag}.png")
        return result
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def plot(series: list[tuple[float, float]], result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4))
    if series:
        xs, ys = zip(*series, strict=True)
        ax.scatter(xs, ys, s=4)
    marks = result["marks"]
    ax.axvspan(marks["send"], marks["first_token"], color="orange", alpha=0.2, label="long prefill")
    ax.axvline(marks["disconnect"], color="red", linestyle="--", label="2nd long prompt dropped")
    ax.set_yscale("log")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("inter-token gap of the streams (s)")
    ax.set_title(f"{result['tag']}: {result['prompt_tokens']}-token prompt, TTFT {result['ttft_s']:.1f} s, "
                 f"max gap during {result['during']['max_s']:.2f} s")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-tokens", type=int, default=65536)
    parser.add_argument("--max-model-len", type=int, default=70000)
    parser.add_argument("--streams", type=int, default=2)
    parser.add_argument("--stream-max-tokens", type=int, default=4000)
    parser.add_argument("--phase-s", type=float, default=10.0, help="seconds measured before and after the prefill")
    parser.add_argument("--abort-after-s", type=float, default=15.0,
                        help="the second long prompt's client disconnects after this long without a token")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--source", default=None, help="checkout whose dsv32 package the server runs")
    parser.add_argument("--tag", default="run")
    parser.add_argument("--out", default="head_of_line_out")
    parser.add_argument("server_args", nargs="*", help="extra `dsv32 serve` arguments (after --)")
    args = parser.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for i in range(args.runs):
        result = run_once(args, out_dir, f"{args.tag}{i}")
        results.append(result)
        print(json.dumps({k: v for k, v in result.items() if k != "marks"}), flush=True)
    (out_dir / f"results_{args.tag}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
