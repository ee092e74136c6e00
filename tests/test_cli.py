"""The `dsv32` console script: subcommands, vLLM-named serve flags mapped onto the configs, help and errors."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import pytest

from dsv32.cli import DUMMY_DEFAULT_MAX_TOKENS, build_parser, engine_config_from_args, main, server_config_from_args
from dsv32.config import EngineConfig, StructuredOutputsConfig
from dsv32.server.settings import ServerConfig


def parse(*argv: str):
    return build_parser(argv).parse_args(argv)


def test_serve_defaults_to_the_demo_model_on_localhost_8000() -> None:
    args = parse("serve")
    assert (args.model, args.host, args.port) == ("demo", "127.0.0.1", 8000)
    engine = engine_config_from_args(args)
    server = server_config_from_args(args)
    assert engine.model == "demo" and engine.enable_prefix_caching is True and engine.max_model_len is None
    assert server.served_model_names == ("demo",) and server.model_name == "demo"
    assert server.reasoning_parser == "deepseek_v3" and server.tool_call_parser == "deepseek_v32"
    assert server.api_key is None and server.log_requests is False


def test_serve_defaults_are_the_config_dataclasses_defaults() -> None:
    args = parse("serve")
    engine, server = engine_config_from_args(args), server_config_from_args(args)
    defaults = EngineConfig()
    assert engine == replace(defaults, served_model_name=None)
    # The demo model is trained: no bounded default for max_tokens (the random-weights preset gets one).
    assert server == ServerConfig()
    tiny = parse("serve", "tiny")
    assert server_config_from_args(tiny) == replace(ServerConfig(), served_model_names=("tiny",), model_path="tiny",
                                                     default_max_tokens=DUMMY_DEFAULT_MAX_TOKENS)


def test_serve_flags_map_onto_engine_and_server_config() -> None:
    args = parse("serve", "/models/v32", "--host", "0.0.0.0", "--port", "9001", "--served-model-name", "ds", "alias",
                 "--dtype", "float32", "--max-model-len", "32k", "--max-num-seqs", "8", "--max-num-batched-tokens",
                 "512", "--kv-cache-dtype", "fp8", "--no-enable-prefix-caching", "--seed", "7", "--api-key", "k",
                 "--reasoning-parser", "deepseek-v3", "--tool-call-parser", "deepseekv32", "--load-format", "dummy",
                 "--max-waiting-requests", "4", "--block-size", "32", "--log-requests", "--max-logprobs", "5",
                 "--tokenizer-mode", "deepseek_v32", "--enable-auto-tool-choice", "--trust-remote-code",
                 "--structured-outputs-config", '{"backend": "xgrammar", "max_whitespace": 4}')
    engine = engine_config_from_args(args)
    server = server_config_from_args(args)
    assert (server.host, server.port) == ("0.0.0.0", 9001)
    assert engine.model == "/models/v32" and engine.served_model_name == "ds"
    assert engine.dtype == "float32" and engine.max_model_len == 32000 and engine.max_num_seqs == 8
    assert engine.max_num_batched_tokens == 512 and engine.kv_cache_dtype == "fp8"
    assert engine.enable_prefix_caching is False and engine.seed == 7 and engine.load_format == "dummy"
    assert engine.max_waiting_requests == 4 and engine.block_size == 32 and engine.max_logprobs == 5
    assert engine.structured_outputs_config == StructuredOutputsConfig(backend="xgrammar", max_whitespace=4)
    # SGLang's parser spellings map onto vLLM's.
    assert server.served_model_names == ("ds", "alias") and server.model_path == "/models/v32"
    assert server.reasoning_parser == "deepseek_v3" and server.tool_call_parser == "deepseek_v32"
    assert server.api_key == "k" and server.log_requests


def test_api_key_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DSV32_API_KEY", "from-env")
    assert server_config_from_args(parse("serve")).api_key == "from-env"
    assert server_config_from_args(parse("serve", "--api-key", "flag")).api_key == "flag"


@pytest.mark.parametrize("argv", [
    ("serve", "--dtype", "int3"),
    ("serve", "--max-num-seqs", "0"),
    ("serve", "--max-model-len", "lots"),
    ("serve", "--reasoning-parser", "qwen3"),
    ("bench",),
    ("frobnicate",),
])
def test_bad_flags_exit_with_usage_error(argv: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parse(*argv)
    assert exited.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_inconsistent_engine_config_is_reported_not_raised(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--gpu-memory-utilization", "1.5"]) == 2
    assert "--gpu-memory-utilization" in capsys.readouterr().err
    assert main(["serve", "--structured-outputs-config", '{"backend": "outlines"}']) == 2
    assert "backend 'outlines'" in capsys.readouterr().err
    assert main(["serve", "--structured-outputs-config", "{bad"]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_speculative_decoding_flags_in_vllm_and_sglang_form() -> None:
    vllm = engine_config_from_args(parse("serve", "--speculative-config",
                                         '{"method": "deepseek_mtp", "num_speculative_tokens": 2}'))
    sglang = engine_config_from_args(parse("serve", "--speculative-algorithm", "EAGLE", "--speculative-num-steps", "2",
                                           "--speculative-eagle-topk", "1", "--speculative-num-draft-tokens", "3"))
    assert vllm.speculative_config == sglang.speculative_config
    assert vllm.speculative_config.method == "mtp" and vllm.num_speculative_tokens == 2
    assert engine_config_from_args(parse("serve")).speculative_config is None


@pytest.mark.parametrize(("argv", "message"), [
    (("--speculative-config", "{nope"), "not valid JSON"),
    (("--speculative-config", '{"method": "ngram", "num_speculative_tokens": 2}'), "'method'"),
    (("--speculative-config", '{"method": "mtp"}'), "'num_speculative_tokens'"),
    (("--speculative-config", '{"method": "mtp", "num_speculative_tokens": 0}'), "'num_speculative_tokens'"),
    (("--speculative-algorithm", "EAGLE", "--speculative-num-steps", "2", "--speculative-eagle-topk", "4"),
     "--speculative-eagle-topk"),
    (("--speculative-algorithm", "EAGLE", "--speculative-num-steps", "2", "--speculative-num-draft-tokens", "5"),
     "--speculative-num-draft-tokens"),
    (("--speculative-algorithm", "MEDUSA", "--speculative-num-steps", "2"), "--speculative-algorithm"),
    (("--speculative-num-steps", "2"), "--speculative-algorithm"),
])
def test_bad_speculative_flags_are_one_line_errors(argv, message, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bench_and_eval_subcommands_are_wired_lazily() -> None:
    from dsv32.bench.serve import run_bench_serve
    from dsv32.eval.demo import run_eval_demo
    from dsv32.eval.gsm8k import run_eval_gsm8k

    assert parse("bench", "serve").handler is run_bench_serve
    assert parse("eval", "gsm8k").handler is run_eval_gsm8k
    assert parse("eval", "demo").handler is run_eval_demo


def test_chat_subcommand_flags() -> None:
    args = parse("chat", "--url", "http://h:1", "--no-thinking", "--max-tokens", "64")
    assert (args.url, args.thinking, args.max_tokens) == ("http://h:1", False, 64)


def test_run_batch_takes_the_engine_and_api_flags_with_the_demo_model_by_default() -> None:
    args = parse("run-batch", "-i", "in.jsonl", "-o", "out.jsonl")
    assert (args.input_file, args.output_file, args.model, args.progress) == ("in.jsonl", "out.jsonl", "demo", True)
    args = parse("run-batch", "-i", "a", "-o", "b", "--model", "/models/v32", "--max-num-seqs", "128",
                 "--served-model-name", "ds", "--reasoning-parser", "none")
    engine, server = engine_config_from_args(args), server_config_from_args(args)
    assert engine.model == "/models/v32" and engine.max_num_seqs == 128
    assert server.served_model_names == ("ds",) and server.reasoning_parser == "none" and server.api_key is None


@pytest.mark.parametrize("argv", [[], ["serve"], ["run-batch"], ["chat"], ["bench", "serve"], ["eval", "gsm8k"],
                                  ["eval", "demo"]])
def test_help_is_available_for_every_subcommand(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([*argv, "--help"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.startswith("usage: dsv32")


@pytest.mark.e2e
def test_console_script_runs() -> None:
    result = subprocess.run([sys.executable, "-m", "dsv32.cli", "serve", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--max-num-batched-tokens" in result.stdout and "--tool-call-parser" in result.stdout


@pytest.mark.e2e
def test_missing_checkpoint_is_a_clear_error(caplog: pytest.LogCaptureFixture, tmp_path) -> None:
    assert main(["serve", str(tmp_path / "no-such-model")]) == 1
    assert "cannot load" in caplog.text and "config.json" in caplog.text
