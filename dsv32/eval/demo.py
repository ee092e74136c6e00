"""`dsv32 eval demo`: held-out accuracy of the demo model's skills (issue 25) on any OpenAI-compatible server.

Every prompt is drawn, reproducibly from ``--seed``, from what ``dsv32.train.corpus`` keeps out of training, and
sent to /v1/chat/completions (not streamed) at temperature 0; each category's accuracy comes with a 95% confidence
interval:

* ``arithmetic``: "What is A + B?" for distinct held-out two-digit pairs (``held_out_pair``) with
  ``chat_template_kwargs: {"thinking": true}``, at most 256 tokens (the issue's acceptance check). Right when the
  sum appears as a whole number in the content, the final answer: the reasoning does not count, nor what precedes a
  ``</think>`` left in the content by a server that does not split the reasoning off.
* ``tools``: "What's the weather like in CITY?" for distinct held-out cities (``HELD_OUT_CITIES``: 30, so at most 30
  prompts) with the tools ``get_weather`` and ``calculator`` exactly as the corpus defines them, no ``tool_choice``,
  at most 96 tokens (the acceptance check). Right when the first tool call is ``get_weather`` with arguments exactly
  ``{"city": CITY}``; ``tool name`` counts the calls that only name the right tool.
* ``json``: the corpus' own held-out JSON requests (a schema in ``response_format`` json_schema; thinking on in some),
  at most 256 tokens, asked twice. ``json`` is without a grammar, ``json+grammar`` with ``response_format``
  json_schema ``strict: true``, which servers enforce by constrained decoding. Right when the content parses as JSON
  and validates against the schema (``jsonschema``); ``exact value`` also asks for the expected value.

Without a grammar, the schema must reach the model only through the prompt. V3.2's encoder renders
``response_format``'s schema into the system prompt (``## Response Format: ...``, ``dsv32.encoding.encode``), which
is how the corpus shows it, and every server that takes ``response_format`` (dsv32, vLLM, SGLang, OpenAI) also
enforces it: no request field renders it without enforcing it. So the no-grammar request drops ``response_format``
and sends that same text as a plain system message: on dsv32 the prompt is byte for byte the one the
``response_format`` request renders; on any other server the model reads the schema as an instruction.

Accuracy intervals are Wilson score intervals (95%, z = 1.96): unlike the normal approximation they stay inside
[0, 1] and are not zero-width at 0 or n hits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
import jsonschema

from dsv32.bench.serve import server_root
from dsv32.encoding.encode import RESPONSE_FORMAT_TEMPLATE, THINK_END, to_json
from dsv32.eval.client import gather_limited, model_to_ask, post_for_choice
from dsv32.train.corpus import CALCULATOR, GET_WEATHER, HELD_OUT_CITIES, examples, held_out_pair

TASKS = ("arithmetic", "tools", "json")
MAX_TOKENS = {"arithmetic": 256, "tools": 96, "json": 256, "json+grammar": 256}
# Per category: (score key, label); the first is the category's accuracy.
METRICS = {
    "arithmetic": (("correct", "sum in answer"),),
    "tools": (("correct", "tool + arguments"), ("right_tool", "tool name")),
    "json": (("correct", "schema-valid"), ("exact_value", "exact value")),
    "json+grammar": (("correct", "schema-valid"), ("exact_value", "exact value")),
}
HELD_OUT_PAIRS = tuple((a, b) for a in range(10, 100) for b in range(10, 100) if held_out_pair(a, b))
Z_95 = 1.959963984540054

Item = TypeVar("Item")


class UsageError(ValueError):
    """A bad flag: reported in one line with exit status 2, as argparse does."""


@dataclass(frozen=True)
class Case:
    """One prompt: its chat request fields (no model or sampling fields) and what a right answer holds."""

    category: str
    request: dict[str, Any]
    expected: dict[str, Any]


def seeded_order(items: Sequence[Item], seed: int) -> list[Item]:
    """``items`` shuffled by ``seed``: a draw of n is the first n, so a smaller run asks a subset of a larger one."""
    return random.Random(seed).sample(items, len(items))


def arithmetic_cases(count: int, seed: int) -> list[Case]:
    """``count`` distinct held-out sums of two two-digit numbers, asked with thinking on."""
    pairs = seeded_order(HELD_OUT_PAIRS, seed)[:count]
    return [Case("arithmetic", {"messages": [{"role": "user", "content": f"What is {a} + {b}?"}],
                                "chat_template_kwargs": {"thinking": True}}, {"answer": str(a + b)})
            for a, b in pairs]


def tools_cases(count: int, seed: int) -> list[Case]:
    """Weather questions about ``count`` distinct held-out cities (at most all of them), the acceptance check's
    tools, no ``tool_choice``."""
    cities = seeded_order(HELD_OUT_CITIES, seed)[:count]
    return [Case("tools", {"messages": [{"role": "user", "content": f"What's the weather like in {city}?"}],
                           "tools": [GET_WEATHER, CALCULATOR]},
                 {"tool_call": {"name": "get_weather", "arguments": {"city": city}}})
            for city in cities]


def schema_as_instruction(request: dict[str, Any]) -> dict[str, Any]:
    """The request without ``response_format``, its schema in a system message as V3.2's encoder renders it (the
    encoder puts "\\n\\n" and the template after the system message's content, empty here: the corpus' JSON requests
    have no system message)."""
    fields = {key: value for key, value in request.items() if key != "response_format"}
    schema = request["response_format"]["json_schema"]["schema"]
    instruction = "\n\n" + RESPONSE_FORMAT_TEMPLATE.format(schema=to_json(schema))
    fields["messages"] = [{"role": "system", "content": instruction}, *request["messages"]]
    return fields


def with_strict_schema(request: dict[str, Any]) -> dict[str, Any]:
    """The request with its ``response_format`` json_schema marked ``strict`` (enforced by constrained decoding)."""
    response_format = request["response_format"]
    return {**request, "response_format": {**response_format,
                                           "json_schema": {**response_format["json_schema"], "strict": True}}}


def json_cases(count: int, seed: int) -> list[Case]:
    """``count`` held-out JSON requests of the corpus, each asked without a grammar and with one."""
    drawn = list(examples(count, seed, split="heldout", tasks=("json",)))
    return ([Case("json", schema_as_instruction(example.request), example.expected) for example in drawn]
            + [Case("json+grammar", with_strict_schema(example.request), example.expected) for example in drawn])


CASE_MAKERS: dict[str, Callable[[int, int], list[Case]]] = {
    "arithmetic": arithmetic_cases, "tools": tools_cases, "json": json_cases}


def answer_text(message: dict[str, Any]) -> str:
    """The final answer: the content, after a ``</think>`` if a server left the reasoning in it."""
    content = message.get("content")
    return content.rsplit(THINK_END, 1)[-1] if isinstance(content, str) else ""


def score_arithmetic(message: dict[str, Any], expected: dict[str, Any]) -> dict[str, bool]:
    """Right when the sum appears in the answer as a whole number (not inside 1234 or 123.5)."""
    pattern = rf"(?<![\d.]){re.escape(expected['answer'])}(?!\.?\d)"
    return {"correct": re.search(pattern, answer_text(message)) is not None}


def score_tools(message: dict[str, Any], expected: dict[str, Any]) -> dict[str, bool]:
    """The first tool call: the right name, and the right name with exactly the expected arguments."""
    calls = message.get("tool_calls")
    first = calls[0] if isinstance(calls, list) and calls else None
    function = first.get("function") if isinstance(first, dict) else None
    if not isinstance(function, dict):
        return {"correct": False, "right_tool": False}
    right_tool = function.get("name") == expected["tool_call"]["name"]
    try:
        arguments = json.loads(function.get("arguments"))
    except (TypeError, ValueError):
        return {"correct": False, "right_tool": right_tool}
    return {"correct": right_tool and arguments == expected["tool_call"]["arguments"], "right_tool": right_tool}


def score_json(message: dict[str, Any], expected: dict[str, Any]) -> dict[str, bool]:
    """Valid: the answer parses as JSON that validates against the schema; exact: and it is the expected value."""
    try:
        value = json.loads(answer_text(message))
    except ValueError:
        return {"correct": False, "exact_value": False}
    schema = expected["schema"]
    valid = jsonschema.validators.validator_for(schema)(schema).is_valid(value)
    return {"correct": valid, "exact_value": valid and value == expected["json"]}


SCORERS: dict[str, Callable[[dict[str, Any], dict[str, Any]], dict[str, bool]]] = {
    "arithmetic": score_arithmetic, "tools": score_tools, "json": score_json, "json+grammar": score_json}


def wilson_interval(hits: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion ``hits / n``."""
    p = hits / n
    denominator = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, center - half), min(1.0, center + half)


