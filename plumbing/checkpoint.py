"""What a training checkpoint holds, how a run saves one, how it is read back safely, and how a run resumes from
it exactly.

Nothing here is about LLaMA. A checkpoint is one dict, saved atomically (`runtime.save_checkpoint`):

    model           the uncompiled model's state dict (Meta's names, no `_orig_mod.` prefix)
    optimizer       [AdamW's state dict, then Muon's if it is used]
    model_args      ModelArgs as a dict
    train_config    TrainConfig as a dict
    tokenizer       the character vocabulary (CharTokenizer.to_dict)
    step, best_val_loss, loss_log, train_losses (every step's loss on its batch)
    rng             {"torch": the global RNG, "cuda": every GPU's RNG, "data": every rank's batch stream}
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from plumbing.runtime import gather_from_ranks, save_checkpoint, wait_for_all_ranks

REQUIRED_KEYS = {"model", "model_args", "tokenizer", "step"}  # enough to sample
RESUME_KEYS = {"train_config", "optimizer", "best_val_loss", "loss_log", "rng"}  # and to go on training


def read_checkpoint(path: Path, check: Callable[[dict], object]) -> dict:
    """Load a checkpoint holding tensors and plain data only (weights_only=True: never runs pickled code).

    Args:
        check: called with the checkpoint; a TypeError or RuntimeError means that it does not fit (main.py
            builds the model its model_args describe and loads the weights into it).
    Raises:
        FileNotFoundError: no file at path.
        ValueError: the file is not a checkpoint of main.py (truncated, foreign, unsafe, or not fitting).
    """
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: train first (python main.py --out-dir {path.parent})")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad file; all mean the same here
        raise ValueError(f"{path} is not a readable checkpoint ({type(e).__name__}): "
                         f"delete it and train again") from e
    if not isinstance(checkpoint, dict) or REQUIRED_KEYS - checkpoint.keys():
        raise ValueError(f"{path} is not a checkpoint of main.py (it needs the keys {sorted(REQUIRED_KEYS)})")
    try:
        check(checkpoint)
    except (TypeError, RuntimeError) as e:
        raise ValueError(f"{path} is not a checkpoint of main.py ({type(e).__name__}: {e}); "
                         f"delete it and train again") from e
    return checkpoint


def checkpoint_to_resume(path: Path, resume: bool | str, load: Callable[[Path], dict]) -> dict | None:
    """The checkpoint at `path`, read with `load` (main.load_checkpoint), when --resume asks for it (True, or
    "auto" and the file exists) and checked to hold what resuming needs (else one-line ValueError); None for a
    new run."""
    if not (resume is True or (resume == "auto" and path.exists())):
        return None
    checkpoint = load(path)
    missing = sorted(RESUME_KEYS - checkpoint.keys())
    if missing:
        raise ValueError(f"{path} cannot be resumed: it lacks {', '.join(missing)}; sample from it with --sample, "
                         f"or train a new model in another --out-dir")
    return checkpoint


def save_run(run, best: bool = False) -> None:
    """Rank 0 writes out-dir/ckpt.pt (and best.pt), with every rank's batch-stream state, so that --resume is
    exact. Every rank must call it (the gather and the barrier are collectives); all leave it together, once the
    files are written. run: main.Run."""
    data_states = gather_from_ranks(run.state.data_gen.get_state())
    if run.rank == 0:
        checkpoint = {
            "model": run.raw_model.state_dict(), "optimizer": [o.state_dict() for o in run.optimizers],
            "model_args": asdict(run.model_args), "train_config": asdict(run.cfg),
            "tokenizer": run.tokenizer.to_dict(),
            "step": run.state.step, "best_val_loss": run.state.best_val, "loss_log": run.state.loss_log,
            "train_losses": run.state.train_losses,
            "rng": {"torch": torch.get_rng_state(), "data": data_states,
                    "cuda": torch.cuda.get_rng_state_all() if run.device_type == "cuda" else []},
        }
        save_checkpoint(run.out_dir / "ckpt.pt", checkpoint)
        if best:
            save_checkpoint(run.out_dir / "best.pt", checkpoint)
    # Ranks > 0 exit soon after their last save. While they wait here, gloo's worker thread frees the gather's
    # tensors (it needs the GIL): freed as Python shuts down, they abort the process (SIGABRT, a few runs in 100).
    wait_for_all_ranks()


def restore_run(checkpoint: dict, run) -> None:
    """Put the weights, optimizer states, RunState and random streams of `checkpoint` back into `run` (main.Run),
    so that it goes on exactly as an uninterrupted run would (when it has the same number of ranks)."""
    state = run.state
    run.raw_model.load_state_dict(checkpoint["model"])
    for optimizer, saved in zip(run.optimizers, checkpoint["optimizer"], strict=True):
        optimizer.load_state_dict(saved)
    state.step, state.best_val, state.loss_log = checkpoint["step"], checkpoint["best_val_loss"], checkpoint["loss_log"]
    state.last_eval = state.loss_log[-1]["step"] if state.loss_log else -1
    state.train_losses = checkpoint.get("train_losses", [math.nan] * state.step)  # older checkpoints lack them
    torch.set_rng_state(checkpoint["rng"]["torch"])
    if run.device_type == "cuda" and checkpoint["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(checkpoint["rng"]["cuda"])
    data_states = checkpoint["rng"]["data"]  # one per rank: each rank goes on with its own batches
    if len(data_states) == run.world_size:
        state.data_gen.set_state(data_states[run.rank])
    else:
        state.data_gen.manual_seed(checkpoint["train_config"]["seed"] + run.rank + 1000003 * state.step)
        run.log(f"note: the checkpoint was saved by {len(data_states)} processes and this run has {run.world_size}: "
                f"every rank draws new batches, so this run will not repeat an uninterrupted one")
