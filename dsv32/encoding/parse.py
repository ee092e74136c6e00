"""Non-streaming parse of a DeepSeek-V3.2 completion into an OpenAI assistant message.

``parse_message_from_completion_text`` has the name and arguments of DeepSeek's reference parser and returns the same
dict for well-formed output (plus tool-call ids). Unlike the reference, which asserts on anything unexpected, it never
raises on model output: it is the streaming parser fed the whole text, so malformed output is recovered by the same
rules (see ``stream.py``) and streaming and non-streaming results are identical by construction.
"""

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from dsv32.encoding.stream import Delta, StreamingParser


def merge_deltas(deltas: Iterable[Delta]) -> dict[str, Any]:
    """Accumulate streamed deltas into ``{"role", "content", "reasoning_content", "tool_calls"}`` (OpenAI shape,
    ``arguments`` a JSON string; ``content``/``reasoning_content`` are ``""`` when absent, ``tool_calls`` ``[]``)."""
    reasoning: list[str] = []
    content: list[str] = []
    tool_calls: list[dict[str, Any]] = []
    for delta in deltas:
        if delta.reasoning_content is not None:
            reasoning.append(delta.reasoning_content)
        if delta.content is not None:
            content.append(delta.content)
        call = delta.tool_call
        if call is not None:
            if call.id is not None:
                tool_calls.append({"id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}})
            tool_calls[call.index]["function"]["arguments"] += call.arguments
    return {
        "role": "assistant",
        "content": "".join(content),
        "reasoning_content": "".join(reasoning),
        "tool_calls": tool_calls,
    }


def parse_message_from_completion_text(
    text: str, thinking_mode: str, tools: Sequence[Mapping[str, Any]] | None = None
) -> dict[str, Any]:
    """Parse a whole completion (decoded with special tokens kept, prompt excluded).

    ``thinking_mode``: ``"thinking"`` if the prompt ended with ``<think>``, else ``"chat"``. ``tools``: the OpenAI
    tools the model may call (``None``: any name, as the reference). Raises ``ValueError`` only for a bad
    ``thinking_mode``.
    """
    parser = StreamingParser(thinking_mode, tools)
    return merge_deltas(parser.feed(text) + parser.finish())
