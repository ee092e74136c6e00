"""Schemathesis over every route of a real `dsv32 serve`, from the server's own /openapi.json.

Three passes per operation, all deterministic (schemathesis's coverage phase enumerates boundary and type-violating
values; the fuzzing passes are derandomized hypothesis runs with a bounded number of examples):

* coverage: every boundary value schemathesis derives from the schema, valid and invalid;
* fuzzing: positive (schema-valid) and negative (schema-violating) bodies;
* fuzzing, repaired: schema-valid bodies for the generation routes with the conversation (or prompt) and the model
  name made acceptable, so the sampling, structured-output and tool fields get past the first validators and reach
  the engine.

Every answer must: not be a 5xx; arrive within the time limit; match the response schema where the OpenAPI document
declares one for its status (``response_schema_conformance``); and, for a 4xx, carry its API's error envelope
(OpenAI's; Anthropic's on ``/v1/messages``, Ollama's on ``/api``). After
all of it the server must still answer /health with 200 and a plain chat completion, with nothing left running in
the engine. Generations are kept short (``max_tokens`` / ``max_output_tokens`` / ``options.num_predict`` at most 4,
``n`` at most 2) so the run stays in budget; huge
values of those fields are tests/server/test_adversarial.py's.

DSV32_SCHEMATHESIS_EXAMPLES sets the fuzzing examples per operation and pass (default 25).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from tests.server.fuzz_target import AUTH, FuzzTarget, ServerDied, failure_report
from tests.server.hostile import anthropic_error_problem, error_envelope_problem, ollama_error_problem

pytestmark = pytest.mark.e2e

EXAMPLES = int(os.environ.get("DSV32_SCHEMATHESIS_EXAMPLES", "25"))
SEED = 20
TIME_LIMIT_S = 10.0
MAX_TOKENS = 4
GENERATION_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/messages", "/v1/responses", "/api/chat",
                     "/api/generate")
OLLAMA_ROUTES = ("/api/chat", "/api/generate")
ANTHROPIC_ROUTES = ("/v1/messages", "/v1/messages/count_tokens")


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzTarget]:
    fuzz = FuzzTarget(tmp_path_factory.mktemp("dsv32-schemathesis"))
    yield fuzz
    fuzz.client.close()
    fuzz.stop()


def keep_generation_short(case: schemathesis.Case) -> None:
    """Cap what makes a generation long; everything else stays as generated."""
    body = case.body
    if case.path not in GENERATION_ROUTES or not isinstance(body, dict):
        return
    if case.path in OLLAMA_ROUTES:
        # Ollama's cap is options.num_predict; -1, -2 and a missing one are no cap but the context.
        options = body.get("options")
        if options is None:
            body["options"] = options = {}
        if isinstance(options, dict):
            predict = options.get("num_predict")
            if not isinstance(predict, int | float) or isinstance(predict, bool) or predict < 0 or predict > MAX_TOKENS:
                options["num_predict"] = MAX_TOKENS
        return
    for key in ("max_tokens", "max_completion_tokens", "min_tokens", "max_output_tokens"):
        # A float counts: the int fields take 1000.0 as 1000.
        if isinstance(body.get(key), int | float) and not isinstance(body[key], bool) and body[key] > MAX_TOKENS:
            body[key] = MAX_TOKENS
    # null is no limit either: the generation would run to the end of the context.
    if case.path == "/v1/responses":
        if body.get("max_output_tokens") is None:
            body["max_output_tokens"] = MAX_TOKENS
    elif body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = MAX_TOKENS
    for key in ("n", "best_of"):
        if isinstance(body.get(key), int) and not isinstance(body[key], bool) and body[key] > 2:
            body[key] = 2


def repair(case: schemathesis.Case, model: str) -> None:
    """Make a schema-valid generation body acceptable past its first checks (conversation, prompt, model name)."""
    body = case.body
    if not isinstance(body, dict):
        return
    body["model"] = model
    if case.path == "/v1/chat/completions":
        first = next((m for m in body.get("messages") or [] if isinstance(m, dict)), {})
        text = first.get("content") if isinstance(first.get("content"), str) else "Hello"
        body["messages"] = [{"role": "user", "content": text or "Hello"}]
        body.pop("continue_final_message", None)
        body.pop("add_generation_prompt", None)
        body["stream_reasoning"] = True
        if body.get("top_logprobs") is not None:
            body["logprobs"] = True
        if body.get("tool_choice") not in (None, "none", "auto"):
            body["tool_choice"] = "auto"
    elif case.path == "/v1/messages":
        first = next((m for m in body.get("messages") or [] if isinstance(m, dict)), {})
        text = first.get("content") if isinstance(first.get("content"), str) else "Hello"
        body["messages"] = [{"role": "user", "content": text or "Hello"}]
        choice = body.get("tool_choice")
        if isinstance(choice, dict) and choice.get("type") not in ("auto", "none"):
            body["tool_choice"] = {"type": "auto"}
        thinking = body.get("thinking")
        if isinstance(thinking, dict) and isinstance(thinking.get("budget_tokens"), int):
            thinking["budget_tokens"] = 1
    elif case.path == "/v1/responses":
        if not isinstance(body.get("input"), str) or not body["input"]:
            body["input"] = "Hello"
        for key in ("previous_response_id", "conversation", "prompt", "truncation", "top_logprobs", "include"):
            body.pop(key, None)
        if body.get("tool_choice") not in (None, "none", "auto"):
            body["tool_choice"] = "auto"
        if body.get("background"):
            body["stream"], body["store"] = False, True
    elif case.path == "/api/chat":
        first = next((m for m in body.get("messages") or [] if isinstance(m, dict)), {})
        text = first.get("content") if isinstance(first.get("content"), str) else "Hello"
        body["messages"] = [{"role": "user", "content": text or "Hello"}]
    elif case.path == "/api/generate":
        if not isinstance(body.get("prompt"), str) or not body["prompt"]:
            body["prompt"] = "Hello"
        for key in ("raw", "template", "suffix", "context", "images"):
            body.pop(key, None)
    elif case.path == "/v1/completions":
        if not isinstance(body.get("prompt"), str) or not body["prompt"]:
            body["prompt"] = "Hello"
        body.pop("suffix", None)
        body.pop("best_of", None)
    if body.get("stream_options") is not None and not body.get("stream"):
        body["stream"] = True
    body.pop("return_hidden_states", None)


class Run:
    """Sends cases, judges answers and keeps one line per distinct failure (with a curl command to reproduce it)."""

    def __init__(self, target: FuzzTarget) -> None:
        self.target = target
        self.failures: list[str] = []
        self.seen: set[tuple[str, ...]] = set()
        self.sent = 0
        self.statuses: Counter[tuple[str, int]] = Counter()

    def check(self, case: schemathesis.Case, how: str) -> None:
        if self.target.exhausted:
            return
        keep_generation_short(case)
        self.sent += 1
        log_offset = self.target._log_size()
        started = time.monotonic()
        try:
            response = case.call(base_url=self.target.base_url, headers=AUTH, timeout=TIME_LIMIT_S + 5)
        except Exception as exc:  # a timeout or a dropped connection
            self.record(case, how, ("transport", type(exc).__name__), f"{type(exc).__name__}: {exc}"[:300], True)
            return
        elapsed = time.monotonic() - started
        status = response.status_code
        self.statuses[(case.operation.label, status)] += 1
        problems: list[tuple[str, str]] = []
        try:
            case.validate_response(response, checks=[not_a_server_error, response_schema_conformance])
        except BaseExceptionGroup as group:  # schemathesis's FailureGroup: several failed checks
            problems += [(getattr(f, "title", type(f).__name__), str(f).splitlines()[0]) for f in group.exceptions]
        except AssertionError as failure:
            problems.append((getattr(failure, "title", type(failure).__name__), str(failure).splitlines()[0]))
        envelope_problem = (anthropic_error_problem if case.path in ANTHROPIC_ROUTES else ollama_error_problem
                            if case.path.startswith("/api/") else error_envelope_problem)
        if 400 <= status < 500 and (problem := envelope_problem(response.content)):
            problems.append(("no error envelope", problem))
        if elapsed > TIME_LIMIT_S:
            problems.append(("slow", f"answered after {elapsed:.1f}s (limit {TIME_LIMIT_S:.0f}s)"))
        if problems:
            titles = tuple(sorted({title for title, _ in problems}))
            detail = "; ".join(f"{title}: {text}" for title, text in problems)
            logged = self.target.logged_exception(log_offset) if status >= 500 else None
            body = response.content[:200].decode(errors="replace")
            self.record(case, how, (str(status // 100 * 100 if status < 500 else status), *titles),
                        f"{status} {detail} | body: {body}" + (f" [server log: {logged}]" if logged else ""),
                        status >= 500)

    def record(self, case: schemathesis.Case, how: str, kind: tuple[str, ...], detail: str, fatal: bool) -> None:
        key = (case.operation.label, *kind)
        if key not in self.seen:
            self.seen.add(key)
            curl = case.as_curl_command(headers=AUTH, base_url=self.target.base_url)
            self.failures.append(f"{case.operation.label} ({how}) -> {detail}\n    reproduce: {curl[:600]}")
        if fatal:
            try:
                death = self.target.check_alive(f"{case.operation.label} ({how})")
            except ServerDied as exc:
                self.target.exhausted = True
                self.failures.append(f"STOPPED, the remaining cases were not sent: {exc}")
                return
            if death is not None:
                self.failures.append(f"    {death}")


FUZZ = settings(derandomize=True, database=None, deadline=None, phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck), max_examples=EXAMPLES)


def fuzz_pass(run: Run, operation, mode: GenerationMode, how: str, repair_model: str | None):
    """One derandomized hypothesis run over ``operation`` (bodies repaired for ``repair_model`` when given)."""

    @FUZZ
    @given(operation.as_strategy(generation_mode=mode))
    def fuzz(case: schemathesis.Case) -> None:
        if repair_model is not None:
            repair(case, repair_model)
        run.check(case, how)

    return fuzz


def test_every_route_keeps_its_contract_under_schemathesis(target: FuzzTarget) -> None:
    schema = schemathesis.openapi.from_url(f"{target.base_url}/openapi.json", config=schemathesis.Config(seed=SEED))
    model = target.client.get("/v1/models", timeout=10).json()["data"][0]["id"]
    operations = [result.ok() for result in schema.get_all_operations()]
    routes = {op.path for op in operations}
    assert {"/v1/chat/completions", "/v1/completions", "/v1/messages", "/v1/messages/count_tokens", "/v1/responses",
            "/v1/responses/{response_id}", "/api/chat", "/api/generate", "/api/tags", "/api/show", "/tokenize",
            "/detokenize", "/health"} <= routes, routes
    run = Run(target)
    for operation in operations:
        generation = schema.config.generation_for(operation=operation)
        for case in schema.iter_coverage_cases(operation, generation_modes=list(GenerationMode),
                                               generation_config=generation):
            run.check(case, "coverage")
        passes = [("positive", GenerationMode.POSITIVE, False), ("negative", GenerationMode.NEGATIVE, False)]
        if operation.path in GENERATION_ROUTES:
            passes.append(("positive, repaired", GenerationMode.POSITIVE, True))
        for how, mode, repaired in passes:
            try:
                fuzz_pass(run, operation, mode, how, model if repaired else None)()
            except Exception as exc:  # e.g. no negative case exists for an operation without parameters
                if type(exc).__name__ not in ("Unsatisfiable", "FailedHealthCheck"):
                    raise
    target.finish("the schemathesis run", run.failures)
    answered = ", ".join(f"{label} {status}: {n}" for (label, status), n in sorted(run.statuses.items()))
    print(f"schemathesis: {run.sent} requests; answers by route and status: {answered}")
    assert not run.failures, failure_report(f"schemathesis ({run.sent} requests; answers: {answered})",
                                            run.failures)


def test_server_still_serves_after_schemathesis(target: FuzzTarget) -> None:
    assert target.restarts == 0, (f"the server under schemathesis died {target.restarts} time(s) and was restarted "
                                  "(see test_every_route_keeps_its_contract_under_schemathesis)")
    problem = target.liveness_problem()
    assert problem is None, f"after the schemathesis run the server {problem}"
    assert target.client.get("/health", timeout=5).status_code == 200
    response = target.client.post("/v1/chat/completions", timeout=30, json={
        "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["role"] == "assistant"
    idle = target.idle_problem()
    assert idle is None, f"after the schemathesis run the engine is {idle}"
