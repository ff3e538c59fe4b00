"""Chapter 1: the corpus, the character tokenizer, the train/val split and batches."""

from __future__ import annotations

import importlib
import json

import numpy as np
import pytest
import torch

inputs = importlib.import_module("01_input_block")


# ----------------------------------------------------------------------------- tokenizer


def test_encode_decode_round_trip(tiny_text):
    tok = inputs.CharTokenizer.from_text(tiny_text)
    text = "O Romeo, Romeo!\nwherefore art thou"
    ids = tok.encode(text)
    assert len(ids) == len(text)  # one token per character
    assert all(isinstance(i, int) for i in ids)
    assert tok.decode(ids) == text


def test_bos_and_eos_wrap_the_ids(tiny_text):
    tok = inputs.CharTokenizer.from_text(tiny_text)
    plain = tok.encode("sun")
    wrapped = tok.encode("sun", bos=True, eos=True)
    assert wrapped == [tok.bos_id, *plain, tok.eos_id]
    assert tok.encode("sun", bos=True) == [tok.bos_id, *plain]
    assert tok.decode(wrapped) == "<|begin_of_text|>sun<|end_of_text|>"


def test_vocabulary_is_sorted_characters_then_special_tokens():
    tok = inputs.CharTokenizer.from_text("cabbage")
    assert tok.chars == ["a", "b", "c", "e", "g"]
    assert tok.encode("abc") == [0, 1, 2]
    assert (tok.bos_id, tok.eos_id) == (5, 6)
    assert tok.vocab_size == 7  # no padding token: every window is full


def test_tiny_shakespeare_has_65_characters_plus_2_special_tokens(shakespeare_path):
    text = inputs.load_text(shakespeare_path)
    assert len(text) == 1_115_394
    tok = inputs.CharTokenizer.from_text(text)
    assert len(tok.chars) == 65
    assert tok.vocab_size == 67
    assert (tok.bos_id, tok.eos_id) == (65, 66)
    assert [tok.decode([i]) for i in (65, 66)] == ["<|begin_of_text|>", "<|end_of_text|>"]


def test_unknown_characters_raise_value_error_naming_them():
    tok = inputs.CharTokenizer.from_text("hello world")
    with pytest.raises(ValueError) as excinfo:
        tok.encode("hello Zürich")
    message = str(excinfo.value)
    for char in "Zücr":
        assert char in message
    assert "'o'" not in message  # known characters are not blamed


def test_special_token_names_are_not_encoded_as_special_ids():
    """The text "<|end_of_text|>" is just characters: it never encodes to the EOS id."""
    tok = inputs.CharTokenizer.from_text("<|end_of_text|>")
    ids = tok.encode("<|end_of_text|>")
    assert tok.eos_id not in ids
    assert len(ids) == len("<|end_of_text|>")


def test_to_dict_from_dict_restores_the_same_tokenizer(tiny_text):
    tok = inputs.CharTokenizer.from_text(tiny_text)
    data = tok.to_dict()
    restored = inputs.CharTokenizer.from_dict(json.loads(json.dumps(data)))  # plain data survives JSON
    assert restored.vocab_size == tok.vocab_size
    assert (restored.bos_id, restored.eos_id) == (tok.bos_id, tok.eos_id)
    assert restored.encode("Juliet is the sun.", bos=True, eos=True) == tok.encode("Juliet is the sun.", bos=True,
                                                                                     eos=True)
    assert restored.decode(list(range(tok.vocab_size))) == tok.decode(list(range(tok.vocab_size)))


# ----------------------------------------------------------------------------- split and batches


def test_split_is_first_90_percent_train_last_10_percent_val():
    ids = np.arange(1000, dtype=np.int64)
    train, val = inputs.train_val_split(ids)
    assert len(train) == 900 and len(val) == 100
    assert np.array_equal(np.concatenate([train, val]), ids)  # val is the end, nothing lost or shuffled


def test_split_sizes_on_tiny_shakespeare(shakespeare_path):
    text = inputs.load_text(shakespeare_path)
    ids = np.array(inputs.CharTokenizer.from_text(text).encode(text), dtype=np.int64)
    train, val = inputs.train_val_split(ids)
    assert (len(train), len(val)) == (1_003_854, 111_540)  # nanoGPT's numbers


BOS_ID = 999  # outside the data's values, so it cannot be mistaken for a data token


def test_get_batch_shapes_dtypes_bos_and_shift():
    data = np.arange(50, dtype=np.int64) * 3  # every value tells where it came from
    x, y = inputs.get_batch(data, batch_size=4, seq_len=8, bos_id=BOS_ID, generator=torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 8)
    assert x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 0], torch.full((4,), BOS_ID))  # every window opens with BOS
    assert torch.equal(x[:, 1:], y[:, :-1])  # the input at t + 1 is the target at t
    assert torch.equal(y[:, 1:] - y[:, :-1], torch.full((4, 7), 3))  # each row is one contiguous window


def test_get_batch_is_reproducible_and_reaches_every_window():
    data = np.arange(20, dtype=np.int64)
    x1, _ = inputs.get_batch(data, 64, 4, BOS_ID, torch.Generator().manual_seed(7))
    x2, _ = inputs.get_batch(data, 64, 4, BOS_ID, torch.Generator().manual_seed(7))
    assert torch.equal(x1, x2)
    # 20 tokens, windows of 4 targets: starts 0 .. 16, the last one ends on the last token.
    gen = torch.Generator().manual_seed(0)
    starts = set()
    for _ in range(20):
        _, y = inputs.get_batch(data, 64, 4, BOS_ID, gen)
        starts |= set(y[:, 0].tolist())
    assert starts == set(range(17))


# ----------------------------------------------------------------------------- load_text


def test_load_text_reads_utf8(tmp_path):
    path = tmp_path / "poem.txt"
    path.write_text("Wherefore, café?\n", encoding="utf-8")
    assert inputs.load_text(path) == "Wherefore, café?\n"
    assert inputs.load_text(str(path)) == "Wherefore, café?\n"


def test_load_text_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such.txt"):
        inputs.load_text(tmp_path / "no-such.txt")


def test_load_text_directory(tmp_path):
    with pytest.raises(IsADirectoryError):
        inputs.load_text(tmp_path)


def test_load_text_empty_file(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("")
    with pytest.raises(ValueError, match="empty"):
        inputs.load_text(path)


def test_load_text_not_utf8(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9 and cr\xe8me".encode("latin-1"))
    with pytest.raises(ValueError, match="UTF-8"):
        inputs.load_text(path)
