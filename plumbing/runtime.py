"""What a long run needs from the operating system and the cluster, kept out of the chapter.

- `StopSignals`: Ctrl-C (SIGINT) and SIGTERM (sent by SLURM, Kubernetes, `docker stop` and torchrun
  before they kill a process) only ask the training loop to stop after the current step.
- `lock_out_dir`: one training run per output directory.
- `Progress`: a progress bar on a terminal, plain lines in a log file.
- `training_process`: launch and teardown of one process of a run (the process group, the lock).
- `interrupted`: what a run stopped by a signal says, once its checkpoint is saved.
- `setup_distributed`, `all_ranks_max`, `gather_from_ranks`, `wait_for_all_ranks`, `collective_errors`,
  `teardown_distributed`:
  the few torch.distributed calls that DistributedDataParallel training needs under torchrun.
- `exit_on_error`: every problem ends in one line `error: ...`, a signal in its exit status.
- `cpu_matrix_vector_kernel`: a faster CPU kernel for the one-token steps of generation; `cpu_batch_kernels`:
  that, and a faster bfloat16 matrix product for batches on CPUs without bfloat16 instructions.
- `pick_device`: --device auto, cpu, cuda or mps.
- `save_checkpoint`: an atomic write, so that a killed run never leaves half a checkpoint.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

try:
    import fcntl
except ImportError:  # Windows: no out-dir lock
    fcntl = None

# A collective that waits longer than this for another rank fails instead of hanging: long enough for
# rank 0 to evaluate and save while the others wait at the next step.
COLLECTIVE_TIMEOUT = timedelta(minutes=10)
LOCK_NAME = "train.lock"


# ----------------------------------------------------------------------------- signals


class Stopped(Exception):
    """Training stopped on a signal after saving; the process exits with 128 + the signal's number."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.exit_code = 128 + signum  # 130 for SIGINT, 143 for SIGTERM, as a shell reports them