@dataclass(frozen=True)
class Accuracy:
    hits: int
    n: int

    @property
    def value(self) -> float:
        return self.hits / self.n

    @property
    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.hits, self.n)


@dataclass(frozen=True)
class Record:
    """One request and its scored answer."""

    case: Case
    body: dict[str, Any]
    message: dict[str, Any]
    finish_reason: str | None
    prompt_tokens: int  # equal for a JSON case with and without the grammar on dsv32 (the same prompt)
    completion_tokens: int
    scores: dict[str, bool]


def summarize(records: list[Record]) -> dict[str, dict[str, Accuracy]]:
    """Per category present, per metric: the hits over the category's records."""
    summary: dict[str, dict[str, Accuracy]] = {}
    for category, metrics in METRICS.items():
        scored = [record.scores for record in records if record.case.category == category]
        if scored:
            summary[category] = {key: Accuracy(sum(s[key] for s in scored), len(scored)) for key, _ in metrics}
    return summary


def format_table(summary: dict[str, dict[str, Accuracy]]) -> str:
    lines = ["|Category    |Metric          |   n|Accuracy|95% CI (Wilson)|",
             "|------------|----------------|---:|-------:|:-------------:|"]
    for category, accuracies in summary.items():
        for index, (key, label) in enumerate(METRICS[category]):
            accuracy = accuracies[key]
            low, high = accuracy.interval
            name = category if index == 0 else ""
            lines.append(f"|{name:<12}|{label:<16}|{accuracy.n:>4}|{accuracy.value:>8.4f}|"
                         f"{f'{low:.4f}-{high:.4f}':^15}|")
    return "\n".join(lines)


