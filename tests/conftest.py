"""Shared fixtures: a tiny corpus that every test can train on, and the real Tiny Shakespeare file."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

inputs = importlib.import_module("01_input_block")

# The tests use tiny tensors: one thread is fastest, and stays fast when other jobs share the CPU.
torch.set_num_threads(1)

VERSE = """ROMEO:
But soft, what light through yonder window breaks?
It is the east, and Juliet is the sun.

JULIET:
O Romeo, Romeo! wherefore art thou Romeo?
Deny thy father and refuse thy name.

"""


@pytest.fixture(scope="session")
def tiny_text() -> str:
    """About 3,000 characters: short enough to train on in a second, long enough for a 90/10 split."""
    return VERSE * 16


@pytest.fixture
def tiny_corpus(tmp_path: Path, tiny_text: str) -> Path:
    """The tiny text as a UTF-8 file, for the code paths that read `--data PATH`."""
    path = tmp_path / "tiny.txt"
    path.write_text(tiny_text, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def shakespeare_path() -> Path:
    """The real corpus, for the tests about the corpus itself (they have `shakespeare` in their names).
    Found as a learner finds it: data/tinyshakespeare.txt, else downloaded and checksum-verified."""
    inputs.load_text()  # downloads only when the file is missing
    return inputs.DEFAULT_DATA_PATH