class StopSignals:
    """A context in which SIGINT and SIGTERM only set `signum`; the loop checks it after each step.

    A second signal acts at once, as it would without this context.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self) -> StopSignals:
        self.signum = 0
        self._previous = {s: signal.signal(s, self._record) for s in self.SIGNALS}
        return self

    def _record(self, signum: int, frame) -> None:
        if self.signum:
            self.__exit__()
            signal.raise_signal(signum)
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


# ----------------------------------------------------------------------------- the out-dir lock


@contextmanager
def lock_out_dir(out_dir: Path) -> Iterator[None]:
    """Create out_dir and hold it for this process while the context lasts, or fail before any work is done.

    The lock is the kernel's (`flock` on out_dir/train.lock): it ends with the process, however the
    process ends, so the lock of a killed run is simply taken over. The file names the holder (pid and
    host) for the message that refuses a second run. No lock on Windows.

    Raises:
        OSError: out_dir cannot be created or written, or a live process holds the lock.
    """
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        f = open(out_dir / LOCK_NAME, "a+")
    except OSError as e:
        raise OSError(f"--out-dir {out_dir}: cannot write there ({e.strerror or e})") from e
    with f:
        if fcntl is not None:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "another process"
                raise OSError(f"--out-dir {out_dir} is in use by a training run that is still alive ({holder}); "
                              f"wait for it, stop it, or choose another --out-dir") from None
            except OSError as e:  # a file system without locks (some Lustre mounts): train unlocked
                print(f"note: cannot lock {out_dir} ({e.strerror}); make sure no other run writes there",
                      file=sys.stderr)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on host {socket.gethostname()}\n")
        f.flush()
        yield


# ----------------------------------------------------------------------------- progress


class Progress:
    """Training progress. On a terminal: a tqdm bar with the loss and learning rates. When stdout or
    stderr is a file: one plain line every `every` steps (a bar would write every redraw into it).

    Args:
        total: the last step; initial: the step training starts from (after --resume).
        tokens_per_step: for tokens/s. every: steps between plain lines. enabled: False on ranks > 0.
    """

    def __init__(self, total: int, initial: int, tokens_per_step: int, every: int, enabled: bool = True):
        self.total, self.tokens_per_step, self.every, self.enabled = total, tokens_per_step, every, enabled
        self.interactive = sys.stdout.isatty() and sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=min(initial, total), desc="training", dynamic_ncols=True,
                        disable=not (enabled and self.interactive))
        self.last_step, self.last_time = initial, time.perf_counter()
        self.train_steps, self.train_seconds = 0, 0.0

    def update(self, step: int, loss: float, lrs: dict[str, float], seconds: float) -> None:
        """Report that `step` steps are done; `loss`, each optimizer's learning rate (`lrs`, by name) and the
        `seconds` spent in training (not evaluating or saving) are those of the step just taken."""
        self.train_steps += 1
        self.train_seconds += seconds
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.3f}", **{f"lr_{name}": f"{lr:.1e}" for name, lr in lrs.items()})
        if self.enabled and not self.interactive and (step % self.every == 0 or step == self.total):
            now = time.perf_counter()
            seconds_per_step = (now - self.last_time) / (step - self.last_step)
            rates = " ".join(f"{name} {lr:.1e}" for name, lr in lrs.items())
            print(f"step {step}/{self.total} | loss {loss:.4f} | lr {rates} | "
                  f"{self.tokens_per_step / seconds_per_step:,.0f} tok/s | "
                  f"{tqdm.format_interval(seconds_per_step * (self.total - step))} left", flush=True)
            self.last_step, self.last_time = step, now

    def tokens_per_s(self) -> float:
        """Training throughput over the steps reported so far (evaluations and saves not counted)."""
        return self.train_steps * self.tokens_per_step / self.train_seconds if self.train_seconds else float("nan")

    def write(self, message: str) -> None:
        """Print a line (above the bar, on a terminal)."""
        if self.enabled:
            tqdm.write(message)

    def close(self) -> None:
        self.bar.close()


# ----------------------------------------------------------------------------- torch.distributed


def setup_distributed(device: str) -> tuple[int, int, str]:
    """Under torchrun (it sets RANK, WORLD_SIZE, LOCAL_RANK), join the process group: NCCL on CUDA, gloo
    on CPU. Each process uses the GPU of its LOCAL_RANK.

    Returns:
        rank, world_size and the device of this process ((0, 1, device) outside torchrun).
    """
    if "RANK" not in os.environ:
        return 0, 1, device
    if device == "cuda":
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun keeps one key-value store across restarts (PyTorch 2.13): under a prefix of its own, a
        # restarted rank cannot read the addresses of the processes it replaces and wait for them forever.
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                              is_master=False, timeout=COLLECTIVE_TIMEOUT)
        store = dist.PrefixStore(f"attempt_{os.environ['TORCHELASTIC_RESTART_COUNT']}", store)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=COLLECTIVE_TIMEOUT)
    else:
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
    return rank, world_size, device


def teardown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_ranks_max(values: list[float], device: str) -> list[float]:
    """The element-wise maximum of `values` over all ranks (so that every rank takes the same decision)."""
    t = torch.tensor(values, device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def wait_for_all_ranks() -> None:
    """A barrier: no rank goes on before every rank has come here."""
    if dist.is_initialized():
        dist.barrier()


def gather_from_ranks(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank; [obj] outside torchrun."""
    if not dist.is_initialized():
        return [obj]
    objs = [None] * dist.get_world_size()
    dist.all_gather_object(objs, obj)
    return objs


@contextmanager
def collective_errors():
    """Under torchrun, turn the RuntimeError of a collective whose peer died into a one-line
    ConnectionError (an OSError) that names this rank; torchrun then restarts or ends the job."""
    try:
        yield
    except RuntimeError as e:
        if not (dist.is_initialized() and (isinstance(e, dist.DistError) or "gloo" in str(e))):
            raise
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConnectionError(f"rank {dist.get_rank()}: lost contact with another process of the job "
                              f"({first_line}); see that process's log") from e


@contextmanager
def training_process(device_choice: str, out_dir: Path) -> Iterator[tuple[int, int, str]]:
    """Launch and teardown of one process of a training run. Under torchrun it joins the process group (one
    process per rank); rank 0 locks out_dir first (one run per out-dir, refused before any work); a collective
    whose peer died becomes a one-line ConnectionError. Yields (rank, world_size, device)."""
    rank, world_size, device = setup_distributed(pick_device(device_choice))
    try:
        with lock_out_dir(out_dir) if rank == 0 else nullcontext(), collective_errors():
            yield rank, world_size, device
    finally:
        teardown_distributed()


def interrupted(signum: int, step: int, ckpt_path: Path, world_size: int, data: str | None, log) -> Stopped:
    """After the save that a signal asked for: say how to resume, wait for every rank (torchrun ends the others
    when one exits: not before rank 0 has said it), and return the Stopped exception to raise."""
    stopped = Stopped(int(signum))
    launcher = "python main.py" if world_size == 1 else "torchrun [the same options] main.py"
    log(f"\ninterrupted at step {step} ({stopped}): checkpoint saved to {ckpt_path}.\n"
        f"continue with: {launcher} --resume --out-dir {ckpt_path.parent}" + (f" --data {data}" if data else ""))
    wait_for_all_ranks()
    return stopped


