"""Incremental parser of DeepSeek-V3.2 completion text into reasoning, content and OpenAI tool-call deltas.

Feed it the decoded completion (special tokens kept) in any split - one character at a time, a whole tool call in
one piece, a cut inside ``｜DSML｜`` or ``</think>`` - and the concatenation of what it returns is always the same.
The non-streaming parser (``parse.py``) is this class fed the whole text at once, so streaming and non-streaming
cannot disagree (the bug class of sglang#35563 and vllm PR #36056).

Output: a list of ``Delta``; each carries exactly one of ``reasoning_content``, ``content`` or ``tool_call``. A
``ToolCallDelta`` follows OpenAI's streaming convention: the first delta of call ``index`` carries ``id`` and
``name`` with ``arguments == ""``; later deltas carry only argument fragments. Concatenated, a call's fragments are
the JSON text ``{"key": value, ...}`` - identical to what DeepSeek's reference parser returns for well-formed output
(string parameters JSON-escaped, other parameters verbatim). String parameters stream character by character; other
parameters are emitted whole when their closing tag arrives.

Where the text goes:
* Thinking mode (the prompt ended with ``<think>``): everything before ``</think>`` is reasoning. A leading
  ``<think>`` the model repeats is dropped. If no ``</think>`` ever comes, everything is reasoning (truncated
  thinking). A DSML tool-call block inside the reasoning ends the reasoning if it yields a valid call
  (sglang PR #9446: the model skipped ``</think>``); otherwise its text stays reasoning.
* Chat mode (the prompt ended with ``</think>``): everything is content, apart from tool calls.
* ``<｜end▁of▁sentence｜>`` is removed wherever it appears.

Tool calls. Accepted, beyond the reference grammar (serving.md §2.4 edge cases): the ``function_calls`` wrapper may
be missing (bare invokes, as constrained decoding produces - sglang PR #24199) or unterminated; tags may lack the
``｜DSML｜`` marker (vllm#30541; in content only, since plain tags in reasoning are the model thinking aloud); the
``string`` attribute may be missing (then the tool's JSON schema decides, else JSON with a string fallback); a
non-string value that is not valid JSON becomes a JSON string (vllm PR #47449, sglang PR #28684); an invoke body may
be one raw JSON object instead of parameter tags. A call is committed - its header delta emitted - at the first
valid element of its body (a parameter tag, the closing tag, or a JSON body that parses), never earlier, so a
malformed invoke never turns into an executable ``{}`` call (sglang PR #39435/#39632). Before that point nothing is
emitted; if the text turns out not to be a valid call (unknown tool name, garbage after the wrapper, a closed empty
wrapper, text that ends early) it is returned verbatim to the channel it came from. After it, the call is kept: stray
text inside it goes to content, and a call cut off by the end of the text is closed so ``arguments`` is valid JSON
(the server's ``finish_reason="length"`` tells the client it was truncated). Duplicate parameter names are kept in
order (JSON readers take the last one).
"""

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum, auto
from typing import Any

from dsv32.encoding.encode import DSML_TOKEN, EOS_TOKEN, THINK_END, THINK_START, THINKING_MODES, to_json

# A tag's attributes (`name="..." string="..."`) must end within this many characters, or it is not a tag. Bounds how
# much text can be held back while a tag is undecided.
MAX_TAG_ATTRIBUTES_CHARS = 1024

_ATTRIBUTE = re.compile(r'([A-Za-z_][\w-]*)="([^"]*)"')
_ATTRIBUTE_PREFIX = re.compile(r'[A-Za-z_][\w-]*(="[^"]*)?|[A-Za-z_][\w-]*=')
_WHITESPACE = re.compile(r"\s*")


def _openers(tag: str) -> tuple[str, str]:
    return f"<{DSML_TOKEN}{tag}", f"<{tag}"


def _closers(tag: str) -> tuple[str, str]:
    return f"</{DSML_TOKEN}{tag}>", f"</{tag}>"


