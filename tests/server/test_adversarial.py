"""One request must not take the server down: hostile inputs schemathesis cannot produce, against a real `dsv32 serve`.

Each test sends one family (tests/server/hostile.py builds them): lone surrogates and control characters in every text
field, deep and wide JSON in every schema-bearing field, malformed structured-output specs, non-finite and huge
numbers, duplicate keys, bodies of several MB, a batch larger than the waiting queue, slow-loris clients, clients that
disconnect at every stage of a stream. The contract: every answer is 2xx or 4xx (a 4xx in OpenAI's error envelope,
a 400 naming the field where the input is a lone surrogate or a non-finite number), in time (deep JSON: under 1 s),
and after each family the server still answers /health with 200 and a plain chat completion, with no request left
running and no KV block held. A failure lists every input that broke the contract and how; an input that kills or
hangs the server is reported and a fresh server started, so the next input is judged on its own.

Every hypothesis part is derandomized (the same inputs every run) and bounded.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.server import hostile
from tests.server.conftest import API_KEY
from tests.server.fuzz_target import AUTH, FuzzTarget, failure_report
from tests.server.hostile import CHAT, Hostile

pytestmark = pytest.mark.e2e

MAX_WAITING = 16
FUZZ = settings(derandomize=True, database=None, deadline=None, phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzTarget]:
    fuzz = FuzzTarget(tmp_path_factory.mktemp("dsv32-adversarial"), "--max-waiting-requests", str(MAX_WAITING))
    yield fuzz
    fuzz.client.close()
    fuzz.stop()


@pytest.fixture(autouse=True)
def fresh_budget(target: FuzzTarget) -> None:
    """Each test starts on a live server with its own restart budget (a test that killed it does not fail the next)."""
    target.begin()


def conclude(target: FuzzTarget, what: str, failures: list[str]) -> None:
    target.finish(what, failures)
    assert not failures, failure_report(what, failures)


def check_cases(target: FuzzTarget, what: str, cases) -> None:
    """A fixed set of hostile inputs, judged one by one, then the server's health."""
    failures: list[str] = []
    target.run(cases, failures)
    conclude(target, what, failures)


# --------------------------------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------------------------------

SURROGATE = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
ANY_CHAR = st.characters(codec=None, min_codepoint=0, max_codepoint=0x10FFFF)


def test_lone_surrogates_in_every_text_field_are_a_400_naming_it(target: FuzzTarget) -> None:
    failures: list[str] = []
    target.run(hostile.surrogate_cases(), failures)

    @settings(FUZZ, max_examples=40)
    @given(st.sampled_from(hostile.TEXT_FIELDS), st.text(ANY_CHAR, max_size=6), SURROGATE,
           st.text(ANY_CHAR, max_size=6))
    def random_text_with_a_surrogate(spec, before: str, surrogate: str, after: str) -> None:
        target.run([hostile.text_case(*spec, before + surrogate + after)], failures)

    random_text_with_a_surrogate()
    conclude(target, "lone surrogates in text fields", failures)


def test_control_characters_and_special_tokens_in_every_text_field(target: FuzzTarget) -> None:
    failures: list[str] = []
    some = ("a\x00b", "\x1b[2J\x1b[31m\x7f\x85", "\u2028\ufeff\uffff", "<｜end▁of▁sentence｜></think>")
    target.run((hostile.text_case(*spec, text) for spec in hostile.TEXT_FIELDS for text in some), failures)

    @settings(FUZZ, max_examples=40)
    @given(st.sampled_from(hostile.TEXT_FIELDS), st.sampled_from(hostile.NASTY_TEXT) | st.text(
        st.characters(codec="utf-8", categories=["Cc", "Cf", "Co", "Cn", "Zl", "Zp", "Mn"]), max_size=8))
    def random_control_text(spec, text: str) -> None:
        target.run([hostile.text_case(*spec, text)], failures)

    random_control_text()
    conclude(target, "control characters in text fields", failures)


