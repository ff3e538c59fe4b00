"""Data parallel training on CPU with the gloo backend: the same main.py that runs on one device.

The torchrun tests share one uninterrupted 40-step run (`straight`) and compare the interrupted and
restarted runs with it, bit for bit. They train a tiny model on text made below.
"""

import importlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import assert_same_training_state
from torch.nn.parallel import DistributedDataParallel as DDP

from plumbing import checkpoint

main = importlib.import_module("main")
inputs = importlib.import_module("01_input_block")

ROOT = Path(__file__).resolve().parent.parent
TINY = main.ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=20, max_seq_len=16, max_batch_size=8)
CFG = main.TrainConfig(learning_rate=1e-2, weight_decay=0.1, optimizer="adamw")


def fresh_model_and_optimizer() -> tuple[main.Transformer, list[torch.optim.Optimizer]]:
    torch.manual_seed(0)
    model = main.Transformer(TINY)
    return model, main.configure_optimizer(model, CFG, "cpu")


def batches(n: int, bsz: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [tuple(torch.randint(TINY.vocab_size, (2, bsz, TINY.max_seq_len), generator=g)) for _ in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_step_worker(rank: int, world_size: int, port: int, out_file: str) -> None:
    """One DDP train_step on this rank's batch; rank 0 saves the weights."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    model, optimizer = fresh_model_and_optimizer()
    x, y = batches(world_size)[rank]
    main.train_step(DDP(model), optimizer, [(x, y)], lrs=[1e-2], grad_clip=1.0, autocast=nullcontext())
    if rank == 0:
        torch.save(model.state_dict(), out_file)
    dist.destroy_process_group()


def test_one_ddp_step_equals_one_step_on_the_concatenated_batches(tmp_path):
    out_file = str(tmp_path / "ddp.pt")
    mp.spawn(ddp_step_worker, args=(2, free_port(), out_file), nprocs=2, join=True)
    ddp_weights = torch.load(out_file, weights_only=True)

    model, optimizer = fresh_model_and_optimizer()
    (x0, y0), (x1, y1) = batches(2)
    main.train_step(model, optimizer, [(torch.cat([x0, x1]), torch.cat([y0, y1]))], [1e-2], 1.0, nullcontext())
    for name, p in model.state_dict().items():
        torch.testing.assert_close(ddp_weights[name], p, atol=1e-5, rtol=0, msg=name)


def test_grad_accumulation_of_two_equals_one_batch_twice_as_large():
    (x0, y0), (x1, y1) = batches(2)
    model_a, opt_a = fresh_model_and_optimizer()
    loss_a = main.train_step(model_a, opt_a, [(x0, y0), (x1, y1)], [1e-2], 1.0, nullcontext())
    model_b, opt_b = fresh_model_and_optimizer()
    loss_b = main.train_step(model_b, opt_b, [(torch.cat([x0, x1]), torch.cat([y0, y1]))], [1e-2], 1.0, nullcontext())
    assert abs(loss_a - loss_b) < 1e-5
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=name)


def save_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """Both ranks save; rank 0's disk is slow. Rank 1 checks that the checkpoint exists when its save returns."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    if rank == 0:
        write = checkpoint.save_checkpoint
        checkpoint.save_checkpoint = lambda path, ckpt: (time.sleep(1), write(path, ckpt))
    model, optimizers = fresh_model_and_optimizer()
    run = main.Run(TINY, CFG, inputs.CharTokenizer.from_text("abc"), np.zeros(1), np.zeros(1), model, model,
                   optimizers, main.RunState(torch.Generator()), "float32", "cpu", rank, world_size, Path(out_dir))
    checkpoint.save_run(run)
    if rank == 1:
        assert (Path(out_dir) / "ckpt.pt").exists(), "rank 1 left the save before rank 0 had written it"
    dist.destroy_process_group()


def test_every_rank_leaves_a_save_once_rank_0_has_written_it(tmp_path):
    """Ranks > 0 exit right after their last save: if one left the save at once, gloo's thread could still be
    freeing the gather's tensors as Python shuts down, which aborts the process (SIGABRT, a few runs in a hundred);
    and torchrun, which ends the others when one exits, could cut rank 0's write short."""
    mp.spawn(save_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)


# ----------------------------------------------------------------------------- torchrun

TORCHRUN_ARGS = ["--device", "cpu", "--dim", "32", "--n-layers", "1", "--n-heads", "2", "--n-kv-heads", "1",
                 "--seq-len", "16", "--batch-size", "4", "--eval-iters", "2", "--max-new-tokens", "10",
                 "--warmup-iters", "5", "--lr-decay-iters", "40", "--eval-interval", "10", "--log-interval", "1"]


def torchrun(corpus: Path, out_dir: Path, *args, max_restarts: int = 0, deadline: float = 180) -> subprocess.Popen:
    """Two gloo ranks of main.py on one thread each, with a c10d rendezvous as on a cluster; stdout and
    stderr of all processes in one pipe. After `deadline` seconds, torchrun and its ranks are killed (a
    hang then fails the test instead of stalling it)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{free_port()}", f"--max-restarts={max_restarts}",
           "main.py", *TORCHRUN_ARGS, "--data", str(corpus), "--out-dir", str(out_dir), *map(str, args)]
    proc = subprocess.Popen(cmd, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    proc.timer = threading.Timer(deadline, kill_job, args=(proc,))
    proc.timer.daemon = True
    proc.timer.start()
    return proc


def children(pid: int) -> set[int]:
    ps = subprocess.run(["ps", "-A", "-o", "pid=,ppid="], capture_output=True, text=True, check=True).stdout
    return {int(child) for child, parent in (line.split() for line in ps.splitlines()) if int(parent) == pid}


def kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL to every rank, then to torchrun (each rank runs in a session of its own)."""
    proc.timer.cancel()
    for pid in [*children(proc.pid), proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def read_until(proc: subprocess.Popen, pattern: str) -> re.Match:
    """Read proc's output until a line matches `pattern`."""
    seen = ""
    for line in proc.stdout:
        seen += line
        if match := re.search(pattern, line):
            return match
    raise AssertionError(f"the job ended before {pattern!r}:\n{seen}")


def ranks(torchrun_pid: int, out_dir: Path) -> dict[int, int]:
    """{rank: pid} of the workers that torchrun started (rank 0 is the holder of out-dir/train.lock)."""
    workers = children(torchrun_pid)
    rank0 = int((out_dir / "train.lock").read_text().split()[1])
    assert len(workers) == 2 and rank0 in workers, (workers, rank0)
    return {0: rank0, 1: (workers - {rank0}).pop()}


@pytest.fixture(scope="module")
def straight(corpus, tmp_path_factory) -> tuple[Path, str]:
    """40 steps without interruption: its out-dir and output."""
    out_dir = tmp_path_factory.mktemp("straight")
    proc = torchrun(corpus, out_dir, "--max-iters", "40")
    output = proc.communicate()[0]
    assert proc.returncode == 0, output[-3000:]
    return out_dir, output


def test_torchrun_two_processes_train_and_write_one_checkpoint(straight):
    out_dir, output = straight
    assert "x 2 ranks" in output  # the global batch counts both ranks
    assert output.count("--- sample") == 1  # only rank 0 samples
    assert sorted(p.name for p in out_dir.iterdir() if p.suffix == ".pt") == ["best.pt", "ckpt.pt"]
    assert len(torch.load(out_dir / "ckpt.pt", weights_only=True)["rng"]["data"]) == 2  # each rank's batches
    log = pd.read_csv(out_dir / "loss.csv")
    assert list(log["step"]) == [0, 10, 20, 30, 40]
    assert log["train_loss"].iloc[-1] < log["train_loss"].iloc[0] - 0.3


def test_sigterm_to_one_rank_stops_both_at_one_step_and_the_restart_ends_bit_for_bit_as_straight(
        corpus, straight, tmp_path):
    """SIGTERM to rank 1 only: rank 0 learns it through the all-reduce, both stop after the same step, rank 0
    saves once; both exit 143, torchrun restarts them, and --resume auto goes on to step 40."""
    proc = torchrun(corpus, tmp_path, "--max-iters", "40", "--resume", "auto", max_restarts=1)
    try:
        read_until(proc, r"^step 13/")
        os.kill(ranks(proc.pid, tmp_path)[1], signal.SIGTERM)
        step = int(read_until(proc, r"interrupted at step (\d+) \(SIGTERM\): checkpoint saved").group(1))
        read_until(proc, rf"resumed from {re.escape(str(tmp_path / 'ckpt.pt'))} at step {step}$")
        output = proc.communicate()[0]
    finally:
        kill_job(proc)
    assert proc.returncode == 0, output[-3000:]
    assert "Traceback" not in output
    assert_same_training_state(torch.load(tmp_path / "ckpt.pt", weights_only=True),
                               torch.load(straight[0] / "ckpt.pt", weights_only=True))


def test_a_killed_rank_restarts_from_the_last_checkpoint_and_without_restarts_every_process_ends(corpus, tmp_path):
    proc = torchrun(corpus, tmp_path, "--max-iters", "100000", "--resume", "auto", max_restarts=1)
    try:
        read_until(proc, r"^step 12/")  # after the checkpoint of step 10
        first = ranks(proc.pid, tmp_path)
        os.kill(first[1], signal.SIGKILL)
        step = int(read_until(proc, r"resumed from .* at step (\d+)$").group(1))
        assert step >= 10 and step % 10 == 0
        read_until(proc, rf"^step {step + 2}/")  # the job goes on
        second = ranks(proc.pid, tmp_path)
        os.kill(second[1], signal.SIGKILL)  # no restart left
        output = proc.communicate()[0]
        for pid in [*first.values(), *second.values()]:  # every process has ended
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        kill_job(proc)
    assert proc.returncode != 0
    assert "Signal 9 (SIGKILL) received by PID" in output  # torchrun names the failure
    assert "error: rank 0: lost contact with another process of the job" in output
