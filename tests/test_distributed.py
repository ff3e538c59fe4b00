"""Data parallel training on CPU with the gloo backend: the same main.py that runs on one device, and chapter 6's
LoRA fine-tune with the frozen base sharded over the ranks (FSDP2).

The torchrun tests of main.py share one uninterrupted 40-step run (`straight`) and compare the interrupted and
restarted runs with it, bit for bit; chapter 6's share one 10-step fine-tune (`lora_straight`), which one process
given the same batches must repeat. They train tiny models on text made below.
"""

import argparse
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
from conftest import assert_same_training_state, generated_text
from torch.nn.parallel import DistributedDataParallel as DDP

from plumbing import checkpoint, llama_fixtures, lora_run
from plumbing.sharding import row_range

main = importlib.import_module("main")
inputs = importlib.import_module("01_input_block")
llama = importlib.import_module("05_llama3_tokenizer_and_weights")
lora = importlib.import_module("06_lora_finetuning")

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


def torchrun_job(script: str | Path, *args, max_restarts: int = 0, deadline: float = 180) -> subprocess.Popen:
    """Two gloo ranks of `script` on one thread each, with a c10d rendezvous as on a cluster; stdout and
    stderr of all processes in one pipe. After `deadline` seconds, torchrun and its ranks are killed (a
    hang then fails the test instead of stalling it)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{free_port()}", f"--max-restarts={max_restarts}", str(script), *map(str, args)]
    proc = subprocess.Popen(cmd, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    proc.timer = threading.Timer(deadline, kill_job, args=(proc,))
    proc.timer.daemon = True
    proc.timer.start()
    return proc


def torchrun(corpus: Path, out_dir: Path, *args, max_restarts: int = 0) -> subprocess.Popen:
    """main.py on two ranks (torchrun_job), with TORCHRUN_ARGS."""
    return torchrun_job("main.py", *TORCHRUN_ARGS, "--data", corpus, "--out-dir", out_dir, *args,
                        max_restarts=max_restarts)


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


# ----------------------------------------------------------------------------- chapter 6 under torchrun: FSDP2


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    """Chapter 5's demo model (dim 64, 2 layers, vocab 512, output tied), random, float32, in Meta's layout (meta/)
    and Hugging Face's (hf/, wq and wk rows in its order), and a text to fine-tune on (text.txt)."""
    root = tmp_path_factory.mktemp("tiny_llama")
    params, tokenizer = llama_fixtures.TINY_PARAMS, llama_fixtures.BYTE_TOKENIZER
    weights, model_args = llama_fixtures.random_llama(params, std=0.15), llama.ModelArgs(**params)
    llama_fixtures.write_meta_layout(root / "meta", weights, params, tokenizer)
    llama_fixtures.write_hf_layout(root / "hf", llama.hf_state_dict(weights, model_args), params,
                                   llama.meta_rope_scaling_factor(model_args), tokenizer)
    (root / "text.txt").write_text(generated_text(), encoding="utf-8")
    return root


def lora_args(tiny_llama: Path, out_dir: Path) -> list:
    """A fine-tune of 10 steps, 2 micro-batches of 2 windows of 32 tokens per rank, on Hugging Face's layout."""
    return ["--llama-dir", tiny_llama / "hf", "--data", tiny_llama / "text.txt", "--out-dir", out_dir,
            "--max-iters", 10, "--batch-size", 2, "--grad-accum", 2, "--seq-len", 32, "--eval-iters", 2,
            "--device", "cpu", "--log-interval", 1]


@pytest.fixture(scope="module")
def lora_straight(tiny_llama, tmp_path_factory) -> tuple[Path, str]:
    """10 steps on 2 ranks without interruption: its out-dir and output."""
    out_dir = tmp_path_factory.mktemp("lora_straight")
    proc = torchrun_job("06_lora_finetuning.py", *lora_args(tiny_llama, out_dir))
    output = proc.communicate()[0]
    assert proc.returncode == 0, output[-3000:]
    return out_dir, output


