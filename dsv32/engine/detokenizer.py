"""Generated token ids -> text, one step at a time: incremental detokenization and stop-string matching.

``IncrementalDetokenizer`` turns each step's new tokens into the newly final text, never splitting a UTF-8 character.
``StopChecker`` keeps one completion's cumulative text, cuts it at the first stop string, and hands out streaming
deltas that can never contain (part of) a stop string.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from dsv32.tokenizer import Tokenizer

# What lossy UTF-8 decoding yields for an incomplete (or invalid) byte sequence.
REPLACEMENT_CHAR = "\ufffd"

# How many prompt tokens to decode in front of the output, as vLLM does (for decoders whose output depends on what
# precedes a token, e.g. SentencePiece's leading-space handling; byte-level BPE does not need it).
PROMPT_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Decodes one completion's tokens as they arrive (vLLM's prefix/read offset technique).

    Tokens ``[prefix_offset, read_offset)`` are already emitted and serve as decoding context; each new token is
    decoded together with them, and the text past the context is emitted unless it ends in U+FFFD, which means a
    byte-level token stopped mid-character: that text is held until a later token completes it (or ``finish``).
    Every offset is therefore a character boundary, so the concatenated deltas equal
    ``tokenizer.decode(output_ids)``.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int],
                 skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        context = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        # A prompt cut mid-character would glue its broken tail onto the first output character; start bare instead.
        if self._decode(context).endswith(REPLACEMENT_CHAR):
            context = []
        self._token_ids = context
        self._prefix_offset = 0
        self._read_offset = len(context)

    def _decode(self, token_ids: list[int]) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=self._skip_special_tokens)

    def step(self, new_token_ids: Sequence[int]) -> str:
        """Add this step's tokens; return the text they complete (possibly empty while a character is unfinished)."""
        delta = []
        for token_id in new_token_ids:
            self._token_ids.append(token_id)
            delta.append(self._emit(hold_incomplete=True))
        return "".join(delta)

    def finish(self) -> str:
        """Return whatever is still held (an unfinished character becomes U+FFFD, as in a full decode)."""
        return self._emit(hold_incomplete=False)

    def _emit(self, hold_incomplete: bool) -> str:
        context_text = self._decode(self._token_ids[self._prefix_offset:self._read_offset])
        window_text = self._decode(self._token_ids[self._prefix_offset:])
        # Shorter or equal: the new tokens decode to nothing (e.g. skipped special tokens); keep the offsets.
        if len(window_text) <= len(context_text):
            return ""
        if hold_incomplete and window_text.endswith(REPLACEMENT_CHAR):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._token_ids)
        return window_text[len(context_text):]


@dataclass(frozen=True)
class StopMatch:
    """A stop string found in the output: which one, and the output text cut at it."""

    stop: str
    text: str


def find_stop_string(text: str, new_char_count: int, stop_strings: Sequence[str],
                     include_stop_str_in_output: bool = False) -> StopMatch | None:
    """The first stop string in ``text`` that ends within its last ``new_char_count`` characters.

    Earlier text was checked before, so only matches that end in the new part are looked for. Among them the one
    that ends first wins (ties: the longest), which is what character-by-character generation would have hit, so
    the result does not depend on how the text was split into tokens. The stop string is cut from the text unless
    ``include_stop_str_in_output``; anything after it is always cut.
    """
    if new_char_count <= 0:
        return None
    old_length = len(text) - new_char_count
    best_start = best_end = -1
    best_stop = ""
    for stop in stop_strings:
        start = text.find(stop, max(0, old_length - len(stop) + 1))
        if start == -1:
            continue
        end = start + len(stop)
        if best_end == -1 or (end, start) < (best_end, best_start):
            best_start, best_end, best_stop = start, end, stop
    if best_end == -1:
        return None
    return StopMatch(stop=best_stop, text=text[:best_end] if include_stop_str_in_output else text[:best_start])


def stop_prefix_length(text: str, stop_strings: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that is a proper beginning of a stop string: the characters a stream
    must hold back, because the next tokens could complete a stop string that starts there."""
    longest = 0
    for stop in stop_strings:
        for length in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:length]):
                longest = length
                break
    return longest


class StopChecker:
    """One completion's cumulative output text, checked for stop strings as it grows.

    ``append`` each detokenized delta; once it returns a stop string, ``text`` is final (cut at the stop) and the
    completion should finish with ``stop_reason`` = that string. ``stream_delta`` gives the text that is safe to send
    to a streaming client: it withholds a tail that could still turn out to be the start of a stop string (none when
    ``include_stop_str_in_output``, where a stop string may be shown anyway and the text after it is cut before
    it is ever streamed).
    """

    def __init__(self, stop_strings: Sequence[str], include_stop_str_in_output: bool = False) -> None:
        if any(not stop for stop in stop_strings):
            raise ValueError("stop strings must be non-empty.")
        self.stop_strings = list(stop_strings)
        self.include_stop_str_in_output = include_stop_str_in_output
        self.text = ""
        self.stopped_by: str | None = None
        self._streamed_length = 0

    def append(self, delta: str, check: bool = True) -> str | None:
        """Add newly detokenized text; return the stop string it completed, if any. With ``check`` False the text
        is only recorded (vLLM does not look for stop strings until more than ``min_tokens`` tokens exist)."""
        if self.stopped_by is not None:
            raise RuntimeError(f"The output already stopped at {self.stopped_by!r}; no more text can be added.")
        self.text += delta
        if not check:
            return None
        match = find_stop_string(self.text, len(delta), self.stop_strings, self.include_stop_str_in_output)
        if match is None:
            return None
        self.text = match.text
        self.stopped_by = match.stop
        return match.stop

    def stream_delta(self, finished: bool = False) -> str:
        """The text not yet streamed that can no longer become part of a stop string; everything once ``finished``
        (or stopped)."""
        end = len(self.text)
        if not finished and self.stopped_by is None and not self.include_stop_str_in_output:
            end -= stop_prefix_length(self.text, self.stop_strings)
        if end <= self._streamed_length:
            return ""
        delta = self.text[self._streamed_length:end]
        self._streamed_length = end
        return delta
