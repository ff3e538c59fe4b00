"""Data parallel training on CPU with the gloo backend: the same main.py that runs on one device."""

import importlib
import os
import socket
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pandas as pd
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

main = importlib.import_module("main")

ROOT = Path(__file__).resolve().parent.parent
TINY = main.ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=20, max_seq_len=16, max_batch_size=8)
CFG = main.TrainConfig(learning_rate=1e-2, weight_decay=0.1)


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


def test_torchrun_two_processes_train_and_write_one_checkpoint(tmp_path, shakespeare_path):
    data = tmp_path / "tiny.txt"
    data.write_text(shakespeare_path.read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    out_dir = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "main.py",
           "--device", "cpu", "--data", str(data), "--out-dir", str(out_dir), "--max-iters", "30",
           "--eval-interval", "15", "--eval-iters", "2", "--dim", "32", "--n-layers", "1", "--n-heads", "2",
           "--n-kv-heads", "1", "--seq-len", "32", "--batch-size", "8", "--max-new-tokens", "10"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "x 2 ranks" in result.stdout  # the global batch counts both ranks
    assert result.stdout.count("--- sample") == 1  # only rank 0 samples
    assert sorted(p.name for p in out_dir.iterdir() if p.suffix == ".pt") == ["best.pt", "ckpt.pt"]
    log = pd.read_csv(out_dir / "loss.csv")
    assert list(log["step"]) == [0, 15, 30]
    assert log["train_loss"].iloc[-1] < log["train_loss"].iloc[0] - 0.3