_BLOCK_OPENERS = _openers("function_calls")
_INVOKE_OPENERS = _openers("invoke")
_PARAMETER_OPENERS = _openers("parameter")
_BLOCK_CLOSERS = _closers("function_calls")
_INVOKE_CLOSERS = _closers("invoke")
_DSML_PARAMETER_CLOSER, _PLAIN_PARAMETER_CLOSER = _closers("parameter")

# Where a tool-call region may start. "\n\n" before a wrapper/invoke is part of the markup, as in the reference.
_CONTENT_TOOL_STARTS = tuple(
    prefix + opener for opener in _BLOCK_OPENERS + _INVOKE_OPENERS for prefix in ("\n\n", "")
)
_REASONING_TOOL_STARTS = tuple(start for start in _CONTENT_TOOL_STARTS if DSML_TOKEN in start)
_REASONING_MARKERS = (THINK_END, *_REASONING_TOOL_STARTS)


def new_tool_call_id() -> str:
    """An OpenAI-style tool-call id, ``call_`` + 24 hex digits (the format vLLM's and SGLang's V3.2 parsers use)."""
    return "call_" + uuid.uuid4().hex[:24]


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of tool call ``index``: the header (``id`` and ``name`` set, ``arguments == ""``) or an argument
    fragment (``id`` and ``name`` None)."""

    index: int
    arguments: str = ""
    id: str | None = None
    name: str | None = None

    def to_openai(self) -> dict[str, Any]:
        """The element of ``choices[0].delta.tool_calls`` in an OpenAI chat.completion.chunk."""
        function: dict[str, Any] = {} if self.name is None else {"name": self.name}
        function["arguments"] = self.arguments
        header = {} if self.id is None else {"id": self.id, "type": "function"}
        return {"index": self.index, **header, "function": function}


@dataclass(frozen=True)
class Delta:
    """One piece of parsed output; exactly one field is set."""

    reasoning_content: str | None = None
    content: str | None = None
    tool_call: ToolCallDelta | None = None


class _State(Enum):
    TEXT = auto()  # reasoning or content, watching for </think> and tool-call starts
    BLOCK_OPEN = auto()  # after `<function_calls`, expecting `>`
    BETWEEN_INVOKES = auto()  # inside a tool region, expecting an invoke or the wrapper's end
    INVOKE_HEADER = auto()  # after `<invoke`, expecting ` name="...">`
    INVOKE_BODY = auto()  # expecting parameters, a JSON body or `</invoke>`
    PARAMETER_VALUE = auto()  # inside a parameter's value
    JSON_BODY = auto()  # an invoke body that is a raw JSON object


class _Progress(Enum):
    MORE = auto()  # undecided: wait for more text
    FAIL = auto()  # cannot be what was expected


def _longest_marker_prefix_suffix(text: str, markers: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of one of ``markers`` (text to hold back)."""
    longest = max(len(marker) for marker in markers) - 1
    for length in range(min(len(text), longest), 0, -1):
        tail = text[-length:]
        if any(marker.startswith(tail) for marker in markers):
            return length
    return 0


def _earliest_marker(text: str, markers: Sequence[str]) -> tuple[int, str] | None:
    """(position, marker) of the earliest marker occurrence; on a tie the longer marker wins."""
    best: tuple[int, str] | None = None
    for marker in markers:
        position = text.find(marker)
        if position >= 0 and (best is None or (position, -len(marker)) < (best[0], -len(best[1]))):
            best = (position, marker)
    return best


def _match_start(text: str, candidates: Sequence[str]) -> str | _Progress:
    """The candidate ``text`` starts with, ``MORE`` if ``text`` could still become one, else ``FAIL``."""
    for candidate in candidates:
        if text.startswith(candidate):
            return candidate
    if any(candidate.startswith(text) for candidate in candidates):
        return _Progress.MORE
    return _Progress.FAIL


