"""Shared fixtures: a tiny corpus that every test can train on, and the real Tiny Shakespeare file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# The tests use tiny tensors: one thread is fastest, and stays fast when other jobs share the CPU.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
# Offline copy (see the guide), then the file that `python main.py` downloads.
SHAKESPEARE_CANDIDATES = [
    REPO.parent / "shared" / "data" / "tinyshakespeare.txt",
    REPO / "data" / "tinyshakespeare.txt",
]

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
    """The real corpus; the tests never download it."""
    for path in SHAKESPEARE_CANDIDATES:
        if path.is_file():
            return path
    pytest.fail(f"Tiny Shakespeare not found; put it at one of {[str(p) for p in SHAKESPEARE_CANDIDATES]}")
