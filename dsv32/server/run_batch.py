"""``dsv32 run-batch``: an OpenAI batch file (the format ``vllm run-batch`` reads and writes) run through the engine.

Each input line is ``{"custom_id", "method": "POST", "url": "/v1/chat/completions" | "/v1/completions", "body"}``.
The requests go through the server's own app (``build_app``) over an in-process ASGI transport - no socket - so
validation, prompt rendering, output parsing and error objects are exactly what ``dsv32 serve`` answers. Up to
twice ``max_num_seqs`` requests are in flight at once (vLLM's choice): the engine's batch stays full and the
scheduler always has the next requests waiting.

Each output line is ``{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}``: ``body`` is
the response JSON on success; on failure ``body`` is null and ``error`` the server's error object. A line that is no
valid batch request (bad JSON, no ``custom_id``, an unsupported ``url``, ``stream: true``, a repeated ``custom_id``)
gets such an error line too; the other lines still run.

Resume: result lines already in the output file with status 200 are kept and their ``custom_id``s are not run again.
New results are appended to the file as they finish (an interrupted run loses none of them), and at the end the file
is rewritten with exactly one line per input line, in input order.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx
from tqdm import tqdm

from dsv32.config import ConfigError, EngineConfig
from dsv32.server.app import build_app
from dsv32.server.errors import APIError
from dsv32.server.protocol import random_uuid
from dsv32.server.settings import ServerConfig

logger = logging.getLogger("dsv32.batch")

SUPPORTED_URLS = ("/v1/chat/completions", "/v1/completions")


class BatchFileError(Exception):
    """The batch cannot start at all (unreadable input, output path unusable)."""


@dataclass
class BatchLine:
    """One request of the input file: runnable (``url`` and ``body`` set) or refused (``error`` set)."""

    line_number: int  # 1-based, in the input file
    custom_id: str | None
    url: str = ""
    body: dict[str, Any] | None = None
    error: APIError | None = None


@dataclass(frozen=True)
class BatchSummary:
    total: int
    succeeded: int
    failed: int
    skipped: int  # already done in the output file (resume)


def parse_line(line_number: int, text: str) -> BatchLine:
    """Read one input line; anything that is not a runnable batch request comes back with ``error`` set."""

    def refused(message: str, param: str | None, custom_id: str | None = None) -> BatchLine:
        return BatchLine(line_number, custom_id, error=APIError(f"line {line_number}: {message}", 400, param=param))

    try:
        request = json.loads(text)
    except json.JSONDecodeError as exc:
        return refused(f"invalid JSON: {exc.msg} (column {exc.colno})", None)
    if not isinstance(request, dict):
        return refused("a batch request must be a JSON object", None)
    custom_id = request.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return refused("`custom_id` (a non-empty string) is required", "custom_id")
    method = request.get("method", "POST")
    if method != "POST":
        return refused(f"unsupported method {method!r}: only POST is supported", "method", custom_id)
    url = request.get("url")
    if url not in SUPPORTED_URLS:
        return refused(f"unsupported url {url!r}: supported are {', '.join(SUPPORTED_URLS)}", "url", custom_id)
    body = request.get("body")
    if not isinstance(body, dict):
        return refused("`body` (a JSON object with the request) is required", "body", custom_id)
    if body.get("stream"):
        return refused("streaming is not supported in a batch: leave `stream` out or set it to false",
                       "body.stream", custom_id)
    return BatchLine(line_number, custom_id, url=url, body=body)


def read_input(path: Path) -> list[BatchLine]:
    """Every non-blank line of the input, in order; a repeated ``custom_id`` is refused after its first use."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BatchFileError(f"cannot read the input file {path}: {exc}") from None
    lines: list[BatchLine] = []
    seen: set[str] = set()
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        line = parse_line(number, raw)
        if line.error is None and line.custom_id in seen:
            line = BatchLine(number, line.custom_id, error=APIError(
                f"line {number}: custom_id {line.custom_id!r} is used by an earlier line; custom_ids must be unique",
                400, param="custom_id"))
        if line.custom_id is not None:
            seen.add(line.custom_id)
        lines.append(line)
    return lines


def read_done(path: Path) -> dict[str, dict[str, Any]]:
    """Successful result lines already in ``path`` by ``custom_id`` (unreadable or failed lines are run again)."""
    if not path.exists():
        return {}
    done: dict[str, dict[str, Any]] = {}
    with path.open(encoding="utf-8", errors="replace") as file:
        for raw in file:
            try:
                result = json.loads(raw)
            except json.JSONDecodeError:
                continue  # e.g. the last line of an interrupted run
            if (isinstance(result, dict) and isinstance(result.get("custom_id"), str) and result.get("error") is None
                    and isinstance(result.get("response"), dict) and result["response"].get("status_code") == 200):
                done[result["custom_id"]] = result
    return done


def result_line(custom_id: str | None, status_code: int, request_id: str, body: Any, error: Any) -> dict[str, Any]:
    return {"id": f"batch_req_{random_uuid()}", "custom_id": custom_id,
            "response": {"status_code": status_code, "request_id": request_id, "body": body}, "error": error}


