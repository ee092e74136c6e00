"""`dsv32 eval gsm8k`: few-shot GSM8K accuracy of an OpenAI-compatible server, scored exactly as lm-eval's `gsm8k` task.

The lm-eval task (`lm_eval/tasks/gsm8k/gsm8k.yaml`) that users run with `--model local-completions`:
- prompt: `num_fewshot` train examples as "Question: {q}\\nAnswer: {full answer}" joined by "\\n\\n", then
  "Question: {q}\\nAnswer:"; the shots are drawn per test question with random.Random(1234).sample(train, k);
- greedy generation (temperature 0) of at most 256 tokens, stopped at "Question:", "</s>", "<|im_end|>";
- two filters: `strict-match` takes the first "#### (-?[0-9.,]+)", `flexible-extract` the last
  "(-?[$0-9.,]{2,})|(-?[0-9]+)"; no match gives "[invalid]";
- `exact_match` against the gold answer after deleting ",", "$", everything up to "#### " and a final ".", ignoring
  case; stderr of the mean is the sample standard deviation / sqrt(n).
`--chat` sends the same shots as alternating user / assistant messages to /v1/chat/completions (lm-eval's
`--apply_chat_template --fewshot_as_multiturn`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass
from typing import Any

import httpx

from dsv32.bench.serve import api_root
from dsv32.eval.client import gather_limited, model_to_ask, post_for_choice

TASK_VERSION = 3
FEWSHOT_SEED = 1234
REQUEST_SEED = 1234
MAX_GEN_TOKS = 256
STOP_SEQUENCES = ("Question:", "</s>", "<|im_end|>")
INVALID = "[invalid]"
STRICT_PATTERN = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE_PATTERN = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
# lm-eval's `regexes_to_ignore`, applied in this order to prediction and reference before comparing.
IGNORED_PATTERNS = (re.compile(","), re.compile(r"\$"), re.compile(r"(?s).*#### "), re.compile(r"\.$"))
FILTERS = ("flexible-extract", "strict-match")


@dataclass(frozen=True)
class Problem:
    """One GSM8K record: the question and the reference solution ending in "#### <number>"."""

    question: str
    answer: str


def load_problems(path: str) -> list[Problem]:
    """Read GSM8K JSONL ({"question", "answer"} per line)."""
    problems = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                problems.append(Problem(str(record["question"]), str(record["answer"])))
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"{path}:{number}: not a GSM8K record with question and answer") from None
    if not problems:
        raise ValueError(f"{path}: no GSM8K records")
    return problems


def question_text(problem: Problem) -> str:
    return f"Question: {problem.question}\nAnswer:"


def completion_prompt(problem: Problem, shots: list[Problem]) -> str:
    """lm-eval's few-shot context: each shot's question, " " and its full answer, blocks joined by a blank line."""
    examples = "".join(f"{question_text(shot)} {shot.answer}\n\n" for shot in shots)
    return examples + question_text(problem)


def chat_messages(problem: Problem, shots: list[Problem]) -> list[dict[str, str]]:
    """The same shots as a multi-turn conversation, ending on the test question."""
    messages = []
    for shot in shots:
        messages.append({"role": "user", "content": question_text(shot)})
        messages.append({"role": "assistant", "content": shot.answer})
    messages.append({"role": "user", "content": question_text(problem)})
    return messages


def draw_fewshot(train: list[Problem], count: int, num_problems: int, seed: int = FEWSHOT_SEED) -> list[list[Problem]]:
    """Shots for each test problem in order, from one seeded generator (lm-eval's sampler on a separate split)."""
    if count > len(train):
        raise ValueError(f"--num-fewshot {count} is more than the {len(train)} few-shot examples available")
    rng = random.Random(seed)
    return [rng.sample(train, count) for _ in range(num_problems)]


def _regex_filter(pattern: re.Pattern[str], text: str, group_select: int) -> str:
    """lm-eval's `regex` filter: the selected match; of a multi-group match, its first non-empty group."""
    matches = pattern.findall(text)
    if not matches:
        return INVALID
    match = matches[group_select]
    if isinstance(match, tuple):
        groups = [group for group in match if group]
        match = groups[0] if groups else INVALID
    return match.strip()


def extract_strict(text: str) -> str:
    """`strict-match`: the number after the first "#### "."""
    return _regex_filter(STRICT_PATTERN, text, 0)


def extract_flexible(text: str) -> str:
    """`flexible-extract`: the last number-like token of the text."""
    return _regex_filter(FLEXIBLE_PATTERN, text, -1)


def normalize(text: str) -> str:
    for pattern in IGNORED_PATTERNS:
        text = pattern.sub("", text)
    return text.lower()


def exact_match(prediction: str, reference: str) -> bool:
    """lm-eval's exact_match with the gsm8k task's options (regexes_to_ignore, ignore_case)."""
    return normalize(prediction) == normalize(reference)


def truncate_at_stop(text: str, stops: tuple[str, ...] = STOP_SEQUENCES) -> str:
    """Cut the completion at the first stop sequence (in case the server returned it)."""
    cut = min((index for stop in stops if (index := text.find(stop)) >= 0), default=len(text))
    return text[:cut]


@dataclass(frozen=True)
class Score:
    value: float
    stderr: float


def mean_with_stderr(hits: list[bool]) -> Score:
    """Mean and lm-eval's stderr of the mean (sample standard deviation / sqrt(n))."""
    n = len(hits)
    mean = sum(hits) / n
    if n < 2:
        return Score(mean, 0.0)
    variance = sum((hit - mean) ** 2 for hit in hits) / (n - 1)
    return Score(mean, math.sqrt(variance / n))


def score_responses(problems: list[Problem], responses: list[str]) -> dict[str, Score]:
    """exact_match of both filters over the responses, keyed by filter name."""
    extractors = {"flexible-extract": extract_flexible, "strict-match": extract_strict}
    return {
        name: mean_with_stderr([exact_match(extract(r), p.answer) for p, r in zip(problems, responses, strict=True)])
        for name, extract in extractors.items()
    }


def format_table(scores: dict[str, Score], num_fewshot: int) -> str:
    """The results table lm-eval prints for the task."""
    lines = [
        "|Tasks|Version|     Filter     |n-shot|  Metric   |   |Value |   |Stderr|",
        "|-----|------:|----------------|-----:|-----------|---|-----:|---|-----:|",
    ]
    for index, name in enumerate(FILTERS):
        task, version = ("gsm8k", str(TASK_VERSION)) if index == 0 else ("", "")
        score = scores[name]
        value = f"{score.value:.4f}|±  |{score.stderr:.4f}"
        lines.append(f"|{task:<5}|{version:>7}|{name:<16}|{num_fewshot:>6}|exact_match|↑  |{value}|")
    return "\n".join(lines)


@dataclass(frozen=True)
class EvalSettings:
    url: str
    model: str
    chat: bool
    max_tokens: int


def _request_body(settings: EvalSettings, problem: Problem, shots: list[Problem]) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": settings.model,
        "max_tokens": settings.max_tokens,
        "temperature": 0.0,
        "stop": list(STOP_SEQUENCES),
        "seed": REQUEST_SEED,
    }
    if settings.chat:
        body["messages"] = chat_messages(problem, shots)
    else:
        body["prompt"] = completion_prompt(problem, shots)
    return body


