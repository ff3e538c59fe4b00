"""Checks of what a user types: argparse `type=` functions, each turning a string into a value or refusing it
with a one-line reason, then checks of what the flags point at (a prompt, a corpus, a checkpoint's vocabulary),
each raising ValueError with a one-line reason that names the flag, and of the sampling settings that a program
passes to generation."""

from __future__ import annotations

import argparse
import math
from pathlib import Path


def positive_int(s: str) -> int:
    value = int(s)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return value


def context_length(s: str) -> int:
    value = int(s)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be at least 2 (a context and one next character), got {s}")
    return value


def seed_type(s: str) -> int:
    value = int(s)
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**32), got {s}")
    return value


def non_negative_int(s: str) -> int:
    value = int(s)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {s}")
    return value


def positive_float(s: str) -> float:
    value = float(s)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {s}")
    return value


def temperature_type(s: str) -> float:
    value = float(s)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0 (0 = greedy), got {s}")
    return value


def top_p_type(s: str) -> float:
    value = float(s)
    if not 0 < value <= 1:  # also False for NaN
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {s}")
    return value


def dropout_type(s: str) -> float:
    value = float(s)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {s}")
    return value


def resume_type(s: str) -> str:
    """The optional value of `--resume`: only 'auto' (a bare `--resume` gives True)."""
    if s != "auto":
        raise argparse.ArgumentTypeError(f"takes no value or 'auto', got {s!r}")
    return s


def check_prompt(tokenizer, prompt: str) -> None:
    """--prompt must be encodable: a character tokenizer knows only its training text's characters."""
    try:
        tokenizer.encode(prompt)
    except ValueError as e:
        raise ValueError(f"--prompt {prompt!r}: {e}") from e


def check_vocabulary(chars: list[str], checkpoint: dict, path: Path, advice: str) -> None:
    """--data must give the vocabulary that the checkpoint at `path` was trained on."""
    if chars != checkpoint["tokenizer"]["chars"]:
        raise ValueError(f"--data gives a different vocabulary than {path} was trained on; {advice}")


def check_long_enough(text: str, val_tokens: int, seq_len: int) -> None:
    """The validation split (the last 10% of --data) must hold one window of --seq-len tokens."""
    if val_tokens <= seq_len:
        raise ValueError(f"--data has {len(text):,} characters: too short for --seq-len {seq_len} "
                         f"(its last 10% must hold one window); give a longer file or a smaller --seq-len")


def check_sampling(temperature: float, top_p: float, max_new_tokens: int) -> None:
    """Generation's settings, when a program passes them (the flags are checked by the types above)."""
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    if not (0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