def refusal_line(line: BatchLine) -> dict[str, Any]:
    assert line.error is not None
    return result_line(line.custom_id, line.error.status_code, f"batch-{random_uuid()}", None, line.error.to_dict())


async def execute(client: httpx.AsyncClient, line: BatchLine) -> dict[str, Any]:
    """Send one request to the app; its answer, success or error, becomes the result line."""
    response = await client.post(line.url, json=line.body)
    request_id = response.headers.get("x-request-id") or f"batch-{random_uuid()}"
    try:
        payload = response.json()
    except ValueError:
        payload = APIError(f"the server answered with a non-JSON body (HTTP {response.status_code})",
                           response.status_code).to_dict()
    if response.status_code == 200:
        return result_line(line.custom_id, 200, request_id, payload, None)
    return result_line(line.custom_id, response.status_code, request_id, None, payload)


async def run_batch(app: Any, lines: list[BatchLine], output: Path, max_in_flight: int,
                    progress: bool = True) -> BatchSummary:
    """Run ``lines`` through ``app`` (the server's ASGI app) and write ``output``, resuming what is already there."""
    done = read_done(output)
    results: list[dict[str, Any] | None] = []
    for line in lines:
        if line.error is not None:
            results.append(refusal_line(line))
        else:
            results.append(done.get(line.custom_id))  # type: ignore[arg-type]
    pending = [i for i, result in enumerate(results) if result is None]
    skipped = sum(1 for line in lines if line.error is None and line.custom_id in done)
    if skipped:
        logger.info("resuming: %d of %d requests are already done in %s", skipped, len(lines), output)

    limit = asyncio.Semaphore(max_in_flight)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    with output.open("a", encoding="utf-8") as sink, tqdm(total=len(pending), unit="req", desc="Running batch",
                                                          disable=not progress) as bar:
        async with httpx.AsyncClient(transport=transport, base_url="http://dsv32-batch", timeout=None) as client:

            async def run_one(index: int) -> None:
                async with limit:
                    result = await execute(client, lines[index])
                results[index] = result
                _append(sink, result)  # written at once so an interrupted run keeps it
                bar.update()

            await asyncio.gather(*(run_one(i) for i in pending))
    final = [result for result in results if result is not None]
    _rewrite_in_order(output, final)
    failed = sum(1 for result in final if result["error"] is not None)
    return BatchSummary(total=len(lines), succeeded=len(final) - failed, failed=failed, skipped=skipped)


def _append(sink: IO[str], result: dict[str, Any]) -> None:
    sink.write(json.dumps(result, ensure_ascii=False) + "\n")
    sink.flush()


def _rewrite_in_order(output: Path, results: list[dict[str, Any]]) -> None:
    partial = output.with_name(output.name + ".partial")
    with partial.open("w", encoding="utf-8") as sink:
        for result in results:
            sink.write(json.dumps(result, ensure_ascii=False) + "\n")
    os.replace(partial, output)


def run_batch_file(engine_config: EngineConfig, server_config: ServerConfig, input_path: str, output_path: str,
                   progress: bool = True) -> int:
    """``dsv32 run-batch``: load the engine, run the file, print a summary; returns the exit code."""
    source, output = Path(input_path), Path(output_path)
    try:
        if source.resolve() == output.resolve():
            raise BatchFileError("the output file must not be the input file")
        lines = read_input(source)
        if not output.parent.is_dir():
            raise BatchFileError(f"the output folder {output.parent} does not exist")
    except BatchFileError as exc:
        print(f"dsv32 run-batch: error: {exc}", file=sys.stderr)
        return 1
    return asyncio.run(_run(engine_config, server_config, lines, output, progress))


async def _run(engine_config: EngineConfig, server_config: ServerConfig, lines: list[BatchLine], output: Path,
               progress: bool) -> int:
    from dsv32.engine.async_engine import AsyncLLM

    try:
        engine = AsyncLLM.from_engine_config(engine_config)
    except (ConfigError, OSError, ValueError) as exc:
        print(f"dsv32 run-batch: error: cannot load {engine_config.model}: {exc}", file=sys.stderr)
        return 1
    if not server_config.log_requests:
        # One INFO line per request would bury the progress bar.
        logging.getLogger("dsv32.server").setLevel(logging.WARNING)
    try:
        app = build_app(engine, server_config)
        # vLLM keeps 2 x max_num_seqs in flight; never more than the waiting queue takes (it would answer 503).
        max_in_flight = engine_config.max_num_seqs + min(engine_config.max_num_seqs,
                                                         engine_config.max_waiting_requests)
        summary = await run_batch(app, lines, output, max_in_flight, progress)
    finally:
        await engine.shutdown()
    print(f"dsv32 run-batch: {summary.total} requests: {summary.succeeded} succeeded, {summary.failed} failed, "
          f"{summary.skipped} already done; results in {output}")
    return 0