# --------------------------------------------------------------------------------------------------------------------
# Deep, wide and malformed JSON documents
# --------------------------------------------------------------------------------------------------------------------


def test_deep_json_in_every_schema_field_is_answered_in_under_a_second(target: FuzzTarget) -> None:
    failures: list[str] = []
    target.run(hostile.deep_cases(), failures)

    @settings(FUZZ, max_examples=20)
    @given(st.sampled_from(hostile.SCHEMA_FIELDS), st.sampled_from(sorted(hostile.SHAPES)),
           st.integers(hostile.DEEP + 1, 20000))
    def random_depth(spec, shape: str, depth: int) -> None:
        target.run([hostile.deep_case(*spec, shape, depth)], failures)

    random_depth()
    conclude(target, "deep JSON in schema fields", failures)


def test_wide_json_in_every_schema_field(target: FuzzTarget) -> None:
    check_cases(target, "wide JSON in schema fields", hostile.wide_cases())


def test_malformed_structured_output_specs_are_refused_at_the_boundary(target: FuzzTarget) -> None:
    check_cases(target, "malformed structured-output specs", hostile.malformed_structured_output_cases())


def test_duplicate_keys(target: FuzzTarget) -> None:
    check_cases(target, "duplicate keys", hostile.duplicate_key_cases())


# --------------------------------------------------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------------------------------------------------


def test_non_finite_numbers_are_a_400_naming_the_field(target: FuzzTarget) -> None:
    failures: list[str] = []
    target.run(hostile.non_finite_cases(), failures)

    @settings(FUZZ, max_examples=40)
    @given(st.sampled_from(hostile.FLOAT_FIELDS[:9]), st.floats(allow_nan=True, allow_infinity=True))
    def random_float(spec, value: float) -> None:
        target.run([hostile.float_case(*spec, value)], failures)

    random_float()
    conclude(target, "non-finite numbers", failures)


def test_huge_integers(target: FuzzTarget) -> None:
    failures: list[str] = []
    target.run(hostile.huge_int_cases(), failures)

    @settings(FUZZ, max_examples=40)
    # Outside (4, 1024]: a value inside would be a real (slow) generation of up to max-model-len tokens.
    @given(st.sampled_from(hostile.INT_FIELDS),
           st.integers(min_value=-(10**40), max_value=4) | st.integers(min_value=1025, max_value=10**40))
    def random_int(spec, value: int) -> None:
        target.run([hostile.int_case(*spec, str(value))], failures)

    random_int()
    conclude(target, "huge integers", failures)


# --------------------------------------------------------------------------------------------------------------------
# Size
# --------------------------------------------------------------------------------------------------------------------


def test_bodies_of_several_megabytes(target: FuzzTarget) -> None:
    failures: list[str] = []
    target.run(hostile.big_body_cases(6), failures)
    # Chunked (no Content-Length): the server finds out the size only while reading.
    started = time.monotonic()
    try:
        response = target.client.post(CHAT, content=iter([b'{"messages": [{"role": "user", "content": "'] +
                                                          [b"ab" * (1 << 19)] * 6 + [b'"}], "max_tokens": 2}']),
                                      headers={"Content-Type": "application/json"}, timeout=15)
        case = Hostile("6 MB chat content sent chunked (no Content-Length)", CHAT, b"", expect="refuse",
                       max_seconds=10.0)
        problem = hostile.contract_violation(case, response.status_code, response.content, time.monotonic() - started)
        if problem:
            failures.append(f"{case.short()} -> {problem}")
    except httpx.HTTPError as exc:
        failures.append(f"6 MB chunked body -> {type(exc).__name__}: {exc}")
    # A Content-Length far past any limit: refused from the header, without waiting for a body that never comes.
    with raw_connection(target) as sock:
        sock.sendall(request_head(CHAT, content_length=10**12) + b'{"messages": [')
        status, _, body = read_response(sock, timeout=5)
        if status is None or not 400 <= status < 500:
            failures.append(f"POST {CHAT} with Content-Length: 10**12 and a 14-byte body -> "
                            f"{'no answer within 5s' if status is None else status} (must be refused, e.g. 413, "
                            f"from the header alone) {body[:200]!r}")
    conclude(target, "bodies of several MB", failures)


