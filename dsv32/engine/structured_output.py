"""Structured outputs: constrain what a sequence may generate to a grammar (JSON Schema, regex, choice, EBNF,
structural tag - DSML tool calls are one).

One compiled grammar per distinct spec (``StructuredOutputsParams.key``), compiled on a worker thread and cached; one
matcher per sequence, which accepts each generated token (or rolls tokens back, for speculative decoding). Each step
the matchers of the constrained rows fill a token bitmask that is applied to those rows' logits only; a sequence
whose grammar has completed, with nothing but the end of the output left, finishes with ``"stop"``.

A sequence whose prompt leaves the model inside its thinking (the last of ``<think>`` / ``</think>`` in the prompt is
``<think>``) is free until it generates ``</think>``; the grammar applies to what follows (as in vLLM and SGLang).

The grammar library sits behind ``StructuredOutputBackend`` / ``GrammarMatcher``; ``XgrammarBackend`` is the one
implementation (xgrammar, the default of vLLM and SGLang). It is imported on the first constrained request, so an
engine that never sees one never loads it.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from dsv32.config import StructuredOutputsConfig
from dsv32.engine.request import TokenSequence
from dsv32.engine.sampling_params import SamplingParams, StructuredOutputsParams
from dsv32.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# Compiled grammars kept for reuse (least recently used dropped first).
COMPILED_CACHE_SIZE = 256

# JSON Schema keywords xgrammar 0.2 accepts but does not enforce: output could then break the schema, so a schema
# that uses them is refused instead.
UNSUPPORTED_JSON_SCHEMA_KEYWORDS = (
    "not", "allOf", "oneOf", "if", "then", "else", "uniqueItems", "contains", "minContains", "maxContains",
    "dependentRequired", "dependentSchemas", "dependencies",
)
# Keys whose value is a map of names to schemas, or a list of schemas, or one schema.
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_VALUES = ("items", "additionalProperties", "unevaluatedProperties", "unevaluatedItems", "propertyNames",
                  "contains", "not", "if", "then", "else")


class GrammarCompileError(ValueError):
    """A request's structured-output spec could not be compiled: the request's fault (a 400), not the engine's."""


