"""Issue 4: nothing a learner types breaks it; nothing an interruption loses.

Bad input ends in one line "error: ..." and a non-zero exit, never a traceback. `cli_error` runs
`main.main(argv)` exactly as the command line does (an exception that escaped it would fail the
test); a few cases also run `python main.py` in a subprocess to check the real process. The faults
(SIGKILL, SIGINT, resume) run the real CLI in subprocesses.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import REPO, assert_same_training_state, cli_error, interrupt, start_cli

from plumbing.download import download

main = importlib.import_module("main")
runtime = importlib.import_module("plumbing.runtime")
inputs = importlib.import_module("01_input_block")

TINY_MODEL = ["--dim", "32", "--n-layers", "1", "--n-heads", "2", "--n-kv-heads", "1", "--seq-len", "16"]
TINY = [*TINY_MODEL, "--batch-size", "4", "--eval-iters", "2", "--max-new-tokens", "20"]


# ----------------------------------------------------------------------------- helpers


def wait_for(condition, proc: subprocess.Popen, timeout: float = 90.0, poll: float = 0.01) -> None:
    """Poll until condition() holds, while proc keeps running."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(poll)


def assert_loadable(ckpt: Path) -> dict:
    """The checkpoint loads with weights_only=True and its weights fit its own model (strict)."""
    checkpoint = main.load_checkpoint(ckpt)
    model_args = main.ModelArgs(**checkpoint["model_args"])
    main.Transformer(model_args).load_state_dict(checkpoint["model"])
    return checkpoint


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus: Path) -> Path:
    """An out-dir with a checkpoint of a tiny model trained for 5 steps on `corpus`."""
    out_dir = tmp_path_factory.mktemp("trained")
    main.main([*map(str, TINY), "--data", str(corpus), "--out-dir", str(out_dir), "--max-iters", "5"])
    return out_dir


@pytest.fixture
def tiny_model(corpus: Path) -> tuple[main.Transformer, inputs.CharTokenizer]:
    """An untrained tiny model (max_seq_len 16) and the corpus tokenizer."""
    tokenizer = inputs.CharTokenizer.from_text(corpus.read_text(encoding="utf-8"))
    torch.manual_seed(0)
    args = main.ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=tokenizer.vocab_size,
                          max_seq_len=16)
    return main.Transformer(args).eval(), tokenizer


# ----------------------------------------------------------------------------- bad input


def test_real_cli_prints_one_line_and_no_traceback(trained: Path, corpus: Path, tmp_path: Path):
    """The process itself: a bad prompt and a non-UTF-8 --data end in one stderr line, exit 1."""
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"ROMEO\xff\xfe\x00")
    prompt = start_cli("--sample", "--out-dir", trained, "--prompt", "héllo €", "--max-new-tokens", "5")
    data = start_cli("--data", binary, "--out-dir", tmp_path / "out", *TINY)
    for proc, expected in [(prompt, ["not in the vocabulary", "'é'", "'€'"]), (data, ["not UTF-8"])]:
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 1, stderr
        assert "Traceback" not in stderr
        assert stderr.strip().startswith("error: ") and stderr.strip().count("\n") == 0, stderr
        assert all(e in stderr for e in expected), stderr
    assert not (tmp_path / "out" / "ckpt.pt").exists()


def test_bad_prompt_names_the_characters(trained: Path, corpus: Path, tiny_model, tmp_path: Path):
    model, tokenizer = tiny_model
    with pytest.raises(ValueError, match="'é'.*'ü'"):
        main.generate(model, tokenizer, "Bonjour é ü", max_new_tokens=5)
    assert "'ñ'" in cli_error(["--sample", "--out-dir", trained, "--prompt", "España"])
    # Training checks the prompt before it starts, not after minutes of work.
    out_dir = tmp_path / "out"
    message = cli_error(["--data", corpus, "--out-dir", out_dir, *TINY, "--prompt", "España"])
    assert message.startswith("error: --prompt 'España': characters not in the vocabulary: 'ñ'"), message
    assert not (out_dir / "ckpt.pt").exists()