def test_completions_batch_larger_than_the_waiting_queue(target: FuzzTarget) -> None:
    failures: list[str] = []
    for prompts in (MAX_WAITING + 1, 10 * MAX_WAITING, 5000):
        target.run([hostile.batch_case(prompts)], failures)
        idle = target.idle_problem()
        if idle is not None:
            failures.append(f"after a completions batch of {prompts} prompts (max-waiting-requests={MAX_WAITING}): "
                            f"the engine is {idle}")
    conclude(target, "giant completions batches", failures)


# --------------------------------------------------------------------------------------------------------------------
# Raw HTTP: slow clients, disconnects, keep-alive, auth
# --------------------------------------------------------------------------------------------------------------------


def raw_connection(target: FuzzTarget) -> socket.socket:
    host, port = target.base_url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def request_head(path: str, content_length: int | None, method: str = "POST",
                 authorization: str = f"Bearer {API_KEY}") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", f"Authorization: {authorization}",
             "Content-Type: application/json"]
    if content_length is not None:
        lines.append(f"Content-Length: {content_length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def request_bytes(path: str, body: dict | bytes | None = None, method: str = "POST") -> bytes:
    data = body if isinstance(body, bytes) else b"" if body is None else json.dumps(body).encode()
    return request_head(path, len(data), method) + data


def read_response(sock: socket.socket, timeout: float) -> tuple[int | None, dict[str, str], bytes]:
    """One HTTP/1.1 response (Content-Length or chunked); status None when none came within ``timeout``."""
    deadline = time.monotonic() + timeout
    buffer = b""

    def fill() -> bool:
        nonlocal buffer
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        sock.settimeout(remaining)
        try:
            data = sock.recv(65536)
        except (TimeoutError, OSError):
            return False
        buffer += data
        return bool(data)

    while b"\r\n\r\n" not in buffer:
        if not fill():
            return None, {}, buffer
    head, buffer = buffer.split(b"\r\n\r\n", 1)
    lines = head.decode(errors="replace").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)}
    if "content-length" in headers:
        length = int(headers["content-length"])
        while len(buffer) < length:
            if not fill():
                break
        return status, headers, buffer[:length]
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            while b"\r\n" not in buffer:
                if not fill():
                    return status, headers, body
            size_line, rest = buffer.split(b"\r\n", 1)
            size = int(size_line.split(b";")[0], 16)
            while len(rest) < size + 2:
                buffer = rest
                if not fill():
                    return status, headers, body
                rest = buffer
            body, buffer = body + rest[:size], rest[size + 2:]
            if size == 0:
                return status, headers, body
    return status, headers, buffer


def test_slow_loris_clients_do_not_block_others(target: FuzzTarget) -> None:
    """32 connections stall (16 mid-headers, 16 mid-body): /health, a chat completion and /metrics still answer at
    once, and a stalled body holds no engine slot."""
    failures: list[str] = []
    stalled: list[socket.socket] = []
    try:
        for i in range(32):
            sock = raw_connection(target)
            head = request_head(CHAT, content_length=1000)
            sock.sendall(head[:40] if i % 2 == 0 else head + b'{"messages": [{"role": "us')
            stalled.append(sock)
        time.sleep(0.5)  # the stall itself: the probes below run while they hold their connections
        for path, method in (("/health", "GET"), (CHAT, "POST"), ("/metrics", "GET")):
            started = time.monotonic()
            try:
                response = target.client.request(method, path, json=hostile.chat_body() if method == "POST" else None,
                                                 timeout=5)
                elapsed = time.monotonic() - started
                if response.status_code != 200 or elapsed > 2:
                    failures.append(f"{method} {path} while 32 slow-loris connections stall -> "
                                    f"{response.status_code} after {elapsed:.2f}s")
            except httpx.HTTPError as exc:
                failures.append(f"{method} {path} while 32 slow-loris connections stall -> {type(exc).__name__}")
        running = target.metrics().get("vllm:num_requests_running", 0.0)
        waiting = target.metrics().get("vllm:num_requests_waiting", 0.0)
        if running or waiting:
            failures.append(f"16 half-sent chat bodies hold engine slots: running={running} waiting={waiting}")
    finally:
        for sock in stalled:
            sock.close()
    conclude(target, "slow-loris clients", failures)