def request_body(case: Case, model: str, seed: int) -> dict[str, Any]:
    return {"model": model, **case.request, "temperature": 0.0, "max_tokens": MAX_TOKENS[case.category],
            "seed": seed}


async def _ask(client: httpx.AsyncClient, url: str, case: Case, body: dict[str, Any]) -> Record:
    payload = await post_for_choice(client, url, body)
    choice = payload["choices"][0]
    message = choice.get("message")
    if not isinstance(message, dict):
        raise ValueError(f"{url} sent a choice without a message: {str(choice)[:300]}")
    usage = payload.get("usage") or {}
    return Record(case, body, message, choice.get("finish_reason"), int(usage.get("prompt_tokens") or 0),
                  int(usage.get("completion_tokens") or 0), SCORERS[case.category](message, case.expected))


@dataclass
class EvalRun:
    model: str
    records: list[Record]
    duration_s: float


async def evaluate(root: str, model: str | None, cases: list[Case], seed: int, concurrency: int = 1,
                   ready_timeout_s: float = 30.0, show_progress: bool = True) -> EvalRun:
    """Ask the server every case (at most ``concurrency`` at once) and score the answers."""
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0), limits=limits) as client:
        model = await model_to_ask(client, root, model, ready_timeout_s)
        url = root + "/v1/chat/completions"
        start = time.perf_counter()
        records = await gather_limited(cases, lambda case: _ask(client, url, case, request_body(case, model, seed)),
                                       concurrency, "demo", show_progress)
        return EvalRun(model, records, time.perf_counter() - start)


def parse_tasks(text: str) -> tuple[str, ...]:
    tasks = tuple(dict.fromkeys(task.strip() for task in text.split(",") if task.strip()))
    unknown = [task for task in tasks if task not in TASKS]
    if unknown or not tasks:
        raise UsageError(f"--tasks: unknown task(s) {', '.join(unknown) or '(none given)'}; choose from "
                         f"{', '.join(TASKS)}")
    return tasks


