"""Issue 11 on one process: SIGTERM, logs written to files, the out-dir lock, failing fast.

The runs under torchrun (ranks stopping together, exact resume under DDP, restarts after a killed
rank) are in test_distributed.py. Every run here trains a tiny model on text made below.
"""

from __future__ import annotations

import importlib
import os
import re
import signal
import socket
import subprocess
import sys

import pytest
from conftest import assert_same_training_state, cli_error, interrupt, start_cli

from plumbing.runtime import Progress

main = importlib.import_module("main")

TINY = ["--dim", "32", "--n-layers", "1", "--n-heads", "2", "--n-kv-heads", "1", "--seq-len", "16",
        "--batch-size", "4", "--eval-iters", "2", "--max-new-tokens", "0"]


def read_until(proc: subprocess.Popen, pattern: str) -> str:
    """Read proc's stdout line by line until a line matches `pattern`; return what was read."""
    seen = ""
    for line in proc.stdout:
        seen += line
        if re.search(pattern, line):
            return seen
    raise AssertionError(f"the process ended before {pattern!r}: {seen}{proc.stderr.read()}")


# ----------------------------------------------------------------------------- SIGTERM


def test_sigterm_saves_exits_143_and_the_resumed_run_ends_bit_for_bit_where_a_straight_run_ends(corpus, tmp_path,
                                                                                               capsys):
    common = ["--data", corpus, *TINY, "--warmup-iters", "5", "--lr-decay-iters", "30", "--eval-interval", "10",
              "--log-interval", "1"]
    stopped = tmp_path / "stopped"
    proc = start_cli(*common, "--out-dir", stopped, "--max-iters", "100000")
    stdout, stderr = interrupt(proc, signal.SIGTERM, lambda: read_until(proc, r"^step 3/"))  # between 2 evaluations
    assert proc.returncode == 143, stderr
    assert "Traceback" not in stderr
    step = main.load_checkpoint(stopped / "ckpt.pt")["step"]
    assert step >= 3 and f"interrupted at step {step} (SIGTERM): checkpoint saved to {stopped / 'ckpt.pt'}" in stdout
    resume = next(line for line in stdout.splitlines() if line.startswith("continue with: python main.py"))
    assert resume.split()[4:] == ["--resume", "--out-dir", str(stopped), "--data", str(corpus)]

    # The printed command, to 5 steps past the stop; then the same number of steps in one go.
    main.main([*map(str, resume.split()[4:]), "--max-iters", str(step + 5)])
    straight = tmp_path / "straight"
    main.main([*map(str, common), "--out-dir", str(straight), "--max-iters", str(step + 5)])
    capsys.readouterr()
    a = main.load_checkpoint(stopped / "ckpt.pt")
    assert a["step"] == step + 5
    assert_same_training_state(a, main.load_checkpoint(straight / "ckpt.pt"))


# ----------------------------------------------------------------------------- logs in files


def test_output_to_a_file_gets_plain_lines_and_no_progress_bar(corpus, tmp_path):
    """The default --log-interval (50) and a 500-character sample, as in the default run."""
    proc = start_cli("--data", corpus, "--out-dir", tmp_path, *TINY[:-2], "--max-iters", "200",
                     "--eval-interval", "100")
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert "\r" not in stdout + stderr  # no bar redraws
    lines = [line for line in stdout.splitlines() if re.match(r"step \d+/", line)]
    assert [int(line.split()[1].split("/")[0]) for line in lines] == [50, 100, 150, 200]
    rate = r"\d\.\de[-+]\d\d"  # each optimizer's learning rate, by name
    pattern = rf"step \d+/200 \| loss \d+\.\d{{4}} \| lr adamw {rate} muon {rate} \| [\d,]+ tok/s \| \d\d:\d\d left"
    assert all(re.fullmatch(pattern, line) for line in lines), lines
    assert all(len(line) < 90 for line in lines)  # the default 1,000 steps: 20 such lines
    assert "--- sample" in stdout and len((stdout + stderr).encode()) < 2_000