def _parse_attributes(text: str) -> tuple[int, dict[str, str]] | _Progress:
    """Parse `` name="v" other="w">`` at the start of ``text``: (characters used, attributes) or MORE/FAIL.

    Every attribute needs whitespace before it. Decisions only look at the first ``MAX_TAG_ATTRIBUTES_CHARS``
    characters, so the outcome does not depend on how the text was split.
    """
    view = text[:MAX_TAG_ATTRIBUTES_CHARS]
    undecided = _Progress.MORE if len(text) < MAX_TAG_ATTRIBUTES_CHARS else _Progress.FAIL
    attributes: dict[str, str] = {}
    position = 0
    while True:
        after_space = _WHITESPACE.match(view, position).end()
        if after_space == len(view):
            return undecided
        if view[after_space] == ">":
            return after_space + 1, attributes
        if after_space == position:
            return _Progress.FAIL
        attribute = _ATTRIBUTE.match(view, after_space)
        if attribute is None:
            return undecided if _ATTRIBUTE_PREFIX.fullmatch(view, after_space) else _Progress.FAIL
        attributes[attribute.group(1)] = attribute.group(2)
        position = attribute.end()


def _json_value_text(raw: str) -> str:
    """A non-string parameter's JSON: the model's text verbatim when it is valid JSON, else that text as a string."""
    try:
        json.loads(raw)
    except ValueError:
        return to_json(raw)
    return raw


def _escaped_string_chars(text: str) -> str:
    """JSON string escaping of ``text`` without the quotes; escaping is per character, so pieces concatenate."""
    return to_json(text)[1:-1]


