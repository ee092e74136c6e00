"""GSM8K eval: lm-eval's prompt, both answer extractors and exact_match on fixed answers, and an end-to-end run.

tests/data/gsm8k_sample.jsonl holds the first 8 problems of the GSM8K test split (MIT License, (c) 2021 OpenAI).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from dsv32.eval import gsm8k
from tests.bench.fake_server import FakeServerConfig, running_server

SAMPLE = Path(__file__).parents[1] / "data" / "gsm8k_sample.jsonl"
GOLD_18 = "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\n#### 18"

# (model response, strict-match extraction, flexible-extract extraction, strict correct, flexible correct) vs "18".
CASES = [
    ("9 * 2 = $18 every day.\n#### 18", "18", "18", True, True),
    ("So she makes 18.", "[invalid]", "18.", False, True),
    ("She makes $18", "[invalid]", "$18", False, True),
    ("#### $18", "[invalid]", "$18", False, True),
    ("First 12 eggs, #### 12, then 18", "12,", "18", False, True),
    ("#### 18.00", "18.00", "18.00", False, False),
    ("It is 18 but #### 7", "7", "7", False, False),
    ("the answer is 8", "[invalid]", "8", False, False),
    ("no number at all", "[invalid]", "[invalid]", False, False),
]


@pytest.mark.parametrize(("response", "strict", "flexible", "strict_ok", "flexible_ok"), CASES)
def test_extractors_and_exact_match(
    response: str, strict: str, flexible: str, strict_ok: bool, flexible_ok: bool
) -> None:
    assert gsm8k.extract_strict(response) == strict
    assert gsm8k.extract_flexible(response) == flexible
    assert gsm8k.exact_match(strict, GOLD_18) is strict_ok
    assert gsm8k.exact_match(flexible, GOLD_18) is flexible_ok


def test_exact_match_normalization() -> None:
    assert gsm8k.exact_match("1,000", "so #### 1000")
    assert gsm8k.exact_match("-5", "#### -5")
    assert not gsm8k.exact_match("5", "#### -5")
    assert gsm8k.normalize("a #### $1,234.") == "1234"


def test_scores_and_stderr() -> None:
    problems = [gsm8k.Problem("q", GOLD_18)] * 4
    scores = gsm8k.score_responses(problems, ["#### 18", "18", "#### 18", "19"])
    assert scores["strict-match"].value == pytest.approx(0.5)
    assert scores["flexible-extract"].value == pytest.approx(0.75)
    # sample std of [1, 1, 1, 0] is 0.5 -> stderr 0.5 / sqrt(4)
    assert scores["flexible-extract"].stderr == pytest.approx(0.25)
    table = gsm8k.format_table(scores, 5).splitlines()
    assert table[2] == "|gsm8k|      3|flexible-extract|     5|exact_match|↑  |0.7500|±  |0.2500|"
    assert table[3].startswith("|     |       |strict-match    |     5|exact_match|↑  |0.5000|")


def test_fewshot_prompt_format() -> None:
    shots = [gsm8k.Problem("1+1?", "1+1=2\n#### 2"), gsm8k.Problem("2+2?", "#### 4")]
    prompt = gsm8k.completion_prompt(gsm8k.Problem("3+3?", "#### 6"), shots)
    assert (
        prompt == "Question: 1+1?\nAnswer: 1+1=2\n#### 2\n\nQuestion: 2+2?\nAnswer: #### 4\n\nQuestion: 3+3?\nAnswer:"
    )
    messages = gsm8k.chat_messages(gsm8k.Problem("3+3?", "#### 6"), shots)
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "user"]
    assert messages[1]["content"] == "1+1=2\n#### 2" and messages[-1]["content"] == "Question: 3+3?\nAnswer:"


def test_fewshot_draws_are_seeded_and_per_problem() -> None:
    train = gsm8k.load_problems(str(SAMPLE))
    draws = gsm8k.draw_fewshot(train, 3, 4)
    assert draws == gsm8k.draw_fewshot(train, 3, 4)
    assert all(len(set(shots)) == 3 for shots in draws)
    assert len({tuple(shots) for shots in draws}) > 1
    with pytest.raises(ValueError, match="more than the 8"):
        gsm8k.draw_fewshot(train, 9, 1)


def test_truncate_at_stop() -> None:
    assert gsm8k.truncate_at_stop("#### 18\n\nQuestion: next 7") == "#### 18\n\n"
    assert gsm8k.truncate_at_stop("plain") == "plain"


def scripted_answer(gold: dict[str, str]) -> Callable[[str], str]:
    """Answers the last question of a prompt: 4 correct with ####, 2 with a bare number, 1 wrong, 1 run-on."""
    order = list(gold)

    def answer(prompt: str) -> str:
        question = re.findall(r"Question: (.*?)\nAnswer:", prompt, flags=re.S)[-1]
        index = order.index(question)
        number = gold[question].split("#### ")[-1]
        if index < 4:
            return f" Let me think step by step.\n#### {number}"
        if index < 6:
            return f" So the answer is {number}."
        if index == 6:
            return " #### 999999"
        return f" It is {number}.\n#### {number}\n\nQuestion: what is 1 + 77?"

    return answer