def validate(args: argparse.Namespace) -> tuple[str, ...]:
    """The tasks asked for; bad flags raise ``UsageError``."""
    tasks = parse_tasks(args.tasks)
    if args.num_prompts < 1 or args.concurrency < 1:
        raise UsageError("--num-prompts and --concurrency must be at least 1")
    if "arithmetic" in tasks and args.num_prompts > len(HELD_OUT_PAIRS):
        raise UsageError(f"--num-prompts: arithmetic holds out {len(HELD_OUT_PAIRS)} pairs, asked for "
                         f"{args.num_prompts}")
    if args.ready_check_timeout_sec < 0:
        raise UsageError("--ready-check-timeout-sec must be >= 0")
    return tasks


def add_eval_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `dsv32 eval demo`."""
    parser.add_argument("--base-url", default=None, help="server root, e.g. http://127.0.0.1:8000 (else host/port)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model", default=None, help="model name to request (default: the first of /v1/models)")
    parser.add_argument("--tasks", default=",".join(TASKS),
                        help=f"comma-separated categories of {', '.join(TASKS)} (default all; json runs without "
                             "and with a grammar)")
    parser.add_argument("--num-prompts", type=int, default=50,
                        help=f"prompts per category (default 50; tools has {len(HELD_OUT_CITIES)} held-out cities "
                             "and asks each at most once)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out draw (and of every request)")
    parser.add_argument("--concurrency", type=int, default=1, help="requests in flight at once (default 1)")
    parser.add_argument("--ready-check-timeout-sec", type=float, default=30.0,
                        help="how long to wait for the server to answer /v1/models")
    parser.add_argument("--output", default=None, metavar="FILE.json", help="save the scores and every request")
    parser.add_argument("--disable-tqdm", action="store_true")


def run_eval_demo(args: argparse.Namespace) -> int:
    """Run the eval from parsed flags and print its table; a bad flag is one line and status 2, a failure (server,
    file) one line and status 1."""
    try:
        tasks = validate(args)
        cases = [case for task in tasks for case in CASE_MAKERS[task](args.num_prompts, args.seed)]
        root = server_root(args.base_url, args.host, args.port)
        run = asyncio.run(evaluate(root, args.model, cases, args.seed, args.concurrency,
                                   args.ready_check_timeout_sec, not args.disable_tqdm))
        summary = summarize(run.records)
        print(f"demo (base_url={root}, model={run.model}), seed: {args.seed}, tasks: {','.join(tasks)}")
        print(format_table(summary))
        output_tokens = sum(record.completion_tokens for record in run.records)
        print(f"Requests: {len(run.records)}  Latency: {run.duration_s:.3f} s  "
              f"Output throughput: {output_tokens / run.duration_s:.3f} token/s")
        if args.output:
            _save(args.output, args, root, tasks, run, summary)
            print(f"Saved {args.output}")
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


def _save(path: str, args: argparse.Namespace, root: str, tasks: tuple[str, ...], run: EvalRun,
          summary: dict[str, dict[str, Accuracy]]) -> None:
    results = {
        category: {key: {"accuracy": accuracy.value, "hits": accuracy.hits, "n": accuracy.n,
                         "ci95_wilson": list(accuracy.interval)} for key, accuracy in accuracies.items()}
        for category, accuracies in summary.items()}
    samples = [{"category": record.case.category, "request": record.body, "expected": record.case.expected,
                "response": record.message, "finish_reason": record.finish_reason,
                "prompt_tokens": record.prompt_tokens, "completion_tokens": record.completion_tokens,
                "scores": record.scores} for record in run.records]
    config = {"base_url": root, "model": run.model, "tasks": list(tasks), "num_prompts": args.num_prompts,
              "seed": args.seed, "concurrency": args.concurrency, "max_tokens": MAX_TOKENS}
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"task": "demo", "config": config, "results": results, "samples": samples}, f, indent=1,
                  ensure_ascii=False)