@contextmanager
def exit_on_error() -> Iterator[None]:
    """Every problem ends the process with one line `error: ...` (exit status 1), never a traceback; Ctrl-C and
    SIGTERM end it with the exit status of the signal (130, 143)."""
    try:
        yield
    except Stopped as e:
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except (OSError, ValueError, FloatingPointError) as e:
        sys.exit(f"error: {e}")


@contextmanager
def cpu_matrix_vector_kernel(seqlen: int) -> Iterator[None]:
    """For a chunk of one token, PyTorch's own kernels instead of oneDNN's on the CPU.

    One token multiplies each weight matrix by a vector. For that, PyTorch's own bfloat16 kernel reads the
    weights about 1.7 times as fast as oneDNN's matrix kernel on an AMD EPYC (docs/llama3.md), while for a
    chunk of several tokens oneDNN's is the faster by far. Float32 matrices use neither (MKL), and a GPU neither.
    """
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = enabled and seqlen > 1
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = enabled


@contextmanager
def cpu_batch_kernels(rows: int) -> Iterator[None]:
    """The CPU kernels for a forward pass of `rows` tokens in all (a batch of one-token steps, or a prompt):
    cpu_matrix_vector_kernel's, and, for 8 rows or more by bfloat16 weights on a CPU where oneDNN has no bfloat16
    path (AVX2 only: no AVX-512, no AMX), float32 products on blocks of 512 weight rows converted on the fly.

    There PyTorch's bfloat16 matrix product converts every weight again for every row, so 16 rows cost about 13
    times one, and a batch gains almost nothing; in blocks, each weight is converted once per step and MKL's
    float32 product is fast: 1.5x faster at 8 rows, 2.4x at 16, per matrix at 2 threads (4 rows are 14% slower,
    so they stay as they are); Llama 3.2 1B at 16 rows: 17.6 tokens/s instead of 8.4 (docs/serving.md).
    """
    blocks = rows >= 8 and not onednn_has_bfloat16()
    with cpu_matrix_vector_kernel(rows), (_Bfloat16InFloat32Blocks() if blocks else nullcontext()):
        yield


def onednn_has_bfloat16() -> bool:
    """Whether oneDNN computes in bfloat16 on this CPU (AVX-512 or AMX on x86, bf16 on Arm)."""
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


class _Bfloat16InFloat32Blocks(torch.overrides.TorchFunctionMode):
    """While active, F.linear by a bfloat16 weight on the CPU without bias (nn.Linear's; a GPU's weights are left to
    the GPU) runs bfloat16_linear_in_blocks, with
    one float32 buffer per row length, kept for the whole forward pass (a new one per product would cost page
    faults each time)."""

    def __init__(self):
        super().__init__()
        self.buffers: dict[int, torch.Tensor] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.linear and not kwargs and args[1].dtype == torch.bfloat16 and (
                args[1].device.type == "cpu") and (len(args) == 2 or args[2] is None):
            x, weight = args[:2]
            if weight.shape[1] not in self.buffers:
                self.buffers[weight.shape[1]] = torch.empty(512, weight.shape[1], device=x.device)
            return bfloat16_linear_in_blocks(x, weight, self.buffers[weight.shape[1]])
        return func(*args, **(kwargs or {}))


@torch.no_grad()
def bfloat16_linear_in_blocks(x: torch.Tensor, weight: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    """x @ weight.T for a bfloat16 weight (out, in), computed in float32 a block of weight rows at a time: each
    block is converted into `buffer` (block, in), float32, which stays in the cache. For inference (no gradient).
    (..., in) -> (..., out), in x's dtype."""
    rows = x.reshape(-1, x.shape[-1]).float()  # (rows, in)
    out = torch.empty(rows.shape[0], weight.shape[0], device=x.device)  # (rows, out) float32
    block = buffer.shape[0]
    for start in range(0, weight.shape[0], block):
        part = buffer[: min(block, weight.shape[0] - start)].copy_(weight[start : start + block])
        torch.mm(rows, part.T, out=out[:, start : start + block])
    return out.to(x.dtype).view(*x.shape[:-1], weight.shape[0])


def pick_device(choice: str) -> str:
    """'auto' -> cuda, then mps, then cpu. An explicit choice that is not available is an error."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if choice == "auto":
        return next(d for d in ("cuda", "mps", "cpu") if available[d])
    if not available[choice]:
        raise ValueError(f"--device {choice} is not available on this machine; use --device cpu or auto")
    return choice


def save_checkpoint(path: Path, checkpoint: dict) -> None:
    """Write atomically: a temporary file, flushed to disk, then renamed over the old one.
    Killing the process at any moment leaves either the old or the new checkpoint, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # after a failed write: no half-written file left behind