def test_progress_keeps_the_bar_on_a_terminal(monkeypatch, capsys):
    for stream in (sys.stdout, sys.stderr):
        monkeypatch.setattr(stream, "isatty", lambda: True)
    progress = Progress(total=20, initial=0, tokens_per_step=64, every=5)
    for step in range(1, 21):
        progress.update(step, loss=2.0, lrs={"adamw": 1e-3, "muon": 2e-2}, seconds=0.01)
    progress.close()
    out, err = capsys.readouterr()
    assert "step 5/20" not in out and "training" in err and "20/20" in err  # the tqdm bar, on stderr


# ----------------------------------------------------------------------------- one run per out-dir


def test_a_live_run_locks_its_out_dir_and_a_dead_ones_lock_is_taken_over(corpus, tmp_path, capsys):
    out_dir = tmp_path / "out"
    common = ["--data", corpus, *TINY, "--eval-interval", "1000", "--log-interval", "1"]
    live = start_cli(*common, "--out-dir", out_dir, "--max-iters", "100000")
    try:
        read_until(live, r"^step 1/")  # ckpt.pt of step 0 exists
        for mode in ([], ["--resume"], ["--resume", "auto"]):
            message = cli_error([*common, *mode, "--out-dir", out_dir, "--max-iters", "5"])
            assert f"pid {live.pid} on host {socket.gethostname()}" in message and "in use" in message, message
        main.main(["--sample", "--out-dir", str(out_dir), "--max-new-tokens", "5"])  # reading is not blocked
        assert capsys.readouterr().out.startswith("ROMEO:")
        live.kill()  # SIGKILL: no clean-up runs, the lock file stays behind
        live.communicate(timeout=60)
    finally:
        live.kill()
    assert (out_dir / "train.lock").read_text().startswith(f"pid {live.pid} ")
    main.main([*map(str, common), "--resume", "--out-dir", str(out_dir), "--max-iters", "3"])
    assert (out_dir / "train.lock").read_text().startswith(f"pid {os.getpid()} ")
    assert main.load_checkpoint(out_dir / "ckpt.pt")["step"] == 3


def test_resume_auto_starts_fresh_then_resumes(corpus, tmp_path, capsys):
    common = ["--data", str(corpus), *TINY, "--out-dir", str(tmp_path), "--resume", "auto", "--eval-interval", "2"]
    main.main([*common, "--max-iters", "2"])
    assert "resumed" not in capsys.readouterr().out
    main.main([*common, "--max-iters", "4"])
    assert f"resumed from {tmp_path / 'ckpt.pt'} at step 2" in capsys.readouterr().out
    assert main.load_checkpoint(tmp_path / "ckpt.pt")["step"] == 4
    with pytest.raises(SystemExit):
        main.build_parser().parse_args(["--resume", "always"])


# ----------------------------------------------------------------------------- fail fast


def test_bad_out_dir_and_data_fail_before_any_model_is_built(corpus, tmp_path, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr(main, "Transformer", no_model)
    a_file = tmp_path / "file.txt"
    a_file.write_text("not a directory")
    for out_dir in (a_file, a_file / "out"):
        message = cli_error(["--data", corpus, "--out-dir", out_dir, *TINY])
        assert message.startswith(f"error: --out-dir {out_dir}: cannot write there ("), message
    os.mkfifo(tmp_path / "fifo")
    for data in ("/dev/null", tmp_path, tmp_path / "fifo"):  # a FIFO would block a reader forever
        message = cli_error(["--data", data, "--out-dir", tmp_path / "out", *TINY])
        assert message == f"error: --data {data}: not a regular file; give a text file"


def test_plot_attention_without_sample_is_refused(tmp_path):
    message = cli_error(["--plot-attention", "--out-dir", tmp_path / "out"])
    assert "--plot-attention" in message and "--sample" in message
    assert not (tmp_path / "out").exists()
