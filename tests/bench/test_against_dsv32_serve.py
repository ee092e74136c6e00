"""`bench serve` and `eval gsm8k` end to end against a real `dsv32 serve` process (tiny model, random weights)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from dsv32.bench import serve
from dsv32.eval import gsm8k
from tests.server.conftest import ServerProcess, start_server

from .helpers import run_bench
from .test_serve import VLLM_RESULT_KEYS

pytestmark = pytest.mark.e2e

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "gsm8k_sample.jsonl"


@pytest.fixture(scope="module")
def dsv32_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = start_server(tmp_path_factory.mktemp("bench-serve"), "--served-model-name", "tiny")
    yield server
    assert server.stop() == 0


@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
def test_bench_completes_without_failures(dsv32_server: ServerProcess, endpoint: str) -> None:
    (result,) = run_bench(dsv32_server.base_url, "--model", "tiny", "--endpoint", endpoint, "--max-concurrency", "3",
                          "--ignore-eos")
    assert result["failed"] == 0 and result["completed"] == 6, result.get("errors")
    assert VLLM_RESULT_KEYS <= set(result)
    assert result["total_output_tokens"] == 6 * 4  # ignore_eos: exactly --random-output-len each, per usage
    # input tokens come from usage.prompt_tokens: the completions endpoint adds BOS to the 16-token prompt (as vLLM
    # does for DeepSeek's tokenizer); the chat endpoint wraps it in the chat template
    if endpoint == "/v1/completions":
        assert result["total_input_tokens"] == 6 * (16 + 1)
    else:
        assert result["total_input_tokens"] > 6 * (16 + 1)
    assert result["mean_ttft_ms"] > 0 and result["mean_tpot_ms"] > 0 and result["duration"] > 0


def test_sweep_writes_table_plot_and_json(dsv32_server: ServerProcess, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    plot = tmp_path / "sweep.png"
    code = serve.main(["--base-url", dsv32_server.base_url, "--model", "tiny", "--num-prompts", "4",
                       "--random-input-len", "16", "--random-output-len", "3", "--concurrency-sweep", "1,4",
                       "--gpu-hourly-cost", "2.0", "--num-gpus", "1", "--plot", str(plot), "--save-result",
                       "--result-dir", str(tmp_path), "--result-filename", "run.json", "--disable-tqdm"])
    out = capsys.readouterr().out
    assert code == 0
    assert [line.split(" | ")[0] for line in out.splitlines() if line.startswith("| ")][1:] == ["| 1", "| 4"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for level in (1, 4):
        saved = json.loads((tmp_path / f"run-concurrency{level}.json").read_text())
        assert saved["completed"] == 4 and saved["failed"] == 0


@pytest.mark.parametrize("chat", [False, True])
def test_gsm8k_runs_end_to_end(dsv32_server: ServerProcess, chat: bool, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "gsm8k.json"
    flags = ["--base-url", f"{dsv32_server.base_url}/v1", "--model", "tiny", "--data", str(SAMPLE),
             "--fewshot-data", str(SAMPLE), "--num-fewshot", "2", "--limit", "3", "--max-gen-toks", "8",
             "--num-concurrent", "3", "--disable-tqdm", "--output", str(output)] + (["--chat"] if chat else [])
    assert gsm8k.main(flags) == 0
    assert "|gsm8k|" in capsys.readouterr().out
    saved = json.loads(output.read_text())
    assert len(saved["samples"]) == 3
    # random weights score whatever they score; what matters is that every problem got a real generation
    assert all(0.0 <= saved["results"][f]["exact_match"] <= 1.0 for f in ("strict-match", "flexible-extract"))
    assert all(sample["response"] for sample in saved["samples"])
