"""``OutputRuns``: the chat parser's deltas as runs of output blocks, the shape the Anthropic Messages and OpenAI
Responses APIs share: one block per run of reasoning, one per run of text, one per tool call. Text the parser finds
inside a tool call (stray text between its parameters) is held until the call's block closes, so a block never
reopens. Each API says what its events look like (``begin`` / ``text_delta`` / ``start_call`` / ``call_arguments``
/ ``end``); the run logic lives here once."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from dsv32.encoding.stream import Delta, ToolCallDelta

Kind = Literal["reasoning", "text", "call"]
Events = list[dict[str, Any]]


@dataclass
class OutputRuns:
    include_text: bool = True  # False: a forced tool call; any text is markup the grammar cut off, not an answer
    include_reasoning: bool = True
    open_kind: Kind | None = None
    held_text: list[str] = field(default_factory=list)

    def feed(self, deltas: Sequence[Delta]) -> Events:
        events: Events = []
        for delta in deltas:
            if delta.reasoning_content and self.include_reasoning:
                events += self._append("reasoning", delta.reasoning_content)
            elif delta.content and self.include_text:
                if self.open_kind == "call":
                    self.held_text.append(delta.content)
                else:
                    events += self._append("text", delta.content)
            elif delta.tool_call is not None:
                call = delta.tool_call
                if call.id is not None:
                    events += self.close()
                    events += self.start_call(call)
                    self.open_kind = "call"
                if call.arguments:
                    events += self.call_arguments(call.arguments)
        return events

    def close(self, status: str = "completed") -> Events:
        """Finish the open block with ``status`` (and send text held back inside a tool call)."""
        if self.open_kind is None:
            return []
        kind, self.open_kind = self.open_kind, None
        events = self.end(kind, status)
        if kind == "call" and self.held_text:
            held, self.held_text = "".join(self.held_text), []
            events += self._append("text", held)
            events += self.close(status)
        return events

    def _append(self, kind: Kind, text: str) -> Events:
        events: Events = []
        if self.open_kind != kind:
            events += self.close()
            events += self.begin(kind)
            self.open_kind = kind
        return events + self.text_delta(kind, text)

    # What each API's events look like.
    def begin(self, kind: Kind) -> Events:
        """Open a reasoning or text block."""
        raise NotImplementedError

    def text_delta(self, kind: Kind, text: str) -> Events:
        raise NotImplementedError

    def start_call(self, call: ToolCallDelta) -> Events:
        raise NotImplementedError

    def call_arguments(self, arguments: str) -> Events:
        raise NotImplementedError

    def end(self, kind: Kind, status: str) -> Events:
        """Close the open block (``kind``) with ``status``."""
        raise NotImplementedError