@pytest.mark.parametrize("flag, value", [
    ("--temperature", "-0.5"), ("--temperature", "inf"), ("--temperature", "nan"),
    ("--top-p", "0"), ("--top-p", "1.01"), ("--top-p", "-1"), ("--top-p", "nan"),
    ("--max-new-tokens", "-1"),
    ("--max-iters", "0"), ("--max-iters", "-5"), ("--batch-size", "0"), ("--seq-len", "0"), ("--seq-len", "-16"),
])
def test_bad_flag_values_are_refused_by_argparse(flag: str, value: str, capsys):
    with pytest.raises(SystemExit) as exc:
        main.build_parser().parse_args([flag, value])
    assert exc.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err


def test_edge_flag_values_are_accepted():
    args = main.build_parser().parse_args(["--temperature", "0", "--top-p", "1", "--max-new-tokens", "0",
                                           "--max-iters", "1", "--batch-size", "1", "--seq-len", "2"])
    assert (args.temperature, args.top_p, args.max_new_tokens, args.max_iters) == (0.0, 1.0, 0, 1)


def test_generate_checks_its_arguments(tiny_model):
    model, tokenizer = tiny_model
    for kwargs in [{"temperature": -1.0}, {"temperature": float("nan")}, {"temperature": float("inf")},
                   {"top_p": 0.0}, {"top_p": float("nan")}, {"top_p": 2.0}, {"max_new_tokens": -1}]:
        with pytest.raises(ValueError):
            main.generate(model, tokenizer, "ROMEO:", **{"max_new_tokens": 3, **kwargs})


