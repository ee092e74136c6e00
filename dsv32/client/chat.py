"""``dsv32 chat``: an interactive terminal chat with a running OpenAI-compatible server. The answer streams in as
it is generated; the model's thinking is shown dimmed, apart from the answer, and is not sent back in later turns
(the V3.2 encoding drops earlier turns' reasoning anyway).

Commands: ``/thinking on|off``, ``/clear`` (forget the conversation), ``/exit`` (or Ctrl-D). Ctrl-C stops the
answer being generated (closing the stream aborts it on the server).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

import httpx

from dsv32.client.sse import error_message, payloads, response_error

HELP = "commands: /thinking on|off, /clear, /exit (Ctrl-D); Ctrl-C stops an answer"
_DIM, _RESET = "\033[2m", "\033[0m"


class ChatError(Exception):
    """The server refused a request or could not be reached; the message is for the user."""


class ChatSession:
    """One conversation against one server."""

    def __init__(self, args: argparse.Namespace, out: TextIO) -> None:
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        self._client = httpx.Client(base_url=args.url.rstrip("/"), headers=headers, timeout=httpx.Timeout(600.0,
                                                                                                            connect=10))
        self._args = args
        self._out = out
        self._color = out.isatty()
        self.thinking: bool = args.thinking
        self.messages: list[dict[str, Any]] = []
        self.model: str = args.model or ""

    def close(self) -> None:
        self._client.close()

    def connect(self) -> None:
        try:
            response = self._client.get("/v1/models")
        except httpx.HTTPError as exc:
            raise ChatError(f"cannot reach {self._args.url}: {exc}") from None
        if response.status_code != 200:
            raise ChatError(response_error(response.status_code, response.content))
        if not self.model:
            self.model = response.json()["data"][0]["id"]

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self._args.system}] if self._args.system else []

    def _write(self, text: str, dim: bool = False) -> None:
        self._out.write(f"{_DIM}{text}{_RESET}" if dim and self._color else text)
        self._out.flush()

    def ask(self, user_text: str) -> str:
        """Send one user turn, stream the reply to the terminal, and return the answer's text."""
        self.messages.append({"role": "user", "content": user_text})
        body: dict[str, Any] = {"model": self.model, "messages": self.messages, "stream": True,
                                "max_tokens": self._args.max_tokens,
                                "chat_template_kwargs": {"thinking": self.thinking}}
        for key in ("temperature", "top_p"):
            if getattr(self._args, key) is not None:
                body[key] = getattr(self._args, key)
        answer: list[str] = []
        in_thinking = False
        try:
            with self._client.stream("POST", "/v1/chat/completions", json=body) as response:
                if response.status_code != 200:
                    raise ChatError(response_error(response.status_code, response.read()))
                for payload in payloads(response.iter_lines()):
                    if "error" in payload:
                        raise ChatError(error_message(payload))
                    for choice in payload.get("choices", []):
                        delta = choice.get("delta", {})
                        reasoning = delta.get("reasoning_content") or delta.get("reasoning")
                        if reasoning:
                            if not in_thinking:
                                self._write("thinking: ", dim=True)
                                in_thinking = True
                            self._write(reasoning, dim=True)
                        if delta.get("content"):
                            if in_thinking:
                                self._write("\n\n")
                                in_thinking = False
                            answer.append(delta["content"])
                            self._write(delta["content"])
                        for call in delta.get("tool_calls") or []:
                            function = call.get("function") or {}
                            self._write(f"[tool call {function.get('name') or ''}{function.get('arguments') or ''}]")
        except httpx.HTTPError as exc:
            self.messages.pop()
            raise ChatError(f"connection failed: {exc}") from None
        except (ChatError, KeyboardInterrupt):
            self.messages.pop()
            raise
        finally:
            self._write("\n")
        text = "".join(answer)
        self.messages.append({"role": "assistant", "content": text})
        return text

    def command(self, line: str) -> bool:
        """Handle a /command; returns False when the user wants to leave."""
        words = line.split()
        if words[0] in ("/exit", "/quit"):
            return False
        if words[0] == "/clear":
            self.reset()
            self._write("(conversation cleared)\n")
        elif words[0] == "/thinking" and len(words) == 2 and words[1] in ("on", "off"):
            self.thinking = words[1] == "on"
            self._write(f"(thinking {words[1]})\n")
        else:
            self._write(HELP + "\n")
        return True


def run_chat_client(args: argparse.Namespace, stdin: TextIO = sys.stdin, out: TextIO = sys.stdout) -> int:
    session = ChatSession(args, out)
    try:
        session.connect()
    except ChatError as exc:
        print(f"dsv32 chat: {exc}", file=sys.stderr)
        session.close()
        return 1
    session.reset()
    interactive = stdin.isatty()
    out.write(f"chatting with {session.model} at {args.url} (thinking {'on' if session.thinking else 'off'}); "
              f"{HELP}\n")
    try:
        while True:
            if interactive:
                out.write("> ")
                out.flush()
            line = stdin.readline()
            if not line:
                break
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if not session.command(line):
                    break
                continue
            try:
                session.ask(line)
            except ChatError as exc:
                out.write(f"error: {exc}\n")
            except KeyboardInterrupt:
                out.write("\n(stopped)\n")
    except KeyboardInterrupt:
        out.write("\n")
    finally:
        session.close()
    return 0