class GrammarMatcher(Protocol):
    """One sequence's position in its grammar."""

    def accept_token(self, token_id: int) -> bool:
        """Advance by one token; False (state unchanged) if the grammar does not allow it."""

    def rollback(self, num_tokens: int) -> None:
        """Undo the last ``num_tokens`` accepted tokens."""

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the tokens allowed next into row ``row`` of ``bitmask``."""

    def must_stop(self) -> bool:
        """The grammar is complete and nothing but the end of the output can follow."""


class StructuredOutputBackend(Protocol):
    """A grammar library: checks and compiles specs, makes matchers and applies their bitmasks."""

    def check(self, spec: StructuredOutputsParams) -> None:
        """Raise ``ValueError`` naming the problem if ``spec`` cannot be compiled (cheap: no tokenizer work)."""

    def compile(self, spec: StructuredOutputsParams) -> Any:
        """The compiled grammar of ``spec`` (slow: run off the step loop)."""

    def new_matcher(self, compiled: Any) -> GrammarMatcher: ...

    def allocate_bitmask(self, num_rows: int) -> torch.Tensor: ...

    def apply_bitmask(self, logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """``logits`` with the tokens the bitmask forbids set to -inf in the given rows (in place where it can)."""


def _unsupported_keywords(schema: Any, path: str = "#") -> Iterator[str]:
    """``path/keyword`` of every keyword in ``schema`` (and its subschemas) that the backend does not enforce."""
    if not isinstance(schema, dict):
        return
    for keyword in UNSUPPORTED_JSON_SCHEMA_KEYWORDS:
        if keyword in schema:
            yield f"{path}/{keyword}"
    for key in _SCHEMA_MAPS:
        if isinstance(schema.get(key), dict):
            for name, sub in schema[key].items():
                yield from _unsupported_keywords(sub, f"{path}/{key}/{name}")
    for key in _SCHEMA_LISTS:
        if isinstance(schema.get(key), list):
            for index, sub in enumerate(schema[key]):
                yield from _unsupported_keywords(sub, f"{path}/{key}/{index}")
    for key in _SCHEMA_VALUES:
        yield from _unsupported_keywords(schema.get(key), f"{path}/{key}")


def _enforceable(schema: Any) -> Any:
    """``schema`` (parsed and checked by ``StructuredOutputsParams``), or ``ValueError`` if it uses keywords the
    grammar cannot enforce."""
    unsupported = list(_unsupported_keywords(schema))
    if unsupported:
        raise ValueError(f"JSON Schema keyword {unsupported[0]} is not supported by structured outputs (the grammar "
                         f"cannot enforce {', '.join(UNSUPPORTED_JSON_SCHEMA_KEYWORDS)}); use anyOf, enum or const "
                         "instead")
    return schema


def choice_grammar(choices: Sequence[str]) -> str:
    """An EBNF grammar whose language is exactly ``choices``."""
    return "root ::= " + " | ".join(json.dumps(choice, ensure_ascii=False) for choice in choices)


def bound_structural_tag_whitespace(tag: Any, max_whitespace: int) -> Any:
    """The structural tag with every JSON-schema part that leaves whitespace unbounded bounded to ``max_whitespace``.
    A tag in the legacy shape (``structures`` + ``triggers``, as vLLM accepts it) is first rewritten as
    ``triggered_tags``."""
    if isinstance(tag, dict) and "structures" in tag:
        tags = [{"type": "tag", "begin": s.get("begin"), "end": s.get("end"),
                 "content": {"type": "json_schema", "json_schema": s.get("schema", True)}}
                for s in tag["structures"]]
        tag = {"type": "structural_tag", "format": {"type": "triggered_tags", "triggers": tag.get("triggers", []),
                                                   "tags": tags}}
    if isinstance(tag, dict):
        bounded = {key: bound_structural_tag_whitespace(value, max_whitespace) for key, value in tag.items()}
        if bounded.get("type") == "json_schema" and "json_schema" in bounded and not bounded.get("max_whitespace_cnt"):
            bounded["max_whitespace_cnt"] = max_whitespace
        return bounded
    if isinstance(tag, list):
        return [bound_structural_tag_whitespace(value, max_whitespace) for value in tag]
    return tag


class _XgrammarMatcher:
    def __init__(self, matcher: Any, bitmask: torch.Tensor, stop_token_ids: frozenset[int]) -> None:
        self._matcher = matcher
        self._probe = bitmask  # one row, to ask what may follow a completed grammar
        self._stop_token_ids = stop_token_ids

    def accept_token(self, token_id: int) -> bool:
        return self._matcher.accept_token(token_id)

    def rollback(self, num_tokens: int) -> None:
        self._matcher.rollback(num_tokens)

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def must_stop(self) -> bool:
        if self._matcher.is_terminated():
            return True
        if not self._matcher.is_completed():
            return False
        self._matcher.fill_next_token_bitmask(self._probe, 0)
        allowed = self._probe[0].nonzero().view(-1)
        if allowed.numel() > len(self._stop_token_ids):
            return False
        words = self._probe[0][allowed].tolist()
        tokens = {32 * int(word_index) + bit for word_index, word in zip(allowed.tolist(), words, strict=True)
                  for bit in range(32) if (word >> bit) & 1}
        return tokens <= self._stop_token_ids


class XgrammarBackend:
    """xgrammar over the engine's tokenizer: the vocabulary as byte-level BPE strings, padded to the model's
    ``vocab_size``. The chat format's added tokens (``<｜User｜>``, ``<think>``, ...) other than EOS are never
    allowed by a grammar: a constrained output is text."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, config: StructuredOutputsConfig) -> None:
        import xgrammar

        self._xgr = xgrammar
        self._config = config
        self.vocab_size = vocab_size
        added = set(tokenizer.added_token_ids) - {tokenizer.eos_token_id}
        vocabulary = tokenizer.convert_ids_to_tokens(list(range(tokenizer.vocab_size)))
        encoded = ["" if token_id in added or token is None else token for token_id, token in enumerate(vocabulary)]
        self._stop_token_ids = frozenset({tokenizer.eos_token_id})
        info = xgrammar.TokenizerInfo(encoded, xgrammar.VocabType.BYTE_LEVEL, vocab_size=vocab_size,
                                      stop_token_ids=[tokenizer.eos_token_id], add_prefix_space=False)
        # Compiled grammars are cached by StructuredOutputManager; one compile thread (compiles run off the step loop).
        self._compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)

    def _grammar(self, spec: StructuredOutputsParams) -> Any:
        """The tokenizer-independent grammar of ``spec``; ``ValueError`` naming the problem."""
        xgr, kind, ws = self._xgr.Grammar, spec.kind, self._config.max_whitespace
        try:
            if kind == "json":
                return xgr.from_json_schema(json.dumps(_enforceable(spec.json)), max_whitespace_cnt=ws)
            if kind == "json_object":
                return xgr.from_json_schema('{"type": "object"}', strict_mode=False, max_whitespace_cnt=ws)
            if kind == "regex":
                return xgr.from_regex(spec.regex)
            if kind == "choice":
                return xgr.from_ebnf(choice_grammar(spec.choice))
            if kind == "grammar":
                return xgr.from_ebnf(spec.grammar)
            try:
                tag = json.loads(spec.structural_tag)
            except json.JSONDecodeError as exc:
                raise ValueError(f"structured outputs structural_tag is not valid JSON: {exc}") from None
            return xgr.from_structural_tag(json.dumps(bound_structural_tag_whitespace(tag, ws)))
        except GrammarCompileError:
            raise
        except Exception as exc:  # xgrammar's errors are RuntimeErrors; a malformed spec can raise anything
            raise GrammarCompileError(f"invalid structured outputs {kind}: {_error_text(exc)}") from None

    def check(self, spec: StructuredOutputsParams) -> None:
        self._grammar(spec)

    def compile(self, spec: StructuredOutputsParams) -> Any:
        grammar = self._grammar(spec)
        try:
            return self._compiler.compile_grammar(grammar)
        except Exception as exc:  # e.g. a schema bound xgrammar rejects only when compiling (minLength < 0)
            raise GrammarCompileError(f"invalid structured outputs {spec.kind}: {_error_text(exc)}") from None

    def new_matcher(self, compiled: Any) -> GrammarMatcher:
        return _XgrammarMatcher(self._xgr.GrammarMatcher(compiled), self.allocate_bitmask(1), self._stop_token_ids)

    def allocate_bitmask(self, num_rows: int) -> torch.Tensor:
        return self._xgr.allocate_token_bitmask(num_rows, self.vocab_size)

    def apply_bitmask(self, logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> torch.Tensor:
        # xgrammar's kernels want row-major logits (the CPU LM head may return them column-major).
        logits = logits.contiguous()
        self._xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True),
                                              vocab_size=self.vocab_size, indices=rows)
        return logits