def test_bad_data_file(tmp_path: Path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("Roméo, Roméo".encode("latin-1"))
    (tmp_path / "short.txt").write_text("ROMEO: To be, or not to be.\n" * 2)
    (tmp_path / "folder").mkdir()
    cases = {"missing.txt": "no such file", "folder": "not a regular file", "empty.txt": "the file is empty",
             "latin1.txt": "not UTF-8", "short.txt": "too short for --seq-len 16"}
    for name, expected in cases.items():
        message = cli_error(["--data", tmp_path / name, "--out-dir", tmp_path / "out", *TINY])
        assert expected in message and (name in message or name == "short.txt"), message
    assert not (tmp_path / "out" / "ckpt.pt").exists()


def test_bad_checkpoints(trained: Path, tmp_path: Path):
    good = (trained / "ckpt.pt").read_bytes()
    cases = {"none": None, "truncated": good[: len(good) // 2], "random": os.urandom(4096),
             "text": b"not a checkpoint\n"}
    for name, content in cases.items():
        out_dir = tmp_path / name
        out_dir.mkdir()
        if content is not None:
            (out_dir / "ckpt.pt").write_bytes(content)
        message = cli_error(["--sample", "--out-dir", out_dir])
        expected = "no checkpoint at" if content is None else "not a readable checkpoint"
        assert expected in message and "train" in message, message
        if content is not None:  # --resume reads it the same way
            assert expected in cli_error(["--resume", "--out-dir", out_dir, *TINY])


def test_checkpoint_for_another_vocabulary_or_model(trained: Path, tmp_path: Path):
    other = tmp_path / "other.txt"
    other.write_text("abc def\n" * 500)
    for mode in ["--sample", "--resume"]:
        assert "different vocabulary" in cli_error([mode, "--out-dir", trained, "--data", other])
    message = cli_error(["--resume", "--out-dir", trained, "--dim", "64", "--n-heads", "4", "--n-layers", "1"])
    assert "--dim" in message and "--n-heads" in message and "--n-layers" not in message, message


class Evil:
    """Unpickling this calls os.mkdir(marker): code that runs when the file is loaded."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_malicious_checkpoint_is_refused_and_runs_nothing(trained: Path, tmp_path: Path):
    marker = tmp_path / "pwned"
    checkpoint = torch.load(trained / "ckpt.pt", weights_only=True)
    checkpoint["step"] = Evil(marker)
    torch.save(checkpoint, tmp_path / "ckpt.pt")
    assert "not a readable checkpoint" in cli_error(["--sample", "--out-dir", tmp_path])
    assert "not a readable checkpoint" in cli_error(["--resume", "--out-dir", tmp_path, *TINY])
    assert not marker.exists()
    torch.load(tmp_path / "ckpt.pt", weights_only=False)  # the unsafe load the code never does
    assert marker.is_dir()


@pytest.mark.parametrize("device", ["cuda", "mps"])
def test_unavailable_device(device: str, trained: Path, corpus: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    for argv in (["--sample", "--out-dir", trained], ["--data", corpus, "--out-dir", tmp_path, *TINY]):
        message = cli_error([*argv, "--device", device])
        assert f"--device {device} is not available" in message and "--device cpu" in message


# ----------------------------------------------------------------------------- the download

BODY = b"To be, or not to be, that is the question:\n" * 100


class CorpusServer(BaseHTTPRequestHandler):
    """/ok serves BODY; /404 and /500 fail; /drop promises twice the bytes it sends, then hangs up."""

    def do_GET(self):
        if self.path in ("/404", "/500"):
            self.send_error(int(self.path[1:]))
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY) * (2 if self.path == "/drop" else 1)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), CorpusServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("route, error, expected", [
    ("/404", ConnectionError, "404"),
    ("/500", ConnectionError, "500"),
    ("/drop", ConnectionError, "connection dropped"),
    ("/ok", ValueError, "checksum mismatch"),
])
def test_failed_download_leaves_nothing(route, error, expected, server_url, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    path = tmp_path / "data" / "corpus.txt"
    with pytest.raises(error, match=expected) as exc:
        download(server_url + route, path, "0" * 64)
    assert isinstance(exc.value, (OSError, ValueError))  # what the CLI turns into "error: ..."
    assert f"save it as {path}" in str(exc.value) and "--data PATH" in str(exc.value)
    assert list(path.parent.iterdir()) == []  # no partial corpus, no .part file


def test_download_succeeds_with_the_right_checksum(server_url, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    path = tmp_path / "corpus.txt"
    download(server_url + "/ok", path, hashlib.sha256(BODY).hexdigest())
    assert path.read_bytes() == BODY and list(tmp_path.iterdir()) == [path]


# ----------------------------------------------------------------------------- edge input


def test_temperature_zero_is_the_same_every_run(tiny_model, trained: Path, capsys):
    model, tokenizer = tiny_model
    texts = {main.generate(model, tokenizer, "ROMEO:", 40, temperature=0, generator=torch.Generator().manual_seed(s))
             for s in range(3)}
    assert len(texts) == 1
    outputs = set()
    for seed in ["1", "2"]:
        main.main(["--sample", "--out-dir", str(trained), "--temperature", "0", "--seed", seed,
                   "--max-new-tokens", "40"])
        outputs.add(capsys.readouterr().out)
    assert len(outputs) == 1
    for seed in ["1", "2"]:  # and sampling at temperature 1 does depend on the seed
        main.main(["--sample", "--out-dir", str(trained), "--temperature", "1", "--top-p", "1", "--seed", seed,
                   "--max-new-tokens", "40"])
        outputs.add(capsys.readouterr().out)
    assert len(outputs) == 3


# ----------------------------------------------------------------------------- faults


def test_interrupted_save_keeps_the_previous_checkpoint(trained: Path, tmp_path: Path, monkeypatch):
    """A crash in the middle of torch.save leaves the old checkpoint as it was."""
    ckpt = tmp_path / "ckpt.pt"
    good = (trained / "ckpt.pt").read_bytes()
    ckpt.write_bytes(good)

    def crash_midway(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(OSError):
        runtime.save_checkpoint(ckpt, {"model": {}})
    assert ckpt.read_bytes() == good
    assert_loadable(ckpt)
    assert list(tmp_path.iterdir()) == [ckpt]  # no ckpt.pt.tmp left behind


def test_sigkill_in_the_middle_of_a_save_leaves_the_previous_checkpoint_or_none(trained: Path, tmp_path: Path):
    """A process is killed with SIGKILL while save_checkpoint is inside the write (half the bytes are on disk,
    which the test checks): ckpt.pt is still the previous checkpoint, or absent if there was none."""
    stalled_save = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "import torch\n"
        "from plumbing import runtime\n"
        "def half_then_stall(obj, f):\n"
        "    f.write(b'half a checkpoint'); f.flush()\n"
        "    print('writing', flush=True)\n"
        "    time.sleep(600)\n"
        "torch.save = half_then_stall\n"
        "runtime.save_checkpoint(Path(sys.argv[1]), {'step': 1})\n"
    )
    good = (trained / "ckpt.pt").read_bytes()
    (tmp_path / "previous").mkdir()
    (tmp_path / "previous" / "ckpt.pt").write_bytes(good)
    (tmp_path / "first").mkdir()
    for name in ("previous", "first"):
        ckpt = tmp_path / name / "ckpt.pt"
        proc = subprocess.Popen([sys.executable, "-c", stalled_save, str(ckpt)], cwd=REPO, text=True,
                                stdout=subprocess.PIPE)
        try:
            assert proc.stdout.readline() == "writing\n"
            assert (tmp_path / name / "ckpt.pt.tmp").read_bytes() == b"half a checkpoint"  # inside the write
            proc.kill()
            proc.wait(timeout=60)
        finally:
            proc.kill()
        assert proc.returncode == -signal.SIGKILL
    assert (tmp_path / "previous" / "ckpt.pt").read_bytes() == good
    assert_loadable(tmp_path / "previous" / "ckpt.pt")
    assert not (tmp_path / "first" / "ckpt.pt").exists()


def checkpoint_step(out_dir: Path) -> int:
    """The step of the checkpoint in out_dir (it must load at every moment we look)."""
    return main.load_checkpoint(out_dir / "ckpt.pt")["step"]


def test_ctrl_c_saves_and_says_how_to_resume(corpus: Path, tmp_path: Path):
    out_dir = tmp_path / "out"
    proc = start_cli("--data", corpus, "--out-dir", out_dir, *TINY, "--max-iters", "100000", "--eval-interval", "1000")

    def training() -> None:
        wait_for(lambda: (out_dir / "ckpt.pt").exists(), proc)  # step 0 is saved; the training loop runs
        time.sleep(0.3)

    stdout, stderr = interrupt(proc, signal.SIGINT, training)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    step = assert_loadable(out_dir / "ckpt.pt")["step"]
    assert step >= 1 and f"interrupted at step {step} (SIGINT): checkpoint saved" in stdout
    resume = next(line for line in stdout.splitlines() if line.startswith("continue with: python main.py"))
    # The command it prints works (with a nearer goal than the 100,000 steps it was started with).
    main.main([*shlex.split(resume)[4:], "--max-iters", str(step + 2), "--max-new-tokens", "0"])
    assert checkpoint_step(out_dir) == step + 2


def test_resume_is_exact(corpus: Path, tmp_path: Path, capsys):
    """20 steps, then --resume to 40, equals 40 steps straight, bit for bit (one process, one thread: the
    tests' setting, so both halves and the reference add their floating-point numbers in the same order)."""
    assert torch.get_num_threads() == 1
    common = ["--data", corpus, *TINY, "--warmup-iters", "5", "--lr-decay-iters", "40", "--eval-interval", "10"]
    split, straight = tmp_path / "split", tmp_path / "straight"
    main.main([str(a) for a in [*common, "--out-dir", split, "--max-iters", "20"]])
    main.main([str(a) for a in [*common, "--out-dir", straight, "--max-iters", "40"]])
    main.main([str(a) for a in ["--resume", "--data", corpus, "--out-dir", split, "--max-iters", "40"]])
    assert f"resumed from {split / 'ckpt.pt'} at step 20" in capsys.readouterr().out
    a, b = assert_loadable(split / "ckpt.pt"), assert_loadable(straight / "ckpt.pt")
    assert a["step"] == b["step"] == 40
    assert_same_training_state(a, b)
    log_a, log_b = pd.read_csv(split / "loss.csv"), pd.read_csv(straight / "loss.csv")
    assert log_a["step"].tolist() == log_b["step"].tolist() == [0, 10, 20, 30, 40]
    pd.testing.assert_frame_equal(log_a, log_b, check_exact=True)


@pytest.mark.parametrize("eval_interval", ["1", "1000"])
def test_diverging_loss_stops_and_keeps_the_last_good_checkpoint(eval_interval: str, corpus: Path,
                                                                  tmp_path: Path):
    message = cli_error(["--data", corpus, "--out-dir", tmp_path, *TINY, "--max-iters", "50",
                         "--learning-rate", "1e30", "--warmup-iters", "0", "--eval-interval", eval_interval])
    assert "training diverged" in message and str(tmp_path / "ckpt.pt") in message and "--learning-rate" in message
    checkpoint = assert_loadable(tmp_path / "ckpt.pt")
    assert all(torch.isfinite(w).all() for w in checkpoint["model"].values())
    assert all(pd.notna(row["val_loss"]) and row["val_loss"] < 10 for row in checkpoint["loss_log"])


def test_same_seed_same_run(corpus: Path, tmp_path: Path, capsys):
    runs = {}
    for name, seed in [("a", "7"), ("b", "7"), ("c", "8")]:
        main.main([str(a) for a in ["--data", corpus, "--out-dir", tmp_path / name, *TINY, "--max-iters", "10",
                                    "--eval-interval", "5", "--seed", seed]])
        sample = capsys.readouterr().out.split("--- sample")[1]
        runs[name] = (pd.read_csv(tmp_path / name / "loss.csv"), sample)
    pd.testing.assert_frame_equal(runs["a"][0], runs["b"][0], check_exact=True)
    assert runs["a"][1] == runs["b"][1]
    assert not runs["a"][0]["train_loss"].equals(runs["c"][0]["train_loss"])  # the seed does matter


def test_checkpoint_whose_weights_do_not_fit_its_settings_is_refused(tmp_path):
    """Right keys, wrong contents: a clear ValueError, not a TypeError or RuntimeError traceback."""
    args = main.ModelArgs(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=10, max_seq_len=8)
    good = {"model": main.Transformer(args).state_dict(), "model_args": asdict(args),
            "tokenizer": {"chars": list("abcdefg")}, "step": 0}
    for name, broken in {"foreign_args": {**good, "model_args": {**good["model_args"], "colour": "red"}},
                         "other_shape": {**good, "model_args": {**good["model_args"], "dim": 32}}}.items():
        path = tmp_path / f"{name}.pt"
        torch.save(broken, path)
        with pytest.raises(ValueError, match="not a checkpoint of main.py"):
            main.load_checkpoint(path)
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(ValueError, match="not a checkpoint of main.py"):
        main.load_checkpoint(tmp_path / "tensor.pt")


def test_a_checkpoint_that_cannot_be_resumed_is_one_error_line(trained: Path, tmp_path: Path):
    """Written by another version of main.py: without what --resume needs, or with settings it does not know."""
    checkpoint = torch.load(trained / "ckpt.pt", weights_only=True)
    for name, broken in {"no_train_config": {k: v for k, v in checkpoint.items() if k != "train_config"},
                         "unknown_setting": {**checkpoint, "train_config": {**checkpoint["train_config"], "lion": 1}}
                         }.items():
        (tmp_path / name).mkdir()
        torch.save(broken, tmp_path / name / "ckpt.pt")
        message = cli_error(["--resume", "--out-dir", tmp_path / name, *TINY])
        assert "train_config" in message or "lion" in message, message
        assert main.load_checkpoint(tmp_path / name / "ckpt.pt")["step"] == checkpoint["step"]  # --sample reads it


def test_context_shorter_than_two_is_refused_and_longer_input_is_a_value_error():
    with pytest.raises(SystemExit):
        main.build_parser().parse_args(["--seq-len", "1"])
    model = main.Transformer(main.ModelArgs(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=10, max_seq_len=8))
    with pytest.raises(ValueError, match="exceed max_seq_len 8"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_resume_with_a_longer_run_keeps_the_learning_rate_schedule():
    """The cosine horizon is fixed by the first run, so --resume --max-iters 2N does not restart warm rates."""
    first = main.build_parser().parse_args(["--max-iters", "100"])
    model_args, cfg = main.resolve_configs(first, None)
    assert cfg.lr_decay_iters == 100
    checkpoint = {"model_args": asdict(model_args), "train_config": asdict(cfg)}
    longer = main.build_parser().parse_args(["--resume", "--max-iters", "200"])
    _, cfg2 = main.resolve_configs(longer, checkpoint)
    assert cfg2.max_iters == 200 and cfg2.lr_decay_iters == 100
    assert main.get_lr(150, cfg2) == cfg2.min_lr


def test_learning_rate_below_its_floor_and_odd_head_dim_are_clear_errors():
    with pytest.raises(ValueError, match="--min-lr"):
        main.resolve_configs(main.build_parser().parse_args(["--learning-rate", "1e-6"]), None)
    with pytest.raises(ValueError, match="even"):
        main.Transformer(main.ModelArgs(dim=6, n_heads=2, n_kv_heads=1, vocab_size=10))
    for seed in ["-1", str(2**64)]:
        with pytest.raises(SystemExit):
            main.build_parser().parse_args(["--seed", seed])
