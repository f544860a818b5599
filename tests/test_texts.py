"""The embedded texts' token ids are remembered per tokenizer: the same ids as tokenizing, without tokenizing again."""

from __future__ import annotations

import json

from workbench.options import Calibration
from workbench.texts import calibration_samples, default_text, evaluation_blocks, token_ids


class _Counting:
    """A tokenizer that counts the long texts it is asked to tokenize (not the probes of its BOS)."""

    def __init__(self, tokenizer):
        self.inner, self.calls = tokenizer, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, *args, **kwargs):
        self.calls += len(str(args[0])) > 1000
        return self.inner(*args, **kwargs)


def test_remembered_ids_equal_tokenizing_and_are_read_back_without_tokenizing(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path))
    text = default_text("evaluation")
    counting = _Counting(tokenizer)
    fresh = tokenizer(text, add_special_tokens=False).input_ids
    assert token_ids(counting, text, remember=True) == fresh and counting.calls == 1
    assert token_ids(counting, text, remember=True) == fresh and counting.calls == 1  # read back, not tokenized
    assert len(list((tmp_path / "cache" / "tokens").iterdir())) == 1
    assert token_ids(counting, text + "x", remember=True) != fresh and counting.calls == 2  # another text, another key
    for _ in range(2):
        token_ids(counting, text)
    assert counting.calls == 4  # not asked to remember: tokenized each time


def test_another_tokenizer_definition_is_another_entry(tokenizer, tmp_path, monkeypatch):
    """The key is the tokenizer's whole definition: one more token in its vocabulary is a new entry."""
    from transformers import AutoTokenizer

    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path))
    text = default_text("evaluation")[:20000]
    token_ids(tokenizer, text, remember=True)
    tokenizer.save_pretrained(tmp_path / "tok")
    other = AutoTokenizer.from_pretrained(tmp_path / "tok")
    other.add_tokens(["def main"])
    assert token_ids(other, text, remember=True) == other(text, add_special_tokens=False).input_ids
    assert len(list((tmp_path / "cache" / "tokens").iterdir())) == 2


def test_a_damaged_entry_is_tokenized_again_and_rewritten(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path))
    first = evaluation_blocks(tokenizer, 2, 64)
    (entry,) = (tmp_path / "cache" / "tokens").iterdir()
    entry.write_text("[1, 2")  # cut short
    assert evaluation_blocks(tokenizer, 2, 64).equal(first)
    assert json.loads(entry.read_text()) == tokenizer(default_text("evaluation"), add_special_tokens=False).input_ids


def test_calibration_of_the_default_text_is_remembered_and_of_a_file_is_not(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path))
    data = tmp_path / "cal.txt"
    data.write_text(default_text("evaluation")[:50000])
    counting = _Counting(tokenizer)
    for _ in range(2):
        calibration_samples(counting, Calibration(data=str(data), samples=2, seq_len=32))
    assert counting.calls == 2 and not (tmp_path / "cache").exists()
    samples = [calibration_samples(counting, Calibration(samples=2, seq_len=32)) for _ in range(2)]
    assert counting.calls == 3 and samples[0].equal(samples[1])