LONG = {"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 900, "ignore_eos": True}


def _disconnect(target: FuzzTarget, stage: str, body: dict, reset: bool) -> None:
    """Send ``body`` as far as ``stage`` and drop the connection (a TCP reset when ``reset``)."""
    data = json.dumps(body).encode()
    path = hostile.COMPLETIONS if "prompt" in body else CHAT
    sock = raw_connection(target)
    try:
        if stage == "connected, nothing sent":
            pass
        elif stage == "mid headers":
            sock.sendall(request_head(path, len(data))[:30])
        elif stage == "headers sent, no body":
            sock.sendall(request_head(path, len(data)))
        elif stage == "mid body":
            sock.sendall(request_head(path, len(data)) + data[: len(data) // 2])
        else:
            sock.sendall(request_head(path, len(data)) + data)
            if stage in ("full request sent", "mid generation (not streamed)"):
                # Disconnect once the engine has the request, before anything of the answer is read.
                target.server.wait_for_metrics(lambda m: m.get("vllm:num_requests_running", 0.0) >= 1, 10.0)
            elif stage == "response headers read":
                _read_until(sock, b"\r\n\r\n", 10)
            elif stage == "first event read":
                _read_until(sock, b"data: ", 10)
                _read_until(sock, b"\n\n", 10)
            elif stage == "several events read":
                for _ in range(5):
                    _read_until(sock, b"\n\n", 10)
    finally:
        if reset:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()


def _read_until(sock: socket.socket, marker: bytes, timeout: float) -> None:
    sock.settimeout(timeout)
    seen = b""
    while marker not in seen:
        data = sock.recv(1)
        if not data:
            return
        seen += data


STAGES = ("connected, nothing sent", "mid headers", "headers sent, no body", "mid body", "full request sent",
          "response headers read", "first event read", "several events read")


def test_clients_that_disconnect_at_every_stage_of_a_stream(target: FuzzTarget) -> None:
    """Each disconnect ends its request in the engine within a few seconds (a 900-token generation left running
    would take ~20 s): nothing left running, no KV block held, and the server still serves."""
    failures: list[str] = []
    streamed = {**LONG, "stream": True}
    plans = [(stage, streamed, reset) for stage in STAGES for reset in (False, True)]
    plans += [("mid generation (not streamed)", LONG, False), ("mid generation (not streamed)", LONG, True),
              ("several events read", {**streamed, "n": 2}, False),
              ("first event read", {"prompt": "Once", "max_tokens": 900, "ignore_eos": True, "stream": True}, False)]
    for stage, body, reset in plans:
        what = f"a client that {'resets' if reset else 'closes'} its connection at '{stage}'" + (
            " (n=2)" if body.get("n") == 2 else " (completions)" if "prompt" in body else "")
        try:
            _disconnect(target, stage, body, reset)
        except OSError as exc:
            failures.append(f"{what}: the server broke the connection first ({exc})")
        idle = target.idle_problem(timeout_s=5.0)
        if idle is not None:
            failures.append(f"after {what}: the engine is {idle} (the request was not aborted)")
            target.idle_problem(timeout_s=30.0)  # let it drain so the next stage is judged alone
        death = target.check_alive(what)
        if death is not None:
            failures.append(death)
    conclude(target, "client disconnects", failures)


def test_refusals_keep_the_connection_alive(target: FuzzTarget) -> None:
    """An error answer (4xx, or a 5xx where one slips through) must not reset a keep-alive connection: the next
    request on the same connection is answered."""
    failures: list[str] = []
    normal = request_bytes(CHAT, hostile.chat_body())
    firsts = {
        "a lone surrogate": request_bytes(CHAT, b'{"messages":[{"role":"user","content":"\\ud800"}],"max_tokens":2}'),
        "NaN temperature": request_bytes(CHAT, b'{"messages":[{"role":"user","content":"a"}],"temperature":NaN}'),
        "invalid JSON": request_bytes(CHAT, b'{"messages": ['),
        "an unknown route": request_bytes("/v1/nowhere", {}),
        "a wrong method": request_bytes(CHAT, None, method="GET"),
    }
    for what, first in firsts.items():
        with raw_connection(target) as sock:
            sock.sendall(first)
            status, headers, _ = read_response(sock, timeout=10)
            if status is None:
                failures.append(f"{what}: no answer within 10s")
                continue
            if headers.get("connection", "").lower() == "close":
                failures.append(f"{what}: answered {status} with Connection: close")
                continue
            try:
                sock.sendall(normal)
                second, _, body = read_response(sock, timeout=10)
            except OSError as exc:
                second, body = None, repr(exc).encode()
            if second != 200:
                failures.append(f"{what}: answered {status}, then the next request on the same connection got "
                                f"{second if second is not None else 'no answer (connection dropped)'} {body[:150]!r}")
    conclude(target, "keep-alive after refusals", failures)


def test_api_key_scheme_is_case_insensitive_and_flush_cache_needs_it(target: FuzzTarget) -> None:
    failures: list[str] = []
    for scheme in ("Bearer", "bearer", "BEARER", "bEaReR"):
        response = httpx.get(f"{target.base_url}/v1/models", headers={"Authorization": f"{scheme} {API_KEY}"},
                             timeout=5)
        if response.status_code != 200:
            failures.append(f"GET /v1/models with 'Authorization: {scheme} <key>' -> {response.status_code}")
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        response = httpx.post(f"{target.base_url}/flush_cache", headers=headers, timeout=5)
        if response.status_code != 401:
            failures.append(f"POST /flush_cache with headers {headers} -> {response.status_code} (must be 401)")
        elif hostile.error_envelope_problem(response.content):
            failures.append(f"POST /flush_cache 401: {hostile.error_envelope_problem(response.content)}")
    response = httpx.post(f"{target.base_url}/flush_cache", headers=AUTH, timeout=5)
    if response.status_code not in (200, 400):
        failures.append(f"POST /flush_cache with the key -> {response.status_code}")
    conclude(target, "API key", failures)


def test_concurrent_hostile_inputs_do_not_starve_normal_requests(target: FuzzTarget) -> None:
    """Hostile inputs from 8 threads at once, a plain chat completion every few of them: each plain one answered."""
    failures: list[str] = []
    cases = [case for case in hostile.all_small_cases() if case.max_seconds >= 5.0][::12][:96]
    lock = threading.Lock()

    def worker(part: list[Hostile]) -> None:
        client = httpx.Client(base_url=target.base_url, headers=AUTH)
        with client:
            for i, case in enumerate(part):
                for request_case in ([case] if i % 3 else [case, Hostile("plain chat", CHAT,
                                                                         hostile.encode(hostile.chat_body()))]):
                    started = time.monotonic()
                    try:
                        response = client.post(request_case.path, content=request_case.body, timeout=15,
                                               headers={"Content-Type": "application/json"})
                        problem = hostile.contract_violation(request_case, response.status_code, response.content,
                                                             time.monotonic() - started)
                        if request_case.label == "plain chat" and response.status_code != 200:
                            problem = f"{response.status_code}: {response.text[:200]}"
                    except httpx.HTTPError as exc:
                        problem = f"{type(exc).__name__}: {exc}"
                    if problem:
                        with lock:
                            failures.append(f"{request_case.short()} (8 clients at once) -> {problem}")

    threads = [threading.Thread(target=worker, args=(cases[i::8],)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    if any(thread.is_alive() for thread in threads):
        failures.append("the clients were still waiting after 120 s")
    conclude(target, "concurrent hostile inputs", failures)