async def _generate(client: httpx.AsyncClient, settings: EvalSettings, body: dict[str, Any]) -> tuple[str, int]:
    """The answer text and its completion token count."""
    payload = await post_for_choice(client, settings.url, body)
    choice = payload["choices"][0]
    try:
        text = (choice["message"].get("content") if settings.chat else choice["text"]) or ""
    except (KeyError, TypeError, AttributeError):
        raise ValueError(f"{settings.url} sent a choice without its text: {str(choice)[:300]}") from None
    usage = payload.get("usage") or {}
    return text, int(usage.get("completion_tokens") or 0)


@dataclass
class EvalRun:
    scores: dict[str, Score]
    responses: list[str]
    duration_s: float
    output_tokens: int


async def evaluate(
    base_url: str,
    model: str | None,
    problems: list[Problem],
    train: list[Problem],
    num_fewshot: int = 5,
    num_concurrent: int = 1,
    chat: bool = False,
    max_tokens: int = MAX_GEN_TOKS,
    show_progress: bool = True,
) -> EvalRun:
    """Ask the server every problem (at most `num_concurrent` at once) and score the answers."""
    root = api_root(base_url)
    shots = draw_fewshot(train, num_fewshot, len(problems))
    limits = httpx.Limits(max_connections=num_concurrent)
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0), limits=limits) as client:
        model = await model_to_ask(client, root, model, timeout_s=30.0)
        endpoint = "/v1/chat/completions" if chat else "/v1/completions"
        settings = EvalSettings(root + endpoint, model, chat, max_tokens)
        start = time.perf_counter()
        answers = await gather_limited(
            list(zip(problems, shots, strict=True)),
            lambda pair: _generate(client, settings, _request_body(settings, *pair)),
            num_concurrent,
            "gsm8k",
            show_progress,
        )
        duration = time.perf_counter() - start
    responses = [truncate_at_stop(text) for text, _ in answers]
    return EvalRun(score_responses(problems, responses), responses, duration, sum(n for _, n in answers))


