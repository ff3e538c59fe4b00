"""Shared fixtures: small corpora that tests write themselves, and the real Tiny Shakespeare file."""

from __future__ import annotations

import importlib
import os
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import main

inputs = importlib.import_module("01_input_block")

# The tests use tiny tensors: one thread is fastest, and stays fast when other jobs share the CPU.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]

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


def generated_text(n_lines: int = 160, seed: int = 0) -> str:
    """Made-up verse with speakers, capitals and punctuation: about 5,500 characters, 58 distinct."""
    rng = random.Random(seed)
    words = ("the a thou art my lord sweet night light love death king queen fair what how shall not be "
             "pray joy zeal quick vex youth grave").split()
    lines = []
    for i in range(n_lines):
        if i % 6 == 0:
            lines.append(rng.choice(["ROMEO:", "JULIET:", "KING HENRY:"]))
        lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(4, 9))).capitalize() + rng.choice(".,!?;"))
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """Generated verse as a file, for the tests that run main.py on a corpus with more characters than VERSE."""
    path = tmp_path_factory.mktemp("corpus") / "verse.txt"
    path.write_text(generated_text(), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def shakespeare_path() -> Path:
    """The real corpus, for the tests about the corpus itself (they have `shakespeare` in their names).
    Found as a learner finds it: data/tinyshakespeare.txt, else downloaded and checksum-verified."""
    inputs.load_text()  # downloads only when the file is missing
    return inputs.DEFAULT_DATA_PATH


# ----------------------------------------------------------------------------- helpers the test files import


def start_cli(*args) -> subprocess.Popen:
    """`python main.py ARGS` in the repository root, with stdout and stderr in pipes (not a terminal), as under a
    scheduler. One thread, as in the tests themselves: the same thread count, the same floating-point sums."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONIOENCODING": "utf-8"}
    return subprocess.Popen([sys.executable, "main.py", *map(str, args)], cwd=REPO, env=env, text=True,
                            encoding="utf-8", stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def interrupt(proc: subprocess.Popen, signum: int, training: Callable[[], object]) -> tuple[str, str]:
    """Once training() returns (the run is in its training loop), send signum; return the run's stdout and
    stderr. The run is killed whatever happens, so a failing test leaves no process behind."""
    try:
        training()
        proc.send_signal(signum)
        return proc.communicate(timeout=60)
    finally:
        proc.kill()


def cli_error(argv: list, entry: Callable[[list[str]], None] = main.main) -> str:
    """Run a command line in-process (main.py's, or the `main` of a chapter given as `entry`); it must exit with
    a one-line 'error: ...' message (exit status 1), never a traceback."""
    with pytest.raises(SystemExit) as exc:
        entry([str(a) for a in argv])
    message = exc.value.code
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message, message
    return message


def assert_same_training_state(a: dict, b: dict) -> None:
    """Two checkpoints, bit for bit: every weight, every optimizer tensor, the step, the loss log and every step's
    loss."""
    assert a["step"] == b["step"]
    assert a["model"].keys() == b["model"].keys()
    for name, value in b["model"].items():
        assert torch.equal(a["model"][name], value), name
    for optimizer_a, optimizer_b in zip(a["optimizer"], b["optimizer"], strict=True):  # AdamW, then Muon if used
        for i, state in optimizer_b["state"].items():
            for key, value in state.items():
                assert torch.equal(optimizer_a["state"][i][key], value), (i, key)
    assert a["loss_log"] == b["loss_log"] and a["train_losses"] == b["train_losses"]