def _error_text(exc: Exception) -> str:
    """xgrammar's message without its ``[time] /path/file.cc:line:`` prefix."""
    text = str(exc).strip()
    if text.startswith("[") and ".cc:" in text:
        text = text.split(": ", 1)[-1]
    return text


BACKENDS: dict[str, Callable[[Tokenizer, int, StructuredOutputsConfig], StructuredOutputBackend]] = {
    "auto": XgrammarBackend,
    "xgrammar": XgrammarBackend,
}


@dataclass(eq=False)
class _SequenceGrammar:
    compiled: Future[Any]
    in_reasoning: bool  # still thinking: the grammar starts after </think>
    matcher: GrammarMatcher | None = None


@dataclass
class StepBitmask:
    """The bitmask of one step's constrained rows, ready to apply to those rows of the step's logits."""

    backend: StructuredOutputBackend
    bitmask: torch.Tensor
    rows: list[int]

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return self.backend.apply_bitmask(logits, self.bitmask, self.rows)


class StructuredOutputManager:
    """The engine's grammars: compile (cached, on a worker thread), one matcher per sequence, the step's bitmask,
    accepting and rolling back tokens. Used from the engine's thread, except ``validate`` (any thread)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, config: StructuredOutputsConfig) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._config = config
        self._backend: StructuredOutputBackend | None = None
        self._backend_lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._compiled: OrderedDict[str, Future[Any]] = OrderedDict()
        self._sequences: dict[TokenSequence, _SequenceGrammar] = {}
        self._pending: dict[TokenSequence, _SequenceGrammar] = {}  # waiting for their grammar to compile
        self._bitmask: torch.Tensor | None = None

    @property
    def backend(self) -> StructuredOutputBackend:
        """The grammar library, loaded on first use."""
        with self._backend_lock:
            if self._backend is None:
                self._backend = BACKENDS[self._config.backend](self._tokenizer, self._vocab_size, self._config)
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dsv32-grammar")
            return self._backend

    @property
    def loaded(self) -> bool:
        return self._backend is not None

    def validate(self, params: SamplingParams) -> None:
        """``ValueError`` naming the problem if the request's constraint cannot be compiled."""
        if params.structured_outputs is not None:
            self.backend.check(params.structured_outputs)

    def compile(self, spec: StructuredOutputsParams) -> Future[Any]:
        """The compiled grammar of ``spec``, from the cache or compiled on the worker thread."""
        future = self._compiled.get(spec.key)
        if future is not None:
            self._compiled.move_to_end(spec.key)
            return future
        backend = self.backend
        assert self._executor is not None
        future = self._executor.submit(backend.compile, spec)
        self._compiled[spec.key] = future
        if len(self._compiled) > COMPILED_CACHE_SIZE:
            self._compiled.popitem(last=False)
        return future

    # ---- sequences ----------------------------------------------------------------------------------
    def add(self, seq: TokenSequence) -> None:
        spec = seq.sampling_params.structured_outputs
        if spec is None:
            return
        state = _SequenceGrammar(self.compile(spec), self._starts_in_reasoning(seq.prompt_token_ids))
        self._sequences[seq] = state
        self._pending[seq] = state

    def _starts_in_reasoning(self, prompt_token_ids: Sequence[int]) -> bool:
        start, end = self._tokenizer.think_start_id, self._tokenizer.think_end_id
        for token_id in reversed(prompt_token_ids):
            if token_id in (start, end):
                return token_id == start
        return False

    def remove(self, seq: TokenSequence) -> None:
        self._sequences.pop(seq, None)
        self._pending.pop(seq, None)

    def is_ready(self, seq: TokenSequence) -> bool:
        """Whether ``seq`` can be scheduled: it has no constraint or its grammar is compiled."""
        return seq not in self._pending

    def poll(self) -> list[tuple[TokenSequence, Exception]]:
        """Give the sequences whose grammar finished compiling their matcher; returns those whose compile failed."""
        failed: list[tuple[TokenSequence, Exception]] = []
        for seq, state in list(self._pending.items()):
            if not state.compiled.done():
                continue
            del self._pending[seq]
            try:
                state.matcher = self.backend.new_matcher(state.compiled.result())
            except Exception as exc:  # a compile that failed is that request's error, not the engine's
                failed.append((seq, exc))
        return failed

    def wait_for_compiles(self, timeout: float) -> None:
        """Block until some pending grammar is compiled (or ``timeout`` seconds): nothing else can run meanwhile."""
        if self._pending:
            wait_futures([state.compiled for state in self._pending.values()], timeout=timeout,
                         return_when="FIRST_COMPLETED")

    def fill_bitmask(self, seqs: Sequence[TokenSequence]) -> StepBitmask | None:
        """The bitmask for the rows of ``seqs`` (a step's sampling rows, in order) that are constrained now; None
        when none is."""
        if not self._sequences:
            return None
        rows: list[int] = []
        for row, seq in enumerate(seqs):
            state = self._sequences.get(seq)
            if state is not None and state.matcher is not None and not state.in_reasoning:
                rows.append(row)
        if not rows:
            return None
        backend = self.backend
        if self._bitmask is None or self._bitmask.shape[0] < len(seqs):
            self._bitmask = backend.allocate_bitmask(max(len(seqs), 8))
        for row in rows:
            matcher = self._sequences[seqs[row]].matcher
            assert matcher is not None
            matcher.fill_bitmask(self._bitmask, row)
        return StepBitmask(backend, self._bitmask, rows)

    def accept(self, seq: TokenSequence, token_id: int) -> bool:
        """Feed a generated token to ``seq``'s grammar; True when the output must end here (the grammar is
        complete). ``ValueError`` if the grammar does not allow the token."""
        state = self._sequences.get(seq)
        if state is None:
            return False
        if state.in_reasoning:
            state.in_reasoning = token_id != self._tokenizer.think_end_id
            return False
        assert state.matcher is not None, "a constrained sequence generated before its grammar was compiled"
        if not state.matcher.accept_token(token_id):
            raise ValueError(f"token {token_id} does not follow the request's structured outputs grammar")
        return state.matcher.must_stop()

    def rollback(self, seq: TokenSequence, num_tokens: int) -> None:
        """Undo the last ``num_tokens`` tokens accepted for ``seq`` (rejected speculative tokens). Tokens of the
        free thinking part are not tracked, so roll back only tokens generated after it."""
        state = self._sequences.get(seq)
        if state is not None and state.matcher is not None and num_tokens:
            state.matcher.rollback(num_tokens)
