"""Replicas of `dsv32 serve` behind vllm-router (PyPI; a Rust router made for vLLM workers), all on 127.0.0.1:
requests are spread over the replicas, a killed replica is routed around, the router reads each worker's load
(/get_load), and in its multi-model mode it sends each request to the replica serving the model named in it.

The two replicas answer to "tiny" and to a name of their own ("fast", "deep"), listed first so the `model` of each
response says which replica answered it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import ServerProcess, free_port

pytestmark = pytest.mark.e2e

ROUTER_START_TIMEOUT_S = 60.0
PORT_RETRIES = 3


def router_binary() -> str:
    found = shutil.which("vllm-router") or str(Path(sys.executable).parent / "vllm-router")
    if not os.access(found, os.X_OK):
        pytest.skip("vllm-router is not installed (pip install vllm-router; it is in the test extra)")
    return found


@pytest.fixture(scope="module")
def replicas(server_factory: Callable[..., ServerProcess]) -> dict[str, ServerProcess]:
    return {name: server_factory("--served-model-name", name, "tiny") for name in ("fast", "deep")}


@pytest.fixture(scope="module")
def start_router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., str]]:
    """Start vllm-router with the given flags on a free port; returns its base URL. Stopped when the module ends."""
    binary = router_binary()
    log_dir = tmp_path_factory.mktemp("router")
    started: list[subprocess.Popen[bytes]] = []

    def start(*args: str) -> str:
        """Start one router; a port taken between `free_port` and the router's bind (the router's own health
        checks open connections from the same ephemeral range first) is retried on fresh ports."""
        for _ in range(PORT_RETRIES):
            base_url = start_once(*args)
            if base_url is not None:
                return base_url
        raise AssertionError(f"vllm-router found its port taken {PORT_RETRIES} times")

    def start_once(*args: str) -> str | None:
        port = free_port()
        log_path = log_dir / f"router-{port}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen([binary, "--host", "127.0.0.1", "--port", str(port),
                                        "--prometheus-port", str(free_port()), *args],
                                       stdout=log, stderr=subprocess.STDOUT)
        started.append(process)
        base_url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + ROUTER_START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                if "Address already in use" in log_path.read_text():
                    return None
                raise AssertionError(f"vllm-router exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{base_url}/readiness", timeout=2).status_code < 500 or "--enable-igw" in args:
                    return base_url
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"vllm-router did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.2)

    yield start
    for process in started:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def chat(base_url: str, model: str, content: str = "hi") -> httpx.Response:
    return httpx.post(f"{base_url}/v1/chat/completions", timeout=60,
                      json={"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 2})


def answered_by(responses: list[httpx.Response]) -> Counter[str]:
    for response in responses:
        assert response.status_code == 200, response.text
    return Counter(response.json()["model"] for response in responses)


def test_worker_endpoints_the_routers_read(replicas: dict[str, ServerProcess]) -> None:
    base = replicas["fast"].base_url
    assert httpx.get(f"{base}/get_load", timeout=10).json() == {"load": 0, "num_running_reqs": 0,
                                                                "num_waiting_reqs": 0}
    info = httpx.get(f"{base}/get_model_info", timeout=10).json()
    assert info["served_model_name"] == "fast" and info["model_path"] == "tiny" and info["is_generation"] is True
    assert info["max_context_length"] == 1024 and info["architectures"] == ["DeepseekV32ForCausalLM"]
    assert httpx.get(f"{base}/model_info", timeout=10).json() == info
    server = httpx.get(f"{base}/get_server_info", timeout=10).json()
    assert server["served_model_names"] == ["fast", "tiny"] and server["context_length"] == 1024
    assert server["max_running_requests"] == 64 and server["version"]
    assert httpx.post(f"{base}/flush_cache", timeout=10).status_code == 200
    # The fields the routers add to every request they forward are understood, not refused or warned about.
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "no_stop_trim": False,
            "stream_reasoning": True, "return_hidden_states": False, "separate_reasoning": True}
    assert httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60).status_code == 200
    refused = httpx.post(f"{base}/v1/chat/completions", json={**body, "return_hidden_states": True}, timeout=60)
    assert refused.status_code == 400 and "return_hidden_states" in refused.json()["error"]["message"]
    refused = httpx.post(f"{base}/v1/chat/completions", json={**body, "stream_reasoning": False}, timeout=60)
    assert refused.status_code == 400 and "stream_reasoning" in refused.json()["error"]["message"]
    assert "ignored" not in replicas["fast"].log()


def test_requests_are_spread_and_a_killed_replica_is_routed_around(
        replicas: dict[str, ServerProcess], start_router: Callable[..., str],
        server_factory: Callable[..., ServerProcess]) -> None:
    # A third replica, of the same name as another, to kill without losing the others for the next test.
    doomed = server_factory("--served-model-name", "doomed", "tiny")
    router = start_router("--policy", "round_robin", "--worker-urls", replicas["fast"].base_url, doomed.base_url,
                          "--health-check-interval-secs", "1", "--health-failure-threshold", "1")
    assert [card["id"] for card in httpx.get(f"{router}/v1/models", timeout=10).json()["data"]] in (
        ["fast", "tiny"], ["doomed", "tiny"])
    spread = answered_by([chat(router, "tiny") for _ in range(8)])
    assert spread == {"fast": 4, "doomed": 4}, spread  # round robin

    doomed.process.kill()
    doomed.process.wait(timeout=30)
    after = answered_by([chat(router, "tiny") for _ in range(6)])
    assert after == {"fast": 6}, after
    # The router notices on its next health check (every second here): wait for it rather than race it.
    deadline = time.monotonic() + 15
    while (health := httpx.get(f"{router}/health", timeout=10)).status_code != 503 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert health.status_code == 503 and doomed.base_url in health.text


def test_power_of_two_reads_the_load_of_each_worker(replicas: dict[str, ServerProcess],
                                                    start_router: Callable[..., str]) -> None:
    router = start_router("--policy", "power_of_two", "--worker-urls", replicas["fast"].base_url,
                          replicas["deep"].base_url, "--worker-startup-check-interval", "1")
    loads = httpx.get(f"{router}/get_loads", timeout=10).json()["workers"]
    assert sorted(entry["worker"] for entry in loads) == sorted(r.base_url for r in replicas.values())
    assert all(entry["load"] == 0 for entry in loads), loads  # -1 would mean the router could not read it
    assert sum(answered_by([chat(router, "tiny") for _ in range(4)]).values()) == 4


def test_multi_model_mode_routes_by_the_model_name(replicas: dict[str, ServerProcess],
                                                   start_router: Callable[..., str]) -> None:
    router = start_router("--enable-igw")
    for replica in replicas.values():  # the router reads the model id from the worker itself
        added = httpx.post(f"{router}/workers", json={"url": replica.base_url}, timeout=30)
        assert added.status_code == 200 and added.json()["success"], added.text
    workers = httpx.get(f"{router}/workers", timeout=10).json()["workers"]
    assert sorted(worker["model_id"] for worker in workers) == ["deep", "fast"]
    assert answered_by([chat(router, name) for name in ("fast", "deep", "deep", "fast", "deep")]) == {
        "fast": 2, "deep": 3}