def test_lora_on_two_ranks_equals_one_process_given_the_same_batches(tiny_llama, lora_straight):
    """One process, Meta's layout unsharded, steps on the micro-batches of rank 0 then rank 1 (each rank's stream is
    seeded by its rank): the global batch of 2 ranks x 2 micro-batches. Its adapter is the 2 ranks' to float32's
    rounding (the sums run in another order)."""
    out_dir, output = lora_straight
    assert "2 micro-batches of 2 x 2 ranks" in output and output.count("val loss after fine-tuning") == 1
    saved = torch.load(out_dir / "adapter.pt", weights_only=True)
    cfg, lora_cfg = main.TrainConfig(**saved["train_config"]), lora.LoRAConfig(**saved["lora_config"])

    model, tokenizer = llama.load_llama(tiny_llama / "meta", saved["seq_len"], log=lambda line: None)
    train_data, _ = lora_run.load_data(str(tiny_llama / "text.txt"), tokenizer, saved["seq_len"])
    torch.manual_seed(cfg.seed)
    lora.add_lora(model, lora_cfg.rank, lora_cfg.alpha, lora_cfg.targets)
    optimizers = main.configure_optimizer(model, cfg, "cpu")
    streams = [torch.Generator().manual_seed(cfg.seed + rank) for rank in range(2)]
    for step in range(cfg.max_iters):
        batches = [inputs.get_batch(train_data, cfg.batch_size, saved["seq_len"], tokenizer.bos_id, stream, "cpu")
                   for stream in streams for _ in range(cfg.grad_accum)]
        main.train_step(model, optimizers, batches, list(main.learning_rates(step, optimizers, cfg).values()),
                        cfg.grad_clip, nullcontext())
    ours = lora.lora_state_dict(model)
    assert saved["lora"].keys() == ours.keys()
    assert max(t.abs().max().item() for name, t in ours.items() if name.endswith("lora_B")) > 1e-3  # B moved
    for name, tensor in ours.items():
        assert (saved["lora"][name] - tensor).abs().max().item() <= 1e-5, name


SIGTERM_RANK_1 = """import importlib, os, signal, sys
sys.path.insert(0, {root!r})
lora = importlib.import_module("06_lora_finetuning")
train_one_step = lora.train_one_step

def step_then_sigterm(*args):  # rank 1 alone gets SIGTERM, after its third step
    loss = train_one_step(*args)
    if args[-1] == 2 and os.environ["RANK"] == "1":
        signal.raise_signal(signal.SIGTERM)
    return loss

lora.train_one_step = step_then_sigterm
lora.main(sys.argv[1:])
"""


def test_sigterm_to_one_rank_saves_the_whole_run_and_resume_ends_bit_for_bit_as_straight(tiny_llama, lora_straight,
                                                                                          tmp_path):
    """Rank 0 learns of rank 1's SIGTERM through the all-reduce: both stop after step 3 and save the whole adapter,
    AdamW's state and both batch streams; --resume on 2 ranks then ends exactly where the straight run ended."""
    script = tmp_path / "sigterm_rank_1.py"
    script.write_text(SIGTERM_RANK_1.format(root=str(ROOT)))
    out_dir = tmp_path / "stopped"
    proc = torchrun_job(script, *lora_args(tiny_llama, out_dir))
    output = proc.communicate()[0]
    assert proc.returncode != 0 and "exitcode  : 143" in output, output[-3000:]
    assert "interrupted at step 3: adapter saved" in output
    assert f'File "{ROOT}' not in output  # no traceback from a rank (torchrun's own reports the exit code)
    assert "continue with: torchrun [the same options] 06_lora_finetuning.py" in output
    assert torch.load(out_dir / "adapter.pt", weights_only=True)["step"] == 3

    proc = torchrun_job("06_lora_finetuning.py", *lora_args(tiny_llama, out_dir), "--resume")
    output = proc.communicate()[0]
    assert proc.returncode == 0 and f"resumed from {out_dir / 'train_state.pt'} at step 3" in output, output[-3000:]
    resumed, straight = (torch.load(d / "train_state.pt", weights_only=True) for d in (out_dir, lora_straight[0]))
    assert resumed["step"] == straight["step"] == 10 and resumed["losses"] == straight["losses"]
    assert len(straight["data_rng"]) == 2  # each rank's batch stream
    for name, tensor in straight["lora"].items():
        assert torch.equal(resumed["lora"][name], tensor), name
    for i, state in straight["optimizer"][0]["state"].items():
        for key, value in state.items():
            assert torch.equal(resumed["optimizer"][0]["state"][i][key], value), (i, key)


