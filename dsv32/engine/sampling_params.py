"""``SamplingParams``: what a request asks of the sampler and the stop logic (vLLM's names and defaults), and
``StructuredOutputsParams``: the grammar a request's output must follow, parsed and checked as far as that can be
done without the grammar library (the engine compiles it). ``is_json_schema`` is the one "is this a JSON Schema"
check (``as_json_schema`` refuses what fails it), shared by the server's request models and the prompt encoding.
Torch-free."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

_STRUCTURED_OUTPUT_KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


def is_json_schema(value: Any) -> bool:
    """The one "is this a JSON Schema" check: an object, or ``true`` / ``false`` (which JSON Schema allows)."""
    return isinstance(value, dict | bool)


def as_json_schema(value: Any, what: str) -> dict[str, Any] | bool:
    """``value`` if it is a JSON Schema, else a ``ValueError`` naming ``what``."""
    if not is_json_schema(value):
        raise ValueError(f"{what} must be a JSON Schema object, got {type(value).__name__}")
    return value


@dataclass(frozen=True)
class StructuredOutputsParams:
    """vLLM's ``StructuredOutputsParams``: exactly one constraint, kept as plain data (picklable; compiled by the
    engine). ``json`` is a JSON Schema (given as a value or as JSON text, which is parsed here), ``regex`` a regular
    expression, ``choice`` the strings the output must be one of, ``grammar`` an EBNF grammar (xgrammar's dialect,
    GBNF-like, rule ``root``), ``json_object`` any JSON object, ``structural_tag`` xgrammar's structural tag as JSON
    text.

    When the prompt leaves the model inside its thinking (it ends with ``<think>``), the constraint starts after
    the ``</think>`` token; the thinking itself stays free.
    """

    json: str | dict[str, Any] | bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | None = None
    # The request field the constraint came from (e.g. "response_format"), to name it in errors; not part of it.
    source: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        given = [kind for kind in _STRUCTURED_OUTPUT_KINDS if getattr(self, kind) not in (None, False)]
        if len(given) != 1:
            raise ValueError("structured outputs need exactly one constraint (json, regex, choice, grammar, "
                             f"json_object or structural_tag), got {', '.join(given) or 'none'}.")
        if self.choice is not None and not (
                isinstance(self.choice, list) and self.choice and all(isinstance(c, str) for c in self.choice)):
            raise ValueError("structured outputs choice must be a non-empty list of strings.")
        for kind in ("regex", "grammar", "structural_tag"):
            value = getattr(self, kind)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"structured outputs {kind} must be a string, got {type(value).__name__}.")
        if self.json is not None:
            # Frozen: the parsed schema replaces its text once, here, so every later reader sees a value.
            object.__setattr__(self, "json", _parse_json_schema(self.json))
        if self.structural_tag is not None:
            check_structural_tag(self.structural_tag)

    @property
    def kind(self) -> str:
        """Which constraint this is: one of json, regex, choice, grammar, json_object, structural_tag."""
        return next(kind for kind in _STRUCTURED_OUTPUT_KINDS if getattr(self, kind) not in (None, False))

    @property
    def key(self) -> str:
        """A canonical text of the constraint: equal keys compile to the same grammar."""
        value = getattr(self, self.kind)
        if isinstance(value, dict | list):
            value = json.dumps(value, sort_keys=True, ensure_ascii=False)
        return f"{self.kind}:{value}"


def _parse_json_schema(value: str | dict[str, Any] | bool) -> dict[str, Any] | bool:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"structured outputs json is not valid JSON: {exc}") from None
    return as_json_schema(value, "structured outputs json")


def _fail_unless(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(f"structured outputs structural_tag: {message}")


def check_structural_tag(text: str) -> None:
    """The shape of a structural tag (``ValueError`` naming what is wrong), as far as it can be checked without the
    grammar library: xgrammar's ``{"type": "structural_tag", "format": {"type": ...}}``, or the older
    ``{"structures": [{"begin", "schema", "end"}], "triggers": [...]}`` that vLLM still accepts. The grammar
    library checks the rest when it compiles the tag."""
    try:
        tag = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"structured outputs structural_tag is not valid JSON: {exc}") from None
    _fail_unless(isinstance(tag, dict), "must be a JSON object")
    if "structures" in tag:
        structures, triggers = tag["structures"], tag.get("triggers")
        _fail_unless(isinstance(structures, list) and bool(structures), "structures must be a non-empty list")
        for index, structure in enumerate(structures):
            _fail_unless(isinstance(structure, dict) and isinstance(structure.get("begin"), str)
                         and isinstance(structure.get("end"), str) and is_json_schema(structure.get("schema", True)),
                         f"structures[{index}] must be an object with string begin and end and a schema object")
        _fail_unless(isinstance(triggers, list) and bool(triggers) and all(isinstance(t, str) and t for t in triggers),
                     "triggers must be a non-empty list of strings")
        return
    fmt = tag.get("format")
    _fail_unless(isinstance(fmt, dict) and isinstance(fmt.get("type"), str),
                 'needs a "format" object with a "type" (or the older "structures" and "triggers")')


@dataclass
class SamplingParams:
    """Per-request sampling and stopping options, with vLLM's field names and defaults.

    ``temperature == 0`` means greedy. ``seed`` makes one request reproducible whatever it is batched with.
    ``logprobs``/``prompt_logprobs`` ask for that many top alternatives (0 = only the chosen/prompt token).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    min_tokens: int = 0
    max_tokens: int | None = 16
    ignore_eos: bool = False
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self._validate()

    def _validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(msg)

        need(self.n >= 1, f"n must be at least 1, got {self.n}.")
        need(self.temperature >= 0.0, f"temperature must be non-negative, got {self.temperature}.")
        need(0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}.")
        need(self.top_k >= 0, f"top_k must be -1 (disable), or at least 1, got {self.top_k}.")
        need(0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}.")
        need(-2.0 <= self.presence_penalty <= 2.0, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}.")
        need(-2.0 <= self.frequency_penalty <= 2.0,
             f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}.")
        need(self.repetition_penalty > 0.0, f"repetition_penalty must be greater than zero, got "
                                            f"{self.repetition_penalty}.")
        need(self.min_tokens >= 0, f"min_tokens must be greater than or equal to 0, got {self.min_tokens}.")
        need(self.max_tokens is None or self.max_tokens >= 1, f"max_tokens must be at least 1, got {self.max_tokens}.")
        need(self.max_tokens is None or self.min_tokens <= self.max_tokens,
             f"min_tokens must be less than or equal to max_tokens={self.max_tokens}, got {self.min_tokens}.")
        need(all(self.stop), "stop cannot contain an empty string.")
        need(self.logprobs is None or self.logprobs >= 0, f"logprobs must be non-negative, got {self.logprobs}.")
        need(self.prompt_logprobs is None or self.prompt_logprobs >= 0,
             f"prompt_logprobs must be non-negative, got {self.prompt_logprobs}.")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5
