"""The chat page at GET /, in a real browser: Debian's chromium driven by selenium against a real `dsv32 serve` on the
tiny model. Streaming, the thinking switch, stop, errors, tool calls, the API key prompt, and no outside fetches.

Needs `chromium` and `chromium-driver` (apt; `.ci/run` installs them); without them the browser tests skip, saying
why. The screenshots are saved under the test's tmp dir (the path is printed; `pytest -s` shows it).
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.server.conftest import API_KEY, ServerProcess

pytestmark = pytest.mark.e2e

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# Flags for a headless run as root without network side traffic, each test run in a fresh profile.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1200,900")
STATS = re.compile(r"^~?\d+ tokens · TTFT \d+ ms( · [\d.]+ tok/s)? · (\w+)$")


def test_the_page_and_its_assets_are_served_without_auth_and_reference_nothing_outside(
        server_factory: Callable[..., ServerProcess]) -> None:
    server = server_factory("--api-key", API_KEY)
    page = httpx.get(f"{server.base_url}/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert set(assets) == {"static/chat.css", "static/chat.js", "data:,"}
    for asset in ("static/chat.css", "static/chat.js"):
        response = httpx.get(f"{server.base_url}/{asset}", timeout=10)
        assert response.status_code == 200 and "http" not in response.text.replace("HTTP ", "")
    assert httpx.get(f"{server.base_url}/v1/models", timeout=10).status_code == 401  # the API itself stays closed
    assert httpx.get(f"{server.base_url}/static/missing.js", timeout=10).json()["error"]["code"] == 404


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not shutil.which(path)]
    if missing:
        pytest.skip(f"browser test needs Debian's chromium and chromium-driver; missing {', '.join(missing)} "
                    "(apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="browser test needs selenium (the test extra)")
    from selenium.common.exceptions import WebDriverException

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="dsv32-chromium-")
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    try:
        driver = webdriver.Chrome(service=webdriver.ChromeService(CHROMEDRIVER), options=options)
    except WebDriverException as exc:
        pytest.skip(f"chromium did not start: {exc.msg}")
    driver.set_script_timeout(30)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def wait_for(condition: Callable[[], Any], timeout_s: float = 60.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class ChatPage:
    """The page as a person uses it, through selenium."""

    def __init__(self, driver: Any, base_url: str) -> None:
        from selenium.webdriver.common.by import By

        self.driver, self.by, self.base_url = driver, By, base_url
        driver.get(f"{base_url}/")
        driver.execute_script("localStorage.clear()")
        driver.get(f"{base_url}/")

    def el(self, css: str) -> Any:
        return self.driver.find_element(self.by.CSS_SELECTOR, css)

    def js(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(script, *args)

    def models(self) -> list[str]:
        return [option.text for option in self.driver.find_elements(self.by.CSS_SELECTOR, "#model option")]

    def set_field(self, field_id: str, value: str) -> None:
        field = self.el(f"#{field_id}")
        field.clear()
        field.send_keys(value)

    def thinking(self, on: bool) -> None:
        if self.el("#thinking").is_selected() != on:
            self.el("#thinking").click()

    def send(self, text: str) -> int:
        """Types a message and presses Enter; returns the index of the answer that will appear."""
        answers = self.answer_count()
        self.el("#prompt").send_keys(text + "\n")
        return answers

    def answer_count(self) -> int:
        return len(self.driver.find_elements(self.by.CSS_SELECTOR, ".message.assistant"))

    def answer(self, index: int) -> dict[str, Any]:
        return self.js("""
            const bubble = document.querySelectorAll('.message.assistant')[arguments[0]];
            if (!bubble) return null;
            const details = bubble.querySelector('details.thinking');
            const text = (css) => { const n = bubble.querySelector(css); return n ? n.textContent : ''; };
            return {thinking: details && !details.hidden ? text('.thinking-text') : null,
                    thinkingOpen: details ? details.open : null, content: text('.answer'),
                    stats: text('.stats'), failure: text('.failure'), calls: text('.tool-calls')};
        """, index)

    def finished(self, index: int) -> dict[str, Any]:
        return wait_for(lambda: (a := self.answer(index)) and a["stats"] and a, what=f"answer {index} to finish")


@pytest.fixture(scope="module")
def server(server_factory: Callable[..., ServerProcess]) -> ServerProcess:
    return server_factory()


def test_chat_streams_toggles_thinking_stops_and_shows_errors(browser: Any, server: ServerProcess,
                                                             tmp_path: Path) -> None:
    page = ChatPage(browser, server.base_url)
    assert wait_for(page.models, what="the model list") == ["tiny"]

    # Thinking on: the answer streams into the thinking block, piece by piece.
    page.thinking(True)
    page.set_field("max-tokens", "48")
    first = page.send("Hello, who are you?")
    lengths: set[int] = set()
    while not (answer := page.answer(first)) or not answer["stats"]:
        if answer and answer["thinking"]:
            lengths.add(len(answer["thinking"]))
        time.sleep(0.01)
    assert len(lengths) >= 2, "the thinking text should arrive in several pieces"
    assert answer["thinking"] and STATS.match(answer["stats"]), answer
    assert STATS.match(answer["stats"]).group(2) in ("length", "stop")  # type: ignore[union-attr]
    tokens = int(answer["stats"].split()[0])
    assert 1 <= tokens <= 48

    # Thinking off: the next answer is plain content, no thinking block.
    page.thinking(False)
    second = page.send("Now answer without thinking.")
    answer = page.finished(second)
    assert answer["thinking"] is None and answer["content"], answer

    # Stop: a long answer is cut off, and the server aborts the request.
    page.set_field("max-tokens", "900")
    third = page.send("Tell me a long story.")
    wait_for(lambda: len(page.answer(third)["content"]) > 20, what="the long answer to start")
    assert page.el("#stop").is_displayed() and not page.el("#send").is_displayed()
    page.el("#stop").click()
    answer = page.finished(third)
    assert answer["stats"].endswith("· stopped") and answer["stats"].startswith("~")
    assert page.el("#send").is_displayed() and not page.el("#stop").is_displayed()
    aborted = "vllm:request_success_total{finished_reason=abort}"
    # The engine frees the request a moment after the HTTP side counts it aborted.
    metrics = server.wait_for_metrics(lambda m: m.get(aborted, 0) >= 1 and m.get("vllm:num_requests_running") == 0)
    assert metrics.get(aborted, 0) >= 1
    assert metrics.get("vllm:num_requests_running", 0) == 0

    # An error is shown in the conversation (this one: more tokens than the context holds).
    page.set_field("max-tokens", "5000")
    fourth = page.send("This asks for too much.")
    answer = page.finished(fourth)
    assert "maximum context length" in answer["failure"] and answer["stats"] == "error"

    # Nothing was fetched from anywhere but this server.
    urls = page.js("return performance.getEntriesByType('resource').map(e => e.name)")
    assert urls and all(url.startswith(server.base_url) for url in urls), urls
    shot = tmp_path / "chat-page.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")


# A streamed answer with a tool call, as the server would send it (the tiny model's random weights never call one).
TOOL_CALL_CHUNKS = [
    {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
    {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                                        "function": {"name": "get_weather", "arguments": ""}}]}}]},
    {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}}]},
    {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}}]},
    {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
    {"choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": 12, "total_tokens": 22}},
]
CITY = {"type": "object", "properties": {"city": {"type": "string"}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": CITY}}]


def test_tool_calls_and_results_are_rendered_and_sent_back(browser: Any, server: ServerProcess) -> None:
    page = ChatPage(browser, server.base_url)
    wait_for(page.models, what="the model list")
    # The first completion is answered with a canned tool call; every request body is recorded.
    page.js("""
        window.sentBodies = [];
        const realFetch = window.fetch.bind(window);
        const events = arguments[0].map((c) => 'data: ' + JSON.stringify(c) + '\\n\\n').join('') + 'data: [DONE]\\n\\n';
        window.fetch = (url, init) => {
            if (!String(url).endsWith('chat/completions')) return realFetch(url, init);
            window.sentBodies.push(JSON.parse(init.body));
            if (window.sentBodies.length > 1) return realFetch(url, init);
            return Promise.resolve(new Response(events, {headers: {'Content-Type': 'text/event-stream'}}));
        };
    """, TOOL_CALL_CHUNKS)
    page.el("#tools-toggle").click()
    page.set_field("tools", json.dumps(TOOLS))
    page.thinking(False)
    page.set_field("max-tokens", "8")
    first = page.send("What is the weather in Paris?")
    answer = page.finished(first)
    assert "get_weather" in answer["calls"] and '"city": "Paris"' in answer["calls"], answer
    assert answer["stats"].startswith("12 tokens") and answer["stats"].endswith("tool_calls")
    page.el(".tool-result-input").send_keys("18 C, sunny")
    page.el(".send-tool-results").click()
    answer = page.finished(first + 1)
    assert not answer["failure"], answer  # the real server took the conversation with the tool result
    assert "get_weather → 18 C, sunny" in page.el(".message.tool").text
    second_request = page.js("return window.sentBodies[1]")
    assert second_request["tools"] == TOOLS
    assert second_request["messages"][1]["tool_calls"][0]["function"] == {"name": "get_weather",
                                                                          "arguments": '{"city": "Paris"}'}
    assert second_request["messages"][2] == {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"}


def test_the_page_asks_for_the_api_key_when_the_server_needs_one(
        browser: Any, server_factory: Callable[..., ServerProcess]) -> None:
    server = server_factory("--api-key", API_KEY)
    page = ChatPage(browser, server.base_url)
    wait_for(lambda: page.js("return document.getElementById('key-dialog').open"), what="the API key prompt")
    page.el("#api-key").send_keys(API_KEY + "\n")
    assert wait_for(page.models, what="the model list") == ["tiny"]
    page.set_field("max-tokens", "4")
    answer = page.finished(page.send("hi"))
    assert not answer["failure"] and STATS.match(answer["stats"]), answer
    assert page.js("return localStorage.getItem('dsv32.apiKey')") == API_KEY
