"""``dsv32 train-demo`` on the toy config: a few steps through both DSA stages lower the loss, balance the router
and export a checkpoint with its loss curve; bad flags are a one-line error."""

from __future__ import annotations

import argparse

import pytest
import torch
from safetensors import safe_open

from dsv32.cli import main
from dsv32.train.demo import add_train_demo_arguments, learning_rate, train


def _args(tmp_path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_train_demo_arguments(parser)
    return parser.parse_args(["--config", "toy", "--output", str(tmp_path / "out"), "--corpus-size", "200",
                              "--tasks", "arithmetic,chat", "--batch-tokens", "1024", "--lr", "1e-2",
                              "--bias-update-rate", "0.01", *extra])


@pytest.mark.parametrize("precision", [[], ["--bf16"]], ids=["fp32", "bf16"])
def test_a_few_toy_steps_lower_the_loss_and_export(tmp_path, precision: list[str]) -> None:
    result = train(_args(tmp_path, "--steps", "24", "--dense-share", "0.5", *precision), progress=False)
    history = result.history
    assert result.steps == 24 and len(history) == 24
    first = sum(h["lm"] for h in history[:3]) / 3
    last = sum(h["lm"] for h in history[-3:]) / 3
    assert last < 0.8 * first
    assert history[-1]["mtp"] < history[0]["mtp"]
    assert [h["sparse"] for h in history] == [0.0] * 12 + [1.0] * 12  # dense warm-up, then sparse
    assert all(h["indexer_kl"] > 0 for h in history)
    out = result.output
    assert (out / "loss_curve.png").stat().st_size > 0 and (out / "training_history.json").is_file()
    with safe_open(str(out / "model.safetensors"), framework="pt") as fh:
        bias = fh.get_tensor("model.layers.1.mlp.gate.e_score_correction_bias")
    assert bias.abs().max() > 0 and torch.isclose(bias.abs().max(), bias.abs().max().round(decimals=2))


def test_the_minutes_budget_stops_training(tmp_path) -> None:
    result = train(_args(tmp_path, "--steps", "1000", "--minutes", "0.001"), progress=False)
    assert result.steps < 1000


def test_learning_rate_warms_up_then_decays_to_a_tenth() -> None:
    assert learning_rate(1.0, 0.0) < learning_rate(1.0, 0.02) < learning_rate(1.0, 0.03) == pytest.approx(1.0)
    assert learning_rate(1.0, 0.5) < 1.0 and learning_rate(1.0, 1.0) == pytest.approx(0.1)


@pytest.mark.parametrize(("flags", "message"), [
    (["--steps", "0"], "--steps must be positive"),
    (["--minutes", "-1"], "--minutes must be positive"),
    (["--tasks", "arithmetic,poetry"], "unknown task(s) poetry"),
    (["--dense-share", "2"], "--dense-share must be in [0, 1]"),
])
def test_bad_flags_are_a_one_line_error(flags: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train-demo", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