class StreamingParser:
    """Turns completion text deltas into ``Delta`` lists; see the module docstring for the rules.

    ``thinking_mode``: ``"thinking"`` if the prompt ended with ``<think>`` (the completion starts inside reasoning),
    ``"chat"`` if it ended with ``</think>``; ``encode.thinking_mode_for_prompt`` derives it from the prompt.
    ``tools``: the OpenAI tool list the model may call; calls to other names are returned as text. ``None`` accepts
    any name (the reference parser's behaviour); ``[]`` accepts none.
    """

    def __init__(self, thinking_mode: str, tools: Sequence[Mapping[str, Any]] | None = None) -> None:
        if thinking_mode not in THINKING_MODES:
            raise ValueError(f"thinking_mode must be 'chat' or 'thinking', got {thinking_mode!r}")
        self._schemas: dict[str, Mapping[str, Any]] | None = None
        if tools is not None:
            functions = [tool.get("function") for tool in tools if isinstance(tool, Mapping)]
            self._schemas = {
                function["name"]: function.get("parameters") or {}
                for function in functions
                if isinstance(function, Mapping) and isinstance(function.get("name"), str)
            }
        self._in_reasoning = thinking_mode == "thinking"
        self._at_start = True  # nothing read yet: a leading <think> may still be dropped
        self._state = _State.TEXT
        self._buffer = ""  # text read but not yet decided
        self._eos_tail = ""  # a possible start of the EOS token, held back by the EOS filter
        self._pending = ""  # tool-call markup read while no call is committed; returned as text on failure
        self._finished = False
        self._out: list[Delta] = []
        self.tool_call_count = 0  # calls emitted so far: the server's finish_reason is "tool_calls" when > 0
        # the invoke being parsed
        self._region_has_calls = False
        self._call_name = ""
        self._call_open = False  # header emitted, closing fragment not yet
        self._call_has_parameters = False
        self._in_stray_text = False  # inside text that is not a tag, within a committed call: runs up to the next "<"
        # the parameter being parsed
        self._value_closers: tuple[str, ...] = ()
        self._value_is_string = False
        self._value_raw = ""
        self._steps = {
            _State.TEXT: self._step_text,
            _State.BLOCK_OPEN: self._step_block_open,
            _State.BETWEEN_INVOKES: self._step_between_invokes,
            _State.INVOKE_HEADER: self._step_invoke_header,
            _State.INVOKE_BODY: self._step_invoke_body,
            _State.PARAMETER_VALUE: self._step_parameter_value,
            _State.JSON_BODY: self._step_json_body,
        }

    # ------------------------------------------------------------------ public API
    def feed(self, text: str) -> list[Delta]:
        """Parse the next piece of completion text; returns the deltas it decides (possibly none)."""
        if self._finished:
            raise ValueError("StreamingParser.feed() called after finish()")
        self._buffer += self._remove_eos(text, final=False)
        self._advance(at_end=False)
        return self._take_output()

    def finish(self) -> list[Delta]:
        """Flush everything held back at the end of the completion (EOS, max_tokens or a stop string)."""
        if self._finished:
            return []
        self._finished = True
        self._buffer += self._remove_eos("", final=True)
        self._advance(at_end=True)
        if self._state == _State.PARAMETER_VALUE:
            self._close_parameter()
        if self._call_open:
            self._close_call()
        return self._take_output()

    @property
    def tools_called(self) -> bool:
        """Whether any tool call was emitted (``finish_reason`` should then be ``"tool_calls"``)."""
        return self.tool_call_count > 0

    # ------------------------------------------------------------------ output
    def _take_output(self) -> list[Delta]:
        out, self._out = self._out, []
        return out

    def _emit_text(self, text: str, reasoning: bool) -> None:
        if not text:
            return
        last = self._out[-1] if self._out else None
        if reasoning:
            if last is not None and last.reasoning_content is not None:
                self._out[-1] = Delta(reasoning_content=last.reasoning_content + text)
            else:
                self._out.append(Delta(reasoning_content=text))
        elif last is not None and last.content is not None:
            self._out[-1] = Delta(content=last.content + text)
        else:
            self._out.append(Delta(content=text))

    def _emit_arguments(self, fragment: str) -> None:
        index = self.tool_call_count - 1
        last = self._out[-1].tool_call if self._out else None
        if last is not None and last.index == index and last.id is None:
            self._out[-1] = Delta(tool_call=ToolCallDelta(index=index, arguments=last.arguments + fragment))
        else:
            self._out.append(Delta(tool_call=ToolCallDelta(index=index, arguments=fragment)))

    # ------------------------------------------------------------------ EOS filter
    def _remove_eos(self, text: str, final: bool) -> str:
        """Drop every EOS token; hold back a possible EOS start at the end (only after the last removed EOS)."""
        raw = self._eos_tail + text
        pieces = []
        position = raw.find(EOS_TOKEN)
        start = 0
        while position >= 0:
            pieces.append(raw[start:position])
            start = position + len(EOS_TOKEN)
            position = raw.find(EOS_TOKEN, start)
        rest = raw[start:]
        held = 0 if final else _longest_marker_prefix_suffix(rest, (EOS_TOKEN,))
        self._eos_tail = rest[len(rest) - held :]
        pieces.append(rest[: len(rest) - held])
        return "".join(pieces)

    # ------------------------------------------------------------------ state machine
    def _advance(self, at_end: bool) -> None:
        """Run state steps until one needs more text (each step returns whether it made progress)."""
        while self._steps[self._state](at_end):
            pass

    def _consume(self, length: int) -> str:
        taken, self._buffer = self._buffer[:length], self._buffer[length:]
        return taken

    def _fail_tool_region(self) -> bool:
        """The markup read since the last committed point is not a call: return it as text and rescan the rest."""
        self._emit_text(self._pending, self._in_reasoning)
        self._pending = ""
        self._state = _State.TEXT
        return True

    def _step_text(self, at_end: bool) -> bool:
        if self._at_start and self._in_reasoning:
            could_be_think_start = len(self._buffer) < len(THINK_START) and THINK_START.startswith(self._buffer)
            if could_be_think_start and not at_end:
                return False
            if self._buffer.startswith(THINK_START):  # the model repeated the prompt's <think>
                self._consume(len(THINK_START))
        self._at_start = False
        markers = _REASONING_MARKERS if self._in_reasoning else _CONTENT_TOOL_STARTS
        found = _earliest_marker(self._buffer, markers)
        if found is None:
            held = 0 if at_end else _longest_marker_prefix_suffix(self._buffer, markers)
            self._emit_text(self._consume(len(self._buffer) - held), self._in_reasoning)
            return False
        position, marker = found
        self._emit_text(self._consume(position), self._in_reasoning)
        self._consume(len(marker))
        if marker == THINK_END:
            self._in_reasoning = False
            return True
        self._pending = marker
        self._region_has_calls = False
        self._state = _State.BLOCK_OPEN if "function_calls" in marker else _State.INVOKE_HEADER
        return True

    def _step_block_open(self, at_end: bool) -> bool:
        opening = re.match(r"\s*>", self._buffer)
        if opening:
            self._pending += self._consume(opening.end())
            self._state = _State.BETWEEN_INVOKES
            return True
        if self._buffer.isspace() or not self._buffer:
            return self._fail_tool_region() if at_end else False
        return self._fail_tool_region()

    def _skip_whitespace(self, keep: bool) -> None:
        """Whitespace between tags is markup: kept pending (``keep``) while nothing is committed, else dropped."""
        spaces = self._consume(_WHITESPACE.match(self._buffer).end())
        if keep:
            self._pending += spaces

    def _step_between_invokes(self, at_end: bool) -> bool:
        self._skip_whitespace(keep=not self._region_has_calls)
        match = _match_start(self._buffer, _INVOKE_OPENERS + _BLOCK_CLOSERS) if self._buffer else _Progress.MORE
        if match is _Progress.MORE and not at_end:
            return False
        if isinstance(match, str) and match in _INVOKE_OPENERS:
            self._pending += self._consume(len(match))
            self._state = _State.INVOKE_HEADER
            return True
        if isinstance(match, str) and self._region_has_calls:  # the wrapper's end after at least one call
            self._consume(len(match))
            self._state = _State.TEXT
            return True
        if isinstance(match, str):  # an empty wrapper is not a tool call
            self._pending += self._consume(len(match))
            return self._fail_tool_region()
        if self._region_has_calls:  # anything else ends the tool region
            self._state = _State.TEXT
            return bool(self._buffer)
        return self._fail_tool_region()

    def _step_invoke_header(self, at_end: bool) -> bool:
        parsed = _parse_attributes(self._buffer)
        if parsed is _Progress.MORE and not at_end:
            return False
        if not isinstance(parsed, tuple):
            return self._fail_tool_region()
        length, attributes = parsed
        name = attributes.get("name")
        if not name or (self._schemas is not None and name not in self._schemas):
            return self._fail_tool_region()
        self._pending += self._consume(length)
        self._call_name = name
        self._call_has_parameters = False
        self._state = _State.INVOKE_BODY
        return True

    def _commit_call(self) -> None:
        """Emit the header of the invoke being parsed: from here on it is a tool call."""
        self._out.append(
            Delta(tool_call=ToolCallDelta(index=self.tool_call_count, id=new_tool_call_id(), name=self._call_name))
        )
        self.tool_call_count += 1
        self._pending = ""
        self._call_open = True
        self._region_has_calls = True
        self._in_reasoning = False  # a call inside reasoning means the model skipped </think>

    def _close_call(self) -> None:
        self._emit_arguments("}" if self._call_has_parameters else "{}")
        self._call_open = False
        self._state = _State.BETWEEN_INVOKES

    def _step_invoke_body(self, at_end: bool) -> bool:
        if self._in_stray_text:
            return self._emit_stray_text(start=0)
        self._skip_whitespace(keep=not self._call_open)
        if not self._buffer:
            if not at_end:
                return False
            return self._fail_tool_region() if not self._call_open else False
        match = _match_start(self._buffer, _PARAMETER_OPENERS + _INVOKE_CLOSERS)
        if match is _Progress.MORE and not at_end:
            return False
        if match in _INVOKE_CLOSERS:
            self._consume(len(match))
            if not self._call_open:
                self._commit_call()
            self._close_call()
            return True
        if match in _PARAMETER_OPENERS:
            parsed = _parse_attributes(self._buffer[len(match) :])
            if parsed is _Progress.MORE and not at_end:
                return False
            if isinstance(parsed, tuple) and "name" in parsed[1]:
                self._consume(len(match) + parsed[0])
                self._open_parameter(parsed[1], dsml=DSML_TOKEN in match)
                return True
        elif self._buffer.startswith("{") and not self._call_open:
            self._state = _State.JSON_BODY
            return True
        if not self._call_open:
            return self._fail_tool_region()
        return self._emit_stray_text(start=1)

    def _emit_stray_text(self, start: int) -> bool:
        """Text inside a committed call that is not a tag goes to content, whitespace included, up to the next "<"
        (searched from ``start``); the run continues into the next delta when no "<" has arrived yet."""
        next_tag = self._buffer.find("<", start)
        self._in_stray_text = next_tag < 0
        self._emit_text(self._consume(len(self._buffer) if next_tag < 0 else next_tag), reasoning=False)
        return not self._in_stray_text

    def _parameter_is_string(self, key: str, string_attribute: str | None) -> bool:
        if string_attribute in ("true", "false"):
            return string_attribute == "true"
        schema = (self._schemas or {}).get(self._call_name, {})
        properties = schema.get("properties") if isinstance(schema, Mapping) else None
        declared = properties.get(key) if isinstance(properties, Mapping) else None
        return isinstance(declared, Mapping) and declared.get("type") == "string"

    def _open_parameter(self, attributes: Mapping[str, str], dsml: bool) -> None:
        if not self._call_open:
            self._commit_call()
        key = attributes["name"]
        self._value_is_string = self._parameter_is_string(key, attributes.get("string"))
        # A DSML parameter only ends at the DSML closer: a plain "</parameter>" inside it is part of the value.
        self._value_closers = (
            (_DSML_PARAMETER_CLOSER,) if dsml else (_PLAIN_PARAMETER_CLOSER, _DSML_PARAMETER_CLOSER)
        )
        self._value_raw = ""
        prefix = ", " if self._call_has_parameters else "{"
        self._emit_arguments(f"{prefix}{to_json(key)}: " + ('"' if self._value_is_string else ""))
        self._call_has_parameters = True
        self._state = _State.PARAMETER_VALUE

    def _take_value_text(self, text: str) -> None:
        if self._value_is_string:
            if text:
                self._emit_arguments(_escaped_string_chars(text))
        else:
            self._value_raw += text

    def _close_parameter(self) -> None:
        self._emit_arguments('"' if self._value_is_string else _json_value_text(self._value_raw))
        self._state = _State.INVOKE_BODY

    def _step_parameter_value(self, at_end: bool) -> bool:
        found = _earliest_marker(self._buffer, self._value_closers)
        if found is None:
            held = 0 if at_end else _longest_marker_prefix_suffix(self._buffer, self._value_closers)
            self._take_value_text(self._consume(len(self._buffer) - held))
            return False
        position, closer = found
        self._take_value_text(self._consume(position))
        self._consume(len(closer))
        self._close_parameter()
        return True

    def _step_json_body(self, at_end: bool) -> bool:
        found = _earliest_marker(self._buffer, _INVOKE_CLOSERS)
        if found is None:
            return self._fail_tool_region() if at_end else False
        position, closer = found
        body = self._buffer[:position].strip()
        try:
            arguments = json.loads(body)
        except ValueError:
            arguments = None
        if not isinstance(arguments, dict):
            return self._fail_tool_region()
        self._consume(position + len(closer))
        self._commit_call()
        self._emit_arguments(body)
        self._call_open = False
        self._state = _State.BETWEEN_INVOKES
        return True
