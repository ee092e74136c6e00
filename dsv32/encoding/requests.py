"""Turn the pieces of an OpenAI chat request into the DeepSeek-V3.2 encoder's input, the prompt and the output
parser's settings.

``prepare_chat_request`` takes plain dicts (e.g. pydantic ``model_dump(exclude_none=True)``) and returns a
``ChatEncoding``: the messages handed to ``encode_messages``, its ``thinking_mode``, the prompt string, the mode the
completion starts in and the tools the parser may accept. Every problem is a ``ValueError`` whose message names the
field or the message index (the server turns it into an HTTP 400).

Where vLLM (``--tokenizer-mode deepseek_v32``) and SGLang (``_use_dpsk_v32_encoding``) differ, and what we do:

* Thinking switch. vLLM: ``chat_template_kwargs.thinking or chat_template_kwargs.enable_thinking`` (truthy), else
  ``reasoning_effort`` (``"none"`` = off). SGLang: only ``chat_template_kwargs.thinking`` (older) or its
  ``require_reasoning`` flag. Both default to off. We take vLLM's rule, then DeepSeek's own ``thinking:
  {"type": "enabled"|"disabled"}`` and SGLang's ``reasoning: {"enabled": bool}``, then ``reasoning_effort`` (also
  read from ``chat_template_kwargs``): any level but ``"none"`` means thinking - V3.2 has no effort levels. The
  switches must be booleans: a string like ``"false"`` would silently turn thinking on (sglang#15294, #17057).
* Where tools go. vLLM inserts a new ``{"role": "system", "tools": ...}`` at index 0 even when the conversation has
  a system message, so the user's system prompt lands after ``</functions>``. SGLang and DeepSeek's own test attach
  the tools to ``messages[0]`` when it is a system message (an empty one is inserted otherwise). We do the latter:
  it is what the official fixture encodes.
* ``tool_choice``. vLLM renders all tools whatever the choice and enforces ``required``/named choices with
  constrained decoding. SGLang renders no tools for ``"none"`` and only the named tool for a named choice. We do
  what SGLang does (a model shown tools under ``"none"`` calls them anyway and leaks DSML, sglang#35736), and the
  output parser accepts only the rendered tools (none for ``"none"``: DSML text then stays content). ``"required"``
  renders all tools. ``ChatEncoding.tool_call_structural_tag`` is the grammar that enforces ``"required"`` / a named
  function (and ``strict`` tools under ``"auto"``), as both servers do: xgrammar's ``deepseek_v3_2`` structural tag,
  whose DSML is byte for byte what ``encode`` renders for a call; it starts after the thinking, which stays free.
* ``drop_thinking``. vLLM passes ``messages[-1].role == "user"``, SGLang the default ``True`` (``False`` in some
  versions). All render the same prompt except that ``True`` crashes DeepSeek's encoder on a developer message before
  the last user turn. We pass ``False``.
* ``content: null`` becomes ``""`` (SGLang; vLLM hands ``None`` on and the encoder prints ``"None"`` for a user
  message). Text content parts are joined with ``"\\n"`` (vLLM); other part types are refused (text-only model).
* ``reasoning`` is accepted as an alias of ``reasoning_content`` on assistant messages (vLLM; SGLang reads only
  ``reasoning_content``); ``reasoning_content`` wins when both are set.
* ``response_format``. Neither renders it; both constrain decoding instead (so do we, see ``dsv32.server.sampling``).
  The encoder has a slot for it in the system message, so we render the schema there too: ``json_schema`` -> its
  ``schema``, ``json_object`` -> ``{"type": "object"}``, ``text`` and ``structural_tag`` -> nothing. Other types are
  refused.
* The conversation must end with a user, developer or tool message: the V3.2 format has no generation prompt, the
  last turn's rendering is what opens the answer (``<｜Assistant｜><think>`` ...). With ``continue_final_message``
  the last message is an unfinished assistant message, rendered as a raw prefix after the prompt (SGLang).
* Tool ``function`` dicts are rendered with ``None``-valued keys removed (``"description": null`` would otherwise
  reach the prompt, as it does in both servers when pydantic dumps unset fields).
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dsv32.encoding.encode import (
    ROLES,
    THINK_END,
    THINK_START,
    EncodingError,
    encode_messages,
    thinking_mode_for_prompt,
)
from dsv32.encoding.stream import StreamingParser
from dsv32.engine.sampling_params import as_json_schema

REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")
GENERATING_ROLES = ("user", "developer", "tool")  # roles whose rendering ends by opening the assistant's answer


@dataclass
class ChatEncoding:
    """Everything the server needs from a chat request before and after generation."""

    prompt: str  # the full prompt text (BOS included), tokenized with add_special_tokens=False
    messages: list[dict[str, Any]]  # what was passed to encode_messages (minus a continued final message)
    thinking_mode: str  # the encoder's mode: "thinking" or "chat"
    parser_thinking_mode: str  # where the completion starts: "thinking" (inside reasoning) or "chat"
    tools: list[dict[str, Any]] = field(default_factory=list)  # tools the model may call (rendered in the prompt)
    tool_choice: str | dict[str, Any] = "none"  # "none" | "auto" | "required" | {"type": "function", ...}

    def new_parser(self, separate_reasoning: bool = True) -> StreamingParser:
        """A fresh streaming parser for one completion (one per choice when n > 1). Without reasoning separation
        (``--reasoning-parser none``, SGLang's ``separate_reasoning=false``) the whole completion, ``</think>``
        included, is content, as in vLLM without a reasoning parser."""
        return StreamingParser(self.parser_thinking_mode if separate_reasoning else "chat", self.tools)

    @property
    def forces_tool_call(self) -> bool:
        """``tool_choice`` "required" or a named function: the answer is tool calls only (no content)."""
        return self.tool_choice == "required" or isinstance(self.tool_choice, dict)

    def tool_call_structural_tag(self, parallel_tool_calls: bool = True) -> str | None:
        """The grammar of the tool calls this request must make, as xgrammar structural-tag JSON: DSML calls whose
        arguments follow each tool's JSON schema, for ``tool_choice`` "required" or a named function, and under
        "auto" when a tool is ``strict`` (then the answer may be text; non-strict tools' arguments are only
        well-formed). None when nothing is enforced. ``parallel_tool_calls=False`` allows one call."""
        forced = self.forces_tool_call
        if not self.tools or not (forced or any(t["function"].get("strict") for t in self.tools)):
            return None
        from xgrammar import get_model_structural_tag  # the grammar library is loaded only when a request needs it

        tools = self.tools if forced else [
            {**tool, "function": {**tool["function"], "strict": bool(tool["function"].get("strict"))}}
            for tool in self.tools]
        # The thinking is free: the engine starts the grammar after </think> (reasoning "disabled" here).
        tag = get_model_structural_tag("deepseek_v3_2", tools=tools, tool_choice=self.tool_choice,
                                       reasoning="disabled", parallel_tool_calls=parallel_tool_calls)
        return tag.model_dump_json()


def _flag(where: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{where} must be true or false, got {value!r}")
    return value


def resolve_thinking(
    chat_template_kwargs: Mapping[str, Any] | None = None,
    reasoning_effort: str | None = None,
    thinking: Mapping[str, Any] | bool | None = None,
    reasoning: Mapping[str, Any] | None = None,
) -> bool:
    """Whether the request asks for thinking mode; the precedence is in the module docstring."""
    kwargs = chat_template_kwargs or {}
    switches = [key for key in ("thinking", "enable_thinking") if kwargs.get(key) is not None]
    if switches:
        return any(_flag(f"chat_template_kwargs.{key}", kwargs[key]) for key in switches)
    if isinstance(thinking, Mapping):
        kind = thinking.get("type")
        if kind not in ("enabled", "disabled"):
            raise ValueError(f"thinking.type must be 'enabled' or 'disabled', got {kind!r}")
        return kind == "enabled"
    if thinking is not None:
        return _flag("thinking", thinking)
    if reasoning is not None and reasoning.get("enabled") is not None:
        return _flag("reasoning.enabled", reasoning["enabled"])
    effort = kwargs.get("reasoning_effort", reasoning_effort)
    if effort is None:
        return False
    if effort not in REASONING_EFFORTS:
        raise ValueError(f"reasoning_effort must be one of {', '.join(REASONING_EFFORTS)}, got {effort!r}")
    return effort != "none"


def _text(where: str, content: Any) -> str:
    """``str`` / ``None`` / a list of text parts -> one string."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError(f"{where} must be a string, null or a list of text parts")
    texts = []
    for position, part in enumerate(content):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            raise ValueError(
                f"{where}[{position}] must be {{\"type\": \"text\", \"text\": str}} (this model reads text only), "
                f"got type {kind!r}"
            )
        texts.append(part["text"])
    return "\n".join(texts)


def _normalize_tools(where: str, tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise ValueError(f"{where} must be a list of tools")
    normalized = []
    for position, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if (
            not isinstance(tool, Mapping)
            or tool.get("type", "function") != "function"
            or not isinstance(function, Mapping)
            or not isinstance(function.get("name"), str)
        ):
            raise ValueError(
                f"{where}[{position}] must be {{\"type\": \"function\", \"function\": {{\"name\": str, ...}}}}"
            )
        clean_function = {key: value for key, value in function.items() if value is not None}
        normalized.append({"type": "function", "function": clean_function})
    return normalized


def _normalize_message(index: int, message: Any) -> dict[str, Any]:
    """A request message -> the encoder's message dict (only the fields the encoder reads)."""
    where = f"messages[{index}]"
    if not isinstance(message, Mapping):
        raise ValueError(f"{where} must be an object, got {type(message).__name__}")
    role = message.get("role")
    if role not in ROLES:
        raise ValueError(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}")
    normalized: dict[str, Any] = {"role": role, "content": _text(f"{where}.content", message.get("content"))}
    if role in ("system", "developer"):
        if message.get("tools"):
            normalized["tools"] = _normalize_tools(f"{where}.tools", message["tools"])
        if message.get("response_format") is not None:
            normalized["response_format"] = message["response_format"]
    if role == "assistant":
        reasoning = message.get("reasoning_content")
        reasoning = message.get("reasoning") if reasoning is None else reasoning
        if reasoning is not None:
            normalized["reasoning_content"] = _text(f"{where}.reasoning_content", reasoning)
        if message.get("tool_calls"):
            normalized["tool_calls"] = message["tool_calls"]  # shape checked by the encoder
    return normalized


def _select_tools(
    tools: list[dict[str, Any]], tool_choice: str | Mapping[str, Any] | None
) -> tuple[list[dict[str, Any]], str | dict[str, Any]]:
    """(the tools to render and accept, the normalized tool_choice)."""
    if tool_choice is None:
        return tools, "auto" if tools else "none"
    if tool_choice == "none":
        return [], "none"
    if tool_choice in ("auto", "required"):
        if tool_choice == "required" and not tools:
            raise ValueError("tool_choice 'required' needs a non-empty tools list")
        return tools, tool_choice
    function = tool_choice.get("function") if isinstance(tool_choice, Mapping) else None
    name = function.get("name") if isinstance(function, Mapping) else None
    if not isinstance(name, str):
        raise ValueError(
            "tool_choice must be 'none', 'auto', 'required' or {\"type\": \"function\", \"function\": {\"name\": ...}}"
        )
    chosen = [tool for tool in tools if tool["function"]["name"] == name]
    if not chosen:
        raise ValueError(f"tool_choice names the function {name!r}, which is not in tools")
    return chosen, {"type": "function", "function": {"name": name}}


def _response_format_schema(response_format: Mapping[str, Any] | None) -> Any:
    """The JSON value rendered under "## Response Format", or None for free text."""
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, Mapping) else None
    if kind in ("text", "structural_tag"):
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        return as_json_schema(spec.get("schema") if isinstance(spec, Mapping) else None,
                              "response_format.json_schema.schema")
    raise ValueError(f"response_format.type must be 'text', 'json_object', 'json_schema' or 'structural_tag', got "
                     f"{kind!r}")


def _attach_to_system(messages: list[dict[str, Any]], key: str, value: Any) -> None:
    """Put request-level ``tools``/``response_format`` on messages[0] (inserting an empty system message if needed)."""
    if not messages or messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": ""})
    if key in messages[0]:
        raise ValueError(f"{key} given both in the request and on messages[0]; give it once")
    messages[0][key] = value


def _continuation_prefix(final: Mapping[str, Any], prompt: str) -> tuple[str, str]:
    """(text appended to the prompt, parser mode) for an unfinished final assistant message."""
    if final.get("tool_calls"):
        raise ValueError("continue_final_message cannot continue an assistant message that has tool_calls")
    content = final["content"]
    if prompt.endswith(THINK_START):
        reasoning = final.get("reasoning_content") or ""
        if content:
            return reasoning + THINK_END + content, "chat"
        return reasoning, "thinking"
    return content, "chat"


def prepare_chat_request(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    tool_choice: str | Mapping[str, Any] | None = None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    reasoning_effort: str | None = None,
    response_format: Mapping[str, Any] | None = None,
    thinking: Mapping[str, Any] | bool | None = None,
    reasoning: Mapping[str, Any] | None = None,
    continue_final_message: bool = False,
) -> ChatEncoding:
    """Encode an OpenAI chat request for DeepSeek-V3.2 (rules and vLLM/SGLang differences: module docstring).

    ``thinking`` is DeepSeek's API field (``{"type": "enabled"}``), ``reasoning`` SGLang's (``{"enabled": true}``).
    With ``continue_final_message`` the last message must be an assistant message; the model continues its text.
    """
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise ValueError("messages must be a non-empty list")
    normalized = [_normalize_message(index, message) for index, message in enumerate(messages)]
    final = normalized.pop() if continue_final_message else None
    if final is not None and final["role"] != "assistant":
        raise ValueError(f"messages[{len(messages) - 1}]: continue_final_message needs a final assistant message")
    if not normalized or normalized[-1]["role"] not in GENERATING_ROLES:
        last = len(normalized) - 1
        raise ValueError(
            f"messages[{max(last, 0)}]: the conversation must end with a user, developer or tool message "
            "(or set continue_final_message to continue a final assistant message)"
        )

    request_tools = _normalize_tools("tools", list(tools)) if tools else []
    rendered_tools, choice = _select_tools(request_tools, tool_choice)
    request_length = len(normalized)
    if rendered_tools:
        _attach_to_system(normalized, "tools", rendered_tools)
    schema = _response_format_schema(response_format)
    if schema is not None:
        _attach_to_system(normalized, "response_format", schema)
    inserted = len(normalized) - request_length  # an empty system message put in front for tools/response_format

    thinking_on = resolve_thinking(chat_template_kwargs, reasoning_effort, thinking, reasoning)
    thinking_mode = "thinking" if thinking_on else "chat"
    try:
        # drop_thinking=False renders what True does, without the reference's failure on earlier developer messages.
        prompt = encode_messages(normalized, thinking_mode, drop_thinking=False)
    except EncodingError as error:
        raise ValueError(f"messages[{error.index - inserted}]: {error.problem}") from None
    parser_mode = thinking_mode_for_prompt(prompt)
    if final is not None:
        prefix, parser_mode = _continuation_prefix(final, prompt)
        prompt += prefix
    accepted_tools = [tool for message in normalized for tool in message.get("tools", [])]
    return ChatEncoding(
        prompt=prompt,
        messages=normalized,
        thinking_mode=thinking_mode,
        parser_thinking_mode=parser_mode,
        tools=accepted_tools,
        tool_choice=choice,
    )