def _fewshot_path(args: argparse.Namespace) -> str:
    if args.fewshot_data:
        return args.fewshot_data
    beside = os.path.join(os.path.dirname(os.path.abspath(args.data)), "train.jsonl")
    if not os.path.isfile(beside):
        raise ValueError(f"no few-shot examples: put train.jsonl beside {args.data} or pass --fewshot-data")
    return beside


def add_eval_gsm8k_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `dsv32 eval gsm8k`."""
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (a trailing /v1 is fine)")
    parser.add_argument("--model", default=None, help="model name to request (default: the first of /v1/models)")
    parser.add_argument(
        "--data", default=None, help="GSM8K test split as JSONL (e.g. gsm8k/test.jsonl; no hub download is made)"
    )
    parser.add_argument("--fewshot-data", default=None, help="few-shot pool JSONL (default: train.jsonl beside --data)")
    parser.add_argument("--num-fewshot", type=int, default=5)
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N problems")
    parser.add_argument("--num-concurrent", type=int, default=1, help="requests in flight at once")
    parser.add_argument("--chat", action="store_true", help="use /v1/chat/completions with multi-turn shots")
    parser.add_argument("--max-gen-toks", type=int, default=MAX_GEN_TOKS)
    parser.add_argument("--output", default=None, metavar="FILE.json", help="save scores and every response")
    parser.add_argument("--disable-tqdm", action="store_true")


def run_eval_gsm8k(args: argparse.Namespace) -> int:
    """Run the eval from parsed flags, print lm-eval's table; bad input prints one line and returns 1."""
    try:
        if args.data is None:
            raise ValueError("--data is required: the GSM8K test split as JSONL (e.g. .../gsm8k/test.jsonl)")
        if args.num_fewshot < 0 or args.num_concurrent < 1 or args.max_gen_toks < 1:
            raise ValueError("--num-fewshot must be >= 0, --num-concurrent and --max-gen-toks >= 1")
        if args.limit is not None and args.limit < 1:
            raise ValueError("--limit must be at least 1")
        problems = load_problems(args.data)[: args.limit]
        train = load_problems(_fewshot_path(args)) if args.num_fewshot else []
        run = asyncio.run(
            evaluate(
                args.base_url,
                args.model,
                problems,
                train,
                num_fewshot=args.num_fewshot,
                num_concurrent=args.num_concurrent,
                chat=args.chat,
                max_tokens=args.max_gen_toks,
                show_progress=not args.disable_tqdm,
            )
        )
        endpoint = "local-chat-completions" if args.chat else "local-completions"
        print(f"{endpoint} (base_url={args.base_url}), limit: {args.limit}, num_fewshot: {args.num_fewshot}")
        print(format_table(run.scores, args.num_fewshot))
        print(
            f"Problems: {len(problems)}  Latency: {run.duration_s:.3f} s  "
            f"Output throughput: {run.output_tokens / run.duration_s:.3f} token/s"
        )
        if args.output:
            _save(args.output, args, problems, run)
            print(f"Saved {args.output}")
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


def _save(path: str, args: argparse.Namespace, problems: list[Problem], run: EvalRun) -> None:
    samples = [
        {
            "question": p.question,
            "target": p.answer,
            "response": r,
            "strict-match": extract_strict(r),
            "flexible-extract": extract_flexible(r),
        }
        for p, r in zip(problems, run.responses, strict=True)
    ]
    results = {name: {"exact_match": s.value, "exact_match_stderr": s.stderr} for name, s in run.scores.items()}
    config = {"num_fewshot": args.num_fewshot, "limit": args.limit, "chat": args.chat, "model": args.model}
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"task": "gsm8k", "config": config, "results": results, "samples": samples}, f, indent=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dsv32 eval gsm8k", description=__doc__.split("\n")[0])
    add_eval_gsm8k_arguments(parser)
    return run_eval_gsm8k(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
