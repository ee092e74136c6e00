"""`bench serve` end to end against the fake OpenAI-compatible server: results, failures, sweep, CLI errors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from dsv32.bench import serve
from tests.bench.fake_server import MODEL, FakeServerConfig, free_port, running_server
from tests.bench.helpers import run_bench

VLLM_RESULT_KEYS = {
    "date",
    "backend",
    "model_id",
    "num_prompts",
    "request_rate",
    "burstiness",
    "max_concurrency",
    "duration",
    "completed",
    "failed",
    "total_input_tokens",
    "total_output_tokens",
    "request_throughput",
    "request_goodput",
    "output_throughput",
    "total_token_throughput",
    "max_output_tokens_per_s",
    "max_concurrent_requests",
    "errors",
    *(f"{stat}_{metric}_ms" for stat in ("mean", "median", "std", "p99") for metric in ("ttft", "tpot", "itl")),
}


@pytest.fixture(scope="module")
def healthy() -> Iterator[tuple[str, FakeServerConfig]]:
    config = FakeServerConfig(token_delay_s=0.001)
    with running_server(config) as url:
        yield url, config


def test_run_completes_and_counts_tokens(healthy: tuple[str, FakeServerConfig]) -> None:
    url, config = healthy
    config.requests.clear()
    [result] = run_bench(url, "--max-concurrency", "3", "--ignore-eos", "--num-warmups", "2")
    assert (result["completed"], result["failed"]) == (6, 0)
    assert result["model_id"] == MODEL  # taken from /v1/models
    assert result["total_output_tokens"] == 6 * 4  # from usage.completion_tokens
    assert result["total_input_tokens"] == 6 * 7  # usage.prompt_tokens overrides the dataset's count
    assert result["max_concurrent_requests"] <= 3
    assert all(len(itl) == 3 for itl in result["itls"])  # 4 one-token chunks -> 3 gaps
    assert VLLM_RESULT_KEYS <= set(result)
    body = config.requests[-1]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["ignore_eos"] is True and body["max_tokens"] == 4 and body["temperature"] == 0.0


def test_chat_endpoint_sends_text_parts(healthy: tuple[str, FakeServerConfig]) -> None:
    url, config = healthy
    config.requests.clear()
    [result] = run_bench(url, "--endpoint", "/v1/chat/completions", "--model", MODEL)
    assert (result["completed"], result["failed"]) == (6, 0)
    assert result["backend"] == "openai-chat"
    body = config.requests[-1]
    assert body["max_completion_tokens"] == 4
    assert body["ignore_eos"] is True  # implied by the random dataset, as in vLLM
    assert body["messages"][0]["content"][0]["type"] == "text"
    # The role chunk counts as the first token's chunk, as in vLLM: 1 role + 4 content chunks -> 4 gaps.
    assert all(len(itl) == 4 for itl in result["itls"])


def test_sharegpt_dataset(healthy: tuple[str, FakeServerConfig], tmp_path: Path) -> None:
    url, config = healthy
    turns = [{"from": "human", "value": "Describe a quiet harbor at dawn."}, {"from": "gpt", "value": " calm" * 20}]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps([{"id": str(i), "conversations": turns} for i in range(3)]))
    config.requests.clear()
    [result] = run_bench(url, "--dataset-name", "sharegpt", "--dataset-path", str(path), "--num-prompts", "3")
    assert (result["completed"], result["failed"]) == (3, 0)
    body = config.requests[-1]
    assert body["prompt"] == "Describe a quiet harbor at dawn." and "ignore_eos" not in body
    assert body["max_tokens"] == 20  # the reference reply's token count


def test_output_tokens_fall_back_to_the_tokenizer() -> None:
    config = FakeServerConfig(usage=False)
    with running_server(config) as url:
        [result] = run_bench(url)
    # The fake streams " tok" x 4 -> " tok tok tok tok", 4 DeepSeek tokens; the prompt count is the dataset's.
    assert result["total_output_tokens"] == 6 * 4
    assert result["total_input_tokens"] == 6 * 16


def test_failures_are_counted_with_their_errors() -> None:
    config = FakeServerConfig(fail_every=3)
    with running_server(config) as url:
        [result] = run_bench(url, "--max-concurrency", "2")
    # Request 1 is the readiness probe; of requests 2..7, numbers 3 and 6 fail.
    assert (result["completed"], result["failed"]) == (4, 2)
    errors = sorted(e for e in result["errors"] if e)
    assert errors == ["HTTP 500: injected failure", "stream error: injected stream failure"]
    assert result["output_lens"].count(0) == 2


def test_sweep_writes_table_plot_and_json(
    healthy: tuple[str, FakeServerConfig], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, _ = healthy
    plot = tmp_path / "sweep.png"
    code = serve.main(
        [
            "--base-url", f"{url}/v1", "--num-prompts", "4", "--random-input-len", "8", "--random-output-len", "3",
            "--concurrency-sweep", "1,2", "--gpu-hourly-cost", "2.25", "--num-gpus", "8", "--plot", str(plot),
            "--save-result", "--result-dir", str(tmp_path), "--result-filename", "run.json", "--disable-tqdm",
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert out.count(" Serving Benchmark Result ") == 2
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| Concurrency | Successful | Failed | Output tok/s")
    assert "USD/1K output tokens" in table[0] and "USD/1K total tokens" in table[0]
    assert [row.split(" | ")[0] for row in table[1:]] == ["| 1", "| 2"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for level in (1, 2):
        saved = json.loads((tmp_path / f"run-concurrency{level}.json").read_text())
        assert saved["max_concurrency"] == level and saved["completed"] == 4
        assert "ttfts" not in saved  # per-request lists only with --save-detailed


def test_unreachable_server_is_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    code = serve.main(["--base-url", url, "--num-prompts", "1", "--ready-check-timeout-sec", "0", "--disable-tqdm"])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert err.startswith("error: cannot reach") and "\n" not in err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--percentile-metrics", "ttft,bogus"], "--percentile-metrics"),
        (["--metric-percentiles", "x"], "--metric-percentiles"),
        (["--goodput", "speed:3"], "--goodput"),
        (["--plot", "x.png"], "--plot"),
        (["--concurrency-sweep", "1,a"], "--concurrency-sweep"),
        (["--extra-body", "[1, 2]"], "--extra-body"),
        (["--dataset-name", "sharegpt", "--dataset-path", "/nonexistent/sharegpt.json"], "No such file"),
    ],
)
def test_bad_input_is_one_line_error(
    healthy: tuple[str, FakeServerConfig], flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    url, _ = healthy
    code = serve.main(["--base-url", url, "--num-prompts", "2", "--disable-tqdm", *flags])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert err.startswith("error:") and message in err and "\n" not in err


def test_unknown_model_fails_before_the_run(capsys: pytest.CaptureFixture[str]) -> None:
    config = FakeServerConfig(fail_every=1)
    with running_server(config) as url:
        code = serve.main(["--base-url", url, "--num-prompts", "2", "--disable-tqdm"])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert err == f"error: initial test request to {url}/v1/completions failed: HTTP 500: injected failure"


def test_acceptance_length_is_reported_when_the_server_exposes_spec_decode_counters(capsys) -> None:
    scrapes = iter([(10, 30, 12, (6, 4, 2)), (14, 42, 21, (10, 7, 4))])

    def metrics() -> str:
        drafts, draft_tokens, accepted, per_pos = next(scrapes)
        lines = [f'vllm:spec_decode_num_drafts_total{{model_name="m",engine="0"}} {drafts}',
                 f'vllm:spec_decode_num_draft_tokens_total{{model_name="m",engine="0"}} {draft_tokens}',
                 f'vllm:spec_decode_num_accepted_tokens_total{{model_name="m",engine="0"}} {accepted}']
        lines += [f'vllm:spec_decode_num_accepted_tokens_per_pos_total{{model_name="m",engine="0",position="{i}"}} {n}'
                  for i, n in enumerate(per_pos)]
        return "\n".join(["# TYPE vllm:spec_decode_num_drafts counter", *lines[:1],
                          "# TYPE vllm:spec_decode_num_draft_tokens counter", lines[1],
                          "# TYPE vllm:spec_decode_num_accepted_tokens counter", lines[2],
                          "# TYPE vllm:spec_decode_num_accepted_tokens_per_pos counter", *lines[3:]]) + "\n"

    with running_server(FakeServerConfig(metrics=metrics)) as url:
        [result] = run_bench(url)
    assert result["spec_decode_num_drafts"] == 4 and result["spec_decode_accepted_tokens"] == 9
    assert result["spec_decode_acceptance_length"] == pytest.approx(1 + 9 / 4)
    assert result["spec_decode_acceptance_rate"] == pytest.approx(100 * 9 / 12)
    assert result["spec_decode_per_position_acceptance_rates"] == pytest.approx([100.0, 75.0, 50.0])
    assert "Acceptance length:" in capsys.readouterr().out


def test_no_spec_decode_section_without_counters(healthy: tuple[str, FakeServerConfig]) -> None:
    url, _ = healthy
    [result] = run_bench(url)
    assert not any(key.startswith("spec_decode") for key in result)
