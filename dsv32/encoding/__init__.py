"""DeepSeek-V3.2 chat encoding: conversation -> prompt text, completion text -> OpenAI message / streaming deltas,
and OpenAI chat request -> encoder input."""

from dsv32.encoding.encode import EncodingError, encode_messages, thinking_mode_for_prompt
from dsv32.encoding.parse import merge_deltas, parse_message_from_completion_text
from dsv32.encoding.requests import ChatEncoding, prepare_chat_request, resolve_thinking
from dsv32.encoding.stream import Delta, StreamingParser, ToolCallDelta

__all__ = [
    "ChatEncoding",
    "Delta",
    "EncodingError",
    "StreamingParser",
    "ToolCallDelta",
    "encode_messages",
    "merge_deltas",
    "parse_message_from_completion_text",
    "prepare_chat_request",
    "resolve_thinking",
    "thinking_mode_for_prompt",
]
