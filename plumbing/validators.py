"""argparse `type=` functions: each turns a string into a value or refuses it with a one-line reason."""

from __future__ import annotations

import argparse
import math


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
