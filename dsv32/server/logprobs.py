"""Engine logprobs -> the two OpenAI shapes: chat's per-token objects (``token``, ``logprob``, ``bytes``,
``top_logprobs``) and the legacy completions lists (``tokens``, ``token_logprobs``, ``top_logprobs``,
``text_offset``), plus vLLM's ``prompt_logprobs``.

The engine sends logprob entries as token ids, floats and ranks; their token strings are decoded here, in the API
server process, with the server's tokenizer (``logprob_token_text``, the helper the offline ``LLM`` uses too), so the
engine process spends no time on them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from dsv32.engine.outputs import Logprob, PositionLogprobs, logprob_token_text
from dsv32.server.protocol import CompletionLogprobs, TokenLogprob, TopLogprob
from dsv32.tokenizer import Tokenizer

# JSON has no -inf; vLLM sends this floor instead.
_LOGPROB_FLOOR = -9999.0


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's byte -> printable-character table, which byte-level BPE vocabularies are written in."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def _finite(value: float) -> float:
    return value if math.isfinite(value) else _LOGPROB_FLOOR


class LogprobFormatter:
    """Token strings and byte sequences for logprob entries, decoded the way vLLM reports them."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer

    def text(self, token_id: int) -> str:
        return logprob_token_text(self._tokenizer, token_id)

    def token_bytes(self, token_id: int, text: str) -> list[int]:
        """The token's exact bytes (a token may hold half of a UTF-8 character, which its text cannot show)."""
        piece = self._tokenizer.convert_ids_to_tokens([token_id])[0]
        decoder = _byte_decoder()
        if piece is not None and all(ch in decoder for ch in piece):
            return [decoder[ch] for ch in piece]
        return list(text.encode("utf-8"))

    def _top(self, position: PositionLogprobs, limit: int) -> list[tuple[int, Logprob]]:
        ranked = sorted(position.items(), key=lambda item: (-item[1].logprob, item[0]))
        return ranked[:limit]

    def chat(self, token_ids: Sequence[int], positions: Sequence[PositionLogprobs],
             top_n: int) -> list[TokenLogprob]:
        entries: list[TokenLogprob] = []
        for token_id, position in zip(token_ids, positions, strict=False):
            chosen = position.get(token_id)
            text = self.text(token_id)
            top = [TopLogprob(token=(t := self.text(tid)), logprob=_finite(lp.logprob),
                              bytes=self.token_bytes(tid, t)) for tid, lp in self._top(position, top_n)]
            entries.append(TokenLogprob(token=text, logprob=_finite(chosen.logprob) if chosen else _LOGPROB_FLOOR,
                                        bytes=self.token_bytes(token_id, text), top_logprobs=top))
        return entries

    def completion(self, token_ids: Sequence[int], positions: Sequence[PositionLogprobs | None],
                   top_n: int, into: CompletionLogprobs, text_offset: int | None = None) -> int:
        """Appends one entry per token to ``into``; a ``None`` position (the first prompt token, which nothing
        precedes) gets null logprobs. ``text_offset`` (the character offset of the first token; default: right after
        the last entry already in ``into``) grows by each token's text, as in vLLM. Returns the offset after the
        last token."""
        result = into
        offset = text_offset if text_offset is not None else (
            result.text_offset[-1] + len(result.tokens[-1]) if result.tokens else 0)
        for token_id, position in zip(token_ids, positions, strict=False):
            chosen = position.get(token_id) if position is not None else None
            text = self.text(token_id)
            result.tokens.append(text)
            result.text_offset.append(offset)
            offset += len(text)
            if position is None:
                result.token_logprobs.append(None)
                result.top_logprobs.append(None)
                continue
            result.token_logprobs.append(_finite(chosen.logprob) if chosen else _LOGPROB_FLOOR)
            top = {self.text(tid): _finite(lp.logprob) for tid, lp in self._top(position, top_n)}
            # vLLM always lists the chosen token among the alternatives.
            top.setdefault(text, _finite(chosen.logprob) if chosen else _LOGPROB_FLOOR)
            result.top_logprobs.append(top)
        return offset

    def prompt_logprobs(self, positions: Sequence[PositionLogprobs | None]
                        ) -> list[dict[str, dict[str, Any]] | None]:
        """vLLM's ``prompt_logprobs`` extension shape: token id -> ``{logprob, rank, decoded_token}`` per position."""
        return [None if position is None else {
            str(tid): {"logprob": _finite(lp.logprob), "rank": lp.rank, "decoded_token": self.text(tid)}
            for tid, lp in position.items()} for position in positions]
