"""`dsv32 run-batch`: the OpenAI batch format in and out, per-line errors, input order, resume, and a full batch."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI

from dsv32.server.run_batch import parse_line, read_input, run_batch

CHAT = "/v1/chat/completions"


def request(custom_id: str, url: str = CHAT, **body: Any) -> str:
    if url == CHAT:
        body.setdefault("messages", [{"role": "user", "content": f"say {custom_id}"}])
    else:
        body.setdefault("prompt", f"say {custom_id}")
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": {"model": "tiny", **body}})


def results(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize(("line", "param", "words"), [
    ("{not json", None, "invalid JSON"),
    ("[1, 2]", None, "JSON object"),
    ('{"method": "POST", "url": "/v1/completions", "body": {}}', "custom_id", "custom_id"),
    ('{"custom_id": "x", "method": "GET", "url": "/v1/completions", "body": {}}', "method", "POST"),
    ('{"custom_id": "x", "method": "POST", "url": "/v1/embeddings", "body": {}}', "url", "/v1/embeddings"),
    ('{"custom_id": "x", "method": "POST", "url": "/v1/completions"}', "body", "body"),
    ('{"custom_id": "x", "method": "POST", "url": "/v1/completions", "body": {"stream": true}}', "body.stream",
     "streaming"),
])
def test_a_bad_line_is_refused_with_a_clear_error(line: str, param: str | None, words: str) -> None:
    parsed = parse_line(7, line)
    assert parsed.error is not None and parsed.body is None
    assert parsed.error.status_code == 400 and parsed.error.param == param
    assert parsed.error.message.startswith("line 7: ") and words in parsed.error.message


def test_a_repeated_custom_id_is_refused_after_its_first_use(tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join([request("a"), "", request("a"), request("b")]) + "\n")
    lines = read_input(source)
    assert [(line.line_number, line.custom_id, line.error is None) for line in lines] == [
        (1, "a", True), (3, "a", False), (4, "b", True)]
    assert "unique" in lines[1].error.message  # type: ignore[union-attr]


def counting_app() -> tuple[FastAPI, dict[str, int]]:
    """Answers after a short wait, recording how many requests were in flight at once."""
    app = FastAPI()
    seen = {"now": 0, "peak": 0, "calls": 0}

    @app.post("/v1/completions")
    async def complete(body: dict[str, Any]) -> dict[str, Any]:
        seen["now"] += 1
        seen["calls"] += 1
        seen["peak"] = max(seen["peak"], seen["now"])
        await asyncio.sleep(0.05)
        seen["now"] -= 1
        return {"echo": body["prompt"]}

    return app, seen


def test_requests_run_concurrently_up_to_the_limit_and_come_back_in_input_order(tmp_path: Path) -> None:
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("\n".join(request(f"r{i}", "/v1/completions") for i in range(20)) + "\n")
    app, seen = counting_app()
    summary = asyncio.run(run_batch(app, read_input(source), output, max_in_flight=8, progress=False))
    assert seen["peak"] == 8  # a full batch, never more than allowed
    assert (summary.succeeded, summary.failed, summary.skipped) == (20, 0, 0)
    lines = results(output)
    assert [line["custom_id"] for line in lines] == [f"r{i}" for i in range(20)]
    assert [line["response"]["body"]["echo"] for line in lines] == [f"say r{i}" for i in range(20)]


def test_resume_skips_what_is_done_and_reruns_what_failed(tmp_path: Path) -> None:
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("\n".join(request(c, "/v1/completions") for c in "abcd") + "\n")
    done_b = {"id": "batch_req_old", "custom_id": "b", "error": None,
              "response": {"status_code": 200, "request_id": "cmpl-old", "body": {"echo": "from before"}}}
    failed_d = {"id": "batch_req_failed", "custom_id": "d", "error": {"error": {"message": "overloaded"}},
                "response": {"status_code": 503, "request_id": "cmpl-failed", "body": None}}
    output.write_text(json.dumps(done_b) + "\n" + json.dumps(failed_d) + "\n" + '{"custom_id": "c", "resp')
    app, seen = counting_app()
    summary = asyncio.run(run_batch(app, read_input(source), output, max_in_flight=4, progress=False))
    assert seen["calls"] == 3 and summary.skipped == 1 and summary.succeeded == 4
    lines = results(output)
    assert [line["custom_id"] for line in lines] == ["a", "b", "c", "d"]
    assert lines[1] == done_b  # kept as it was
    assert lines[3]["error"] is None and lines[3]["response"]["body"] == {"echo": "say d"}


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dsv32.cli", "run-batch", "--model", "tiny", *args, "--max-model-len", "1024",
                           "--dtype", "float32"], capture_output=True, text=True, timeout=300)


@pytest.mark.e2e
def test_run_batch_through_the_tiny_model(tmp_path: Path) -> None:
    source, output = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    lines = [request("chat-1", max_tokens=4), "oops", request("text-1", "/v1/completions", max_tokens=3),
             request("wrong-model", model="nope"), request("chat-2", max_tokens=2, n=2),
             request("too-long", "/v1/completions", max_tokens=5000)]
    source.write_text("\n".join(lines) + "\n")
    done = run_cli("-i", str(source), "-o", str(output))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Running batch" in done.stderr and "100%" in done.stderr  # the progress bar
    assert "6 requests: 3 succeeded, 3 failed, 0 already done" in done.stdout
    out = results(output)
    assert [line["custom_id"] for line in out] == ["chat-1", None, "text-1", "wrong-model", "chat-2", "too-long"]
    chat = out[0]["response"]
    assert chat["status_code"] == 200 and chat["body"]["object"] == "chat.completion"
    assert chat["request_id"] == chat["body"]["id"] and chat["body"]["usage"]["completion_tokens"] <= 4
    assert out[2]["response"]["body"]["object"] == "text_completion"
    assert len(out[4]["response"]["body"]["choices"]) == 2
    assert all(line["id"].startswith("batch_req_") for line in out)
    status = [(line["response"]["status_code"], line["error"] is None) for line in out]
    assert status == [(200, True), (400, False), (200, True), (404, False), (200, True), (400, False)]
    assert out[3]["response"]["body"] is None and out[3]["error"]["error"]["param"] == "model"
    assert "maximum context length" in out[5]["error"]["error"]["message"]

    # A rerun with one more request runs only that one; the earlier answers stay as they were.
    source.write_text("\n".join([*lines, request("chat-3", max_tokens=2)]) + "\n")
    again = run_cli("-i", str(source), "-o", str(output), "--no-progress")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "7 requests: 4 succeeded, 3 failed, 3 already done" in again.stdout
    rerun = results(output)
    assert [line["custom_id"] for line in rerun][-1] == "chat-3"
    assert [rerun[i] for i in (0, 2, 4)] == [out[i] for i in (0, 2, 4)]


@pytest.mark.e2e
def test_unreadable_input_is_a_one_line_error(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "dsv32.cli", "run-batch", "-i", str(tmp_path / "missing.jsonl"),
                           "-o", str(tmp_path / "out.jsonl")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip().startswith("dsv32 run-batch: error: cannot read the input file")
    assert "Traceback" not in done.stderr
