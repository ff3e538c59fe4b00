"""What a training checkpoint holds, how it is read back safely, and how a run resumes from it exactly.

Nothing here is about LLaMA. A checkpoint is one dict, saved atomically (`runtime.save_checkpoint`):

    model           the uncompiled model's state dict (Meta's names, no `_orig_mod.` prefix)
    optimizer       [AdamW's state dict, then Muon's if it is used]
    model_args      ModelArgs as a dict
    train_config    TrainConfig as a dict
    tokenizer       the character vocabulary (CharTokenizer.to_dict)
    step, best_val_loss, loss_log
    rng             {"torch": the global RNG, "cuda": every GPU's RNG, "data": every rank's batch stream}
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

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


def check_resumable(checkpoint: dict, path: Path) -> None:
    """Raise ValueError (one line) when `checkpoint` lacks what --resume needs."""
    missing = sorted(RESUME_KEYS - checkpoint.keys())
    if missing:
        raise ValueError(f"{path} cannot be resumed: it lacks {', '.join(missing)}; sample from it with --sample, "
                         f"or train a new model in another --out-dir")


def training_checkpoint(raw_model: torch.nn.Module, optimizers: list, model_args: dict, train_config: dict,
                        tokenizer: dict, state, data_states: list, device_type: str) -> dict:
    """The dict that a save writes. state: main.RunState; data_states: every rank's batch-stream state."""
    return {
        "model": raw_model.state_dict(), "optimizer": [o.state_dict() for o in optimizers],
        "model_args": model_args, "train_config": train_config, "tokenizer": tokenizer,
        "step": state.step, "best_val_loss": state.best_val, "loss_log": state.loss_log,
        "rng": {"torch": torch.get_rng_state(), "data": data_states,
                "cuda": torch.cuda.get_rng_state_all() if device_type == "cuda" else []},
    }


def restore_training(checkpoint: dict, model: torch.nn.Module, optimizers: list, state, rank: int, world_size: int,
                     device_type: str, log: Callable[[str], None]) -> None:
    """Put the weights, optimizer states, RunState and random streams of `checkpoint` back, so that the run
    goes on exactly as an uninterrupted one would (when it has the same number of ranks)."""
    model.load_state_dict(checkpoint["model"])
    for optimizer, saved in zip(optimizers, checkpoint["optimizer"], strict=True):
        optimizer.load_state_dict(saved)
    state.step, state.best_val, state.loss_log = checkpoint["step"], checkpoint["best_val_loss"], checkpoint["loss_log"]
    state.last_eval = state.loss_log[-1]["step"] if state.loss_log else -1
    torch.set_rng_state(checkpoint["rng"]["torch"])
    if device_type == "cuda" and checkpoint["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(checkpoint["rng"]["cuda"])
    data_states = checkpoint["rng"]["data"]  # one per rank: each rank goes on with its own batches
    if len(data_states) == world_size:
        state.data_gen.set_state(data_states[rank])
    else:
        state.data_gen.manual_seed(checkpoint["train_config"]["seed"] + rank + 1000003 * state.step)
        log(f"note: the checkpoint was saved by {len(data_states)} processes and this run has {world_size}: "
            f"every rank draws new batches, so this run will not repeat an uninterrupted one")
