"""Render an OpenAI-style conversation into a DeepSeek-V3.2 prompt string, byte-exact with DeepSeek's encoder.

DeepSeek-V3.2 ships no Jinja chat template; its reference is the Python module ``encoding/encoding_dsv32.py``.
``encode_messages`` here has the same name, arguments and output for every conversation the reference accepts.
Where the reference would fail with an ``assert``, ``KeyError`` or ``NotImplementedError`` we raise one
``EncodingError`` (a ``ValueError``) that names the offending message (its index in ``context + messages``).

The one input the reference cannot encode at all - a ``developer`` message before the last user/developer message,
in thinking mode with ``drop_thinking=True`` (its drop step removes the message and then indexes past the end) -
raises a ``ValueError`` that says to use ``drop_thinking=False``; that setting renders the exact same prompt for every
other conversation, because reasoning before the last user message is never rendered anyway.
"""

import json
from collections.abc import Mapping, Sequence
from typing import Any

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
USER_TOKEN = "<｜User｜>"
ASSISTANT_TOKEN = "<｜Assistant｜>"
THINK_START = "<think>"
THINK_END = "</think>"
DSML_TOKEN = "｜DSML｜"

THINKING_MODES = ("chat", "thinking")
ROLES = ("system", "developer", "user", "assistant", "tool")

TOOLS_SYSTEM_TEMPLATE = """## Tools

You have access to a set of tools you can use to answer the user's question.
You can invoke functions by writing a "<{dsml_token}function_calls>" block like the following as part of your reply to the user:
<{dsml_token}function_calls>
<{dsml_token}invoke name="$FUNCTION_NAME">
<{dsml_token}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{dsml_token}parameter>
...
</{dsml_token}invoke>
<{dsml_token}invoke name="$FUNCTION_NAME2">
...
</{dsml_token}invoke>
</{dsml_token}function_calls>

String and scalar parameters should be specified as is without any escaping or quotes, while lists and objects should use JSON format. The "string" attribute should be set to "true" for string type parameters and "false" for other types (numbers, booleans, arrays, objects).

If the thinking_mode is enabled, then after function results you should strongly consider outputting a thinking block. Here is an example:

<{dsml_token}function_calls>
...
</{dsml_token}function_calls>

<function_results>
...
</function_results>

{thinking_start_token}...thinking about results{thinking_end_token}

Here are the functions available in JSONSchema format:
<functions>
{tool_schemas}
</functions>
"""  # noqa: E501  (verbatim from the reference; the prompt bytes depend on it)

RESPONSE_FORMAT_TEMPLATE = "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n{schema}"
TOOL_CALLS_START = f"\n\n<{DSML_TOKEN}function_calls>"
DEVELOPER_MESSAGE_PREFIX = "\n\n# The user's message is: "


def to_json(value: Any) -> str:
    """The reference's JSON rendering: default separators, key order kept, non-ASCII kept as is."""
    return json.dumps(value, ensure_ascii=False)


def thinking_mode_for_prompt(prompt: str) -> str:
    """The mode the completion starts in: a prompt ending in ``<think>`` means the model's output begins inside
    reasoning; anything else (``</think>``) means it begins with the answer. Derive the output parser's mode from
    the rendered prompt rather than from request flags (serving.md §2.3, sglang#17551)."""
    return "thinking" if prompt.endswith(THINK_START) else "chat"


def render_tools(tools: Sequence[Mapping[str, Any]]) -> str:
    """The tools section of a system/developer message; ``tools`` is the OpenAI list ``[{"type": "function",
    "function": {...}}]`` and each function dict is rendered as one line of JSON."""
    schemas = "\n".join(to_json(tool["function"]) for tool in tools)
    return TOOLS_SYSTEM_TEMPLATE.format(
        tool_schemas=schemas,
        dsml_token=DSML_TOKEN,
        thinking_start_token=THINK_START,
        thinking_end_token=THINK_END,
    )


def encode_arguments_to_dsml(arguments: Mapping[str, Any]) -> str:
    """One ``parameter`` line per argument: strings verbatim with ``string="true"``, anything else as JSON."""
    lines = []
    for key, value in arguments.items():
        is_string = isinstance(value, str)
        rendered = value if is_string else to_json(value)
        lines.append(
            f'<{DSML_TOKEN}parameter name="{key}" string="{"true" if is_string else "false"}">'
            f"{rendered}</{DSML_TOKEN}parameter>"
        )
    return "\n".join(lines)