@pytest.mark.parametrize("chat", [False, True])
def test_end_to_end_against_fake_server(chat: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    problems = gsm8k.load_problems(str(SAMPLE))
    config = FakeServerConfig(answer=scripted_answer({p.question: p.answer for p in problems}))
    output = tmp_path / "gsm8k.json"
    flags = ["--data", str(SAMPLE), "--fewshot-data", str(SAMPLE), "--num-concurrent", "4", "--disable-tqdm"]
    flags += ["--output", str(output)] + (["--chat"] if chat else [])
    with running_server(config) as url:
        code = gsm8k.main(["--base-url", f"{url}/v1", *flags])
    out = capsys.readouterr().out
    assert code == 0
    assert "|gsm8k|      3|flexible-extract|     5|exact_match|↑  |0.8750|" in out
    assert "|     |       |strict-match    |     5|exact_match|↑  |0.6250|" in out
    saved = json.loads(output.read_text())
    assert saved["results"]["strict-match"]["exact_match"] == pytest.approx(5 / 8)
    assert len(saved["samples"]) == 8
    body = config.requests[0]
    assert body["temperature"] == 0.0 and body["max_tokens"] == 256 and body["seed"] == 1234
    assert body["stop"] == ["Question:", "</s>", "<|im_end|>"]
    if chat:
        assert len(body["messages"]) == 11
    else:
        assert body["prompt"].count("Question: ") == 6 and body["prompt"].endswith("\nAnswer:")


def test_limit_and_zero_shot(capsys: pytest.CaptureFixture[str]) -> None:
    problems = gsm8k.load_problems(str(SAMPLE))
    config = FakeServerConfig(answer=scripted_answer({p.question: p.answer for p in problems}))
    with running_server(config) as url:
        code = gsm8k.main(["--base-url", url, "--data", str(SAMPLE), "--num-fewshot", "0", "--limit", "2"])
    out = capsys.readouterr().out
    assert code == 0 and "Problems: 2" in out
    assert len(config.requests) == 2 and config.requests[0]["prompt"].startswith("Question: Janet")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ([], "--data is required"),
        (["--data", "/nonexistent/test.jsonl", "--num-fewshot", "0"], "No such file"),
        (["--data", str(SAMPLE)], "train.jsonl beside"),
        (["--data", str(SAMPLE), "--num-concurrent", "0"], "--num-concurrent"),
    ],
)
def test_bad_input_is_one_line_error(flags: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = gsm8k.main(["--base-url", "http://127.0.0.1:9", *flags])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert err.startswith("error:") and message in err and "\n" not in err


def test_malformed_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "q", "answer": "#### 1"}\n{"question": "only"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        gsm8k.load_problems(str(path))