def rank_coded(shape: torch.Size, rows: slice, rank: int) -> torch.Tensor:
    """Rows `rows` of a tensor of `shape`, each row 1000 * rank + its global row number (+ 0.25 on AdamW's)."""
    return (1000.0 * rank + torch.arange(rows.start, rows.stop, dtype=torch.float32)[:, None]).expand(
        rows.stop - rows.start, *shape[1:])


def sharded_save_worker(rank: int, world_size: int, port: int, llama_dir: str, out_dir: str) -> None:
    """The tiny Llama sharded with LoRA on it, one step taken; then every rank writes rank-coded values into its rows
    of every LoRA matrix and of AdamW's first moment, and all save."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    args = argparse.Namespace(llama_dir=Path(llama_dir), ckpt=None, dtype=None)
    model, tokenizer, seq_len = lora_run.load_base(args, 16, 16, "cpu", lambda m: lora.add_lora(m, 4, 8.0), rank,
                                                   world_size)
    cfg = lora.lora_train_config(max_iters=1, batch_size=2, learning_rate=1e-3, eval_iters=1, seed=0)
    optimizers = main.configure_optimizer(model, cfg, "cpu")
    tokens = torch.randint(0, 256, (2, seq_len), generator=torch.Generator().manual_seed(rank))
    main.train_step(model, optimizers, [(tokens, tokens)], [1e-3], 1.0, nullcontext())
    with torch.no_grad():
        for p in (p for p in model.parameters() if p.requires_grad):  # LoRA's matrices
            start, stop = row_range(p.shape[0], rank, world_size)
            p.to_local().copy_(rank_coded(p.shape, slice(start, stop), rank))
            optimizers[0].state[p]["exp_avg"].to_local().copy_(rank_coded(p.shape, slice(start, stop), rank) + 0.25)
    run = lora_run.FineTune(lora.LoRAConfig(4, 8.0), cfg, seq_len, model, tokenizer.bos_id, np.zeros(1),
                            np.zeros(1), optimizers, torch.Generator(), "cpu", rank, world_size, Path(out_dir), "tiny",
                            *lora.count_parameters(model))
    lora_run.save(run, lora.lora_state_dict(model))
    dist.destroy_process_group()


def test_every_ranks_rows_are_saved(tiny_llama, tmp_path):
    """adapter.pt and train_state.pt hold every row of every LoRA matrix (and of AdamW's moments), each from the
    rank that holds it: saving rank 0's shard alone is a bug other projects shipped."""
    mp.spawn(sharded_save_worker, args=(2, free_port(), str(tiny_llama / "meta"), str(tmp_path)), nprocs=2, join=True)
    adapter = torch.load(tmp_path / "adapter.pt", weights_only=True)["lora"]
    state = torch.load(tmp_path / "train_state.pt", weights_only=True)
    assert len(adapter) == 2 * 2 * 7
    for i, (name, tensor) in enumerate(adapter.items()):
        owners = [row_range(tensor.shape[0], rank, 2) for rank in range(2)]
        expected = torch.cat([rank_coded(tensor.shape, slice(*rows), rank) for rank, rows in enumerate(owners)])
        assert torch.equal(tensor, expected), name
        assert torch.equal(state["lora"][name], expected), name
        assert torch.equal(state["optimizer"][0]["state"][i]["exp_avg"], expected + 0.25), name