def render_tool_calls(tool_calls: Sequence[Mapping[str, Any]]) -> str:
    """The DSML block of an assistant message, including the ``\\n\\n`` that separates it from the content."""
    invokes = [
        f'<{DSML_TOKEN}invoke name="{call["name"]}">\n{encode_arguments_to_dsml(call["arguments"])}\n'
        f"</{DSML_TOKEN}invoke>"
        for call in tool_calls
    ]
    return f"{TOOL_CALLS_START}\n" + "\n".join(invokes) + f"\n</{DSML_TOKEN}function_calls>"


class EncodingError(ValueError):
    """An invalid conversation; ``index`` is the offending message's position in ``context + messages``."""

    def __init__(self, index: int, problem: str) -> None:
        super().__init__(f"message {index}: {problem}")
        self.index = index
        self.problem = problem


def _fail(index: int, problem: str) -> EncodingError:
    return EncodingError(index, problem)


def _check_text(index: int, message: Mapping[str, Any], field: str) -> None:
    """Text fields must be str or None (the reference would render any other object's ``str()``)."""
    value = message.get(field)
    if value is not None and not isinstance(value, str):
        raise _fail(
            index, f"'{field}' must be a string or null, got {type(value).__name__} (flatten content parts first)"
        )


def _check_tools(index: int, tools: Any) -> None:
    if not isinstance(tools, list) or not all(
        isinstance(tool, Mapping) and isinstance(tool.get("function"), Mapping) for tool in tools
    ):
        raise _fail(index, "'tools' must be a list of OpenAI tools like {\"type\": \"function\", \"function\": {...}}")


def _check_json_value(index: int, field: str, value: Any) -> None:
    try:
        to_json(value)
    except (TypeError, ValueError) as error:
        raise _fail(index, f"'{field}' is not JSON-serialisable: {error}") from None


def _decoded_tool_calls(index: int, tool_calls: Any) -> list[dict[str, Any]]:
    """OpenAI tool calls -> ``[{"name", "arguments": dict}]``; arguments may be a JSON-object string or a dict."""
    if not isinstance(tool_calls, list):
        raise _fail(index, "'tool_calls' must be a list")
    decoded = []
    for position, call in enumerate(tool_calls):
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise _fail(index, f"tool_calls[{position}] must look like {{\"function\": {{\"name\": str, ...}}}}")
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError as error:
                raise _fail(index, f"tool_calls[{position}].function.arguments is not valid JSON: {error}") from None
        if not isinstance(arguments, Mapping):
            raise _fail(index, f"tool_calls[{position}].function.arguments must be a JSON object")
        _check_json_value(index, f"tool_calls[{position}].function.arguments", arguments)
        decoded.append({"name": function["name"], "arguments": arguments})
    return decoded


def _validate(index: int, message: Any) -> None:
    """Shape checks for one message, before anything is rendered."""
    if not isinstance(message, Mapping):
        raise _fail(index, f"must be a dict, got {type(message).__name__}")
    role = message.get("role")
    if role not in ROLES:
        raise _fail(index, f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
    for field in ("content", "reasoning_content"):
        _check_text(index, message, field)
    if role in ("system", "developer"):
        if message.get("tools"):
            _check_tools(index, message["tools"])
        if message.get("response_format"):
            _check_json_value(index, "response_format", message["response_format"])
    if role == "developer" and not message.get("content"):
        raise _fail(index, "a developer message needs non-empty content")
    if role == "assistant" and message.get("tool_calls"):
        _decoded_tool_calls(index, message["tool_calls"])


def find_last_user_index(messages: Sequence[Mapping[str, Any]]) -> int:
    """Index of the last user or developer message, -1 if there is none."""
    for index in range(len(messages) - 1, -1, -1):
        if messages[index].get("role") in ("user", "developer"):
            return index
    return -1


def _drop_old_reasoning(messages: list[Mapping[str, Any]], last_user_index: int) -> list[Mapping[str, Any]]:
    """The reference's ``drop_thinking_messages``: strip reasoning from assistant turns before the last user turn."""
    kept: list[Mapping[str, Any]] = []
    for index, message in enumerate(messages):
        role = message["role"]
        if role in ("user", "system", "tool") or index >= last_user_index:
            kept.append(message)
        elif role == "assistant":
            kept.append({key: value for key, value in message.items() if key != "reasoning_content"})
        else:
            raise _fail(
                index,
                "a developer message before the last user/developer message cannot be encoded in thinking mode "
                "with drop_thinking=True (DeepSeek's encoder drops it and fails); pass drop_thinking=False, "
                "which renders the same prompt otherwise",
            )
    return kept


def _render_system(message: Mapping[str, Any]) -> str:
    prompt = message.get("content") or ""
    if message.get("tools"):
        prompt += "\n\n" + render_tools(message["tools"])
    if message.get("response_format"):
        prompt += "\n\n" + RESPONSE_FORMAT_TEMPLATE.format(schema=to_json(message["response_format"]))
    return prompt


def _render_developer(message: Mapping[str, Any]) -> str:
    body = ""
    if message.get("tools"):
        body += "\n\n" + render_tools(message["tools"])
    if message.get("response_format"):
        body += "\n\n" + RESPONSE_FORMAT_TEMPLATE.format(schema=to_json(message["response_format"]))
    body += DEVELOPER_MESSAGE_PREFIX + message["content"]
    return USER_TOKEN + body + ASSISTANT_TOKEN


def _render_tool(index: int, messages: Sequence[Mapping[str, Any]], opens_thinking: bool) -> str:
    """One ``<result>``; the first of a run opens ``<function_results>``, the last one closes it."""
    assistant_index = index - 1
    while assistant_index >= 0 and messages[assistant_index]["role"] == "tool":
        assistant_index -= 1
    position = index - assistant_index  # 1-based position among the results answering that assistant turn
    if assistant_index < 0 or messages[assistant_index]["role"] != "assistant":
        raise _fail(index, "a tool result must follow an assistant message with tool_calls")
    call_count = len(messages[assistant_index].get("tool_calls") or [])
    if position > call_count:
        raise _fail(
            index,
            f"tool result #{position} after message {assistant_index}, which made {call_count} tool call(s)",
        )
    # `content=None` renders as "None", exactly like the reference's str.format.
    prompt = "\n\n<function_results>" if position == 1 else ""
    prompt += f"\n<result>{messages[index].get('content')}</result>"
    if position == call_count:
        prompt += "\n</function_results>\n\n" + (THINK_START if opens_thinking else THINK_END)
    return prompt


def _render_assistant(index: int, message: Mapping[str, Any], renders_reasoning: bool) -> str:
    tool_calls = _decoded_tool_calls(index, message["tool_calls"]) if message.get("tool_calls") else []
    prompt = ""
    if renders_reasoning:
        if not message.get("reasoning_content") and not tool_calls:
            raise _fail(
                index,
                "in thinking mode an assistant message after the last user message needs reasoning_content "
                "or tool_calls",
            )
        prompt += (message.get("reasoning_content") or "") + THINK_END
    prompt += message.get("content") or ""
    if tool_calls:
        prompt += render_tool_calls(tool_calls)
    return prompt + EOS_TOKEN


def _render_message(index: int, messages: Sequence[Mapping[str, Any]], thinking: bool, last_user: int) -> str:
    message = messages[index]
    role = message["role"]
    if role == "system":
        return _render_system(message)
    if role in ("user", "developer"):
        # `content=None` of a user message renders as "None", exactly like the reference.
        if role == "developer":
            opening = _render_developer(message)
        else:
            opening = f"{USER_TOKEN}{message.get('content')}{ASSISTANT_TOKEN}"
        return opening + (THINK_START if thinking and index == last_user else THINK_END)
    if role == "tool":
        return _render_tool(index, messages, opens_thinking=thinking and index >= last_user)
    return _render_assistant(index, message, renders_reasoning=thinking and index > last_user)


def encode_messages(
    messages: Sequence[Mapping[str, Any]],
    thinking_mode: str = "thinking",
    context: Sequence[Mapping[str, Any]] | None = None,
    drop_thinking: bool = True,
    add_default_bos_token: bool = True,
) -> str:
    """Render ``messages`` (after the already-rendered ``context``) as DeepSeek-V3.2 prompt text.

    ``thinking_mode`` is ``"thinking"`` or ``"chat"``. Only ``messages`` are rendered, but which message is the last
    user turn is decided over ``context + messages``; the BOS token is added only when there is no context.
    The prompt of a conversation whose last message is user/developer/tool ends with ``<think>`` (thinking) or
    ``</think>`` (chat), which is where the model's completion starts.
    """
    if thinking_mode not in THINKING_MODES:
        raise ValueError(f"thinking_mode must be 'chat' or 'thinking', got {thinking_mode!r}")
    if not isinstance(messages, Sequence) or isinstance(messages, str | bytes):
        raise ValueError("messages must be a list of message dicts")
    context = list(context or [])
    full = context + list(messages)
    for index, message in enumerate(full):
        _validate(index, message)

    thinking = thinking_mode == "thinking"
    last_user = find_last_user_index(full)
    if thinking and drop_thinking:
        full = _drop_old_reasoning(full, last_user)

    prompt = BOS_TOKEN if add_default_bos_token and not context else ""
    for index in range(len(context), len(full)):
        prompt += _render_message(index, full, thinking, last_user)
    return prompt
