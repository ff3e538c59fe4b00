"""Chapter 6's run machinery: what a fine-tune holds as it goes (`FineTune`), its settings (from the flags, or the
saved run's with --resume), the frozen base and the text it loads, and what it writes: adapter.pt and
train_state.pt (every SAVE_INTERVAL steps, at the end and on a signal) and metrics.json. Nothing here is LoRA's
maths: the chapter hands in its LoRA settings and tensors."""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from main import TrainConfig, Transformer, estimate_loss, load_checkpoint, model_from_checkpoint
from plumbing.reports import write_metrics
from plumbing.runtime import Progress, save_checkpoint

inputs = importlib.import_module("01_input_block")
llama = importlib.import_module("05_llama3_tokenizer_and_weights")

SAVE_INTERVAL = 50  # steps between saves of the adapter during a fine-tune (a crash loses at most these)


@dataclass
class FineTune:
    """One LoRA fine-tune: its settings, data, model and optimizer, and what changes as it goes. With the LoRA
    matrices and AdamW's state, step, losses, the batch stream and val_before are all that --resume needs."""

    lora_cfg: Any  # chapter 6's LoRAConfig: rank, alpha, targets
    cfg: TrainConfig
    seq_len: int
    model: Transformer
    bos_id: int
    train_data: np.ndarray
    val_data: np.ndarray
    optimizers: list[torch.optim.Optimizer]
    data_gen: torch.Generator  # the stream of batches: the same state gives the same batches
    device: str
    out_dir: Path
    base: str  # --llama-dir or --ckpt, recorded in the adapter
    trainable_params: int
    total_params: int
    step: int = 0
    losses: list[float] = field(default_factory=list)  # every step's train loss
    val_before: float = float("nan")

    def val_loss(self) -> float:
        """The val loss on eval_iters batches, the same batches every call."""
        return estimate_loss(self.model, self.val_data, self.cfg, self.seq_len, self.bos_id, self.device,
                             nullcontext())


def run_settings(args: argparse.Namespace, saved: dict | None, lora_cfg: Any, cfg: TrainConfig
                 ) -> tuple[Any, TrainConfig, int | None]:
    """LoRA's settings, the training's, and --seq-len (None: the base's default): those of the flags (`lora_cfg`,
    `cfg`), or with --resume the saved run's own, of which only --max-iters may change."""
    if saved is None:
        return lora_cfg, cfg, args.seq_len
    cfg = TrainConfig(**saved["train_config"])
    cfg = replace(cfg, max_iters=args.max_iters or cfg.max_iters)
    return type(lora_cfg)(**saved["lora_config"]), cfg, saved["seq_len"]


def load_base(args: argparse.Namespace, seq_len: int | None, default_seq_len: int, device: str
              ) -> tuple[Transformer, inputs.CharTokenizer | llama.Llama3Tokenizer, int]:
    """The frozen base model and its tokenizer: Meta's Llama 3 (--llama-dir; seq_len None: default_seq_len) or
    main.py's character model (--ckpt; seq_len None: its context), in --dtype or its own dtype.
    Returns (model, tokenizer, seq_len)."""
    dtype = getattr(torch, args.dtype) if args.dtype else None
    if args.llama_dir is not None:
        seq_len = seq_len or default_seq_len
        model, tokenizer = llama.load_llama(args.llama_dir, seq_len, dtype, device,
                                            log=lambda line: print(line, file=sys.stderr))
        return model, tokenizer, seq_len
    checkpoint = load_checkpoint(args.ckpt)
    model = model_from_checkpoint(checkpoint).to(device, dtype)
    seq_len = seq_len or model.params.max_seq_len
    if seq_len > model.params.max_seq_len:
        raise ValueError(f"--seq-len {seq_len} is longer than the context {model.params.max_seq_len} that "
                         f"{args.ckpt} was trained with")
    return model, inputs.CharTokenizer.from_dict(checkpoint["tokenizer"]), seq_len


def load_data(path: str | None, tokenizer: inputs.CharTokenizer | llama.Llama3Tokenizer, seq_len: int
              ) -> tuple[np.ndarray, np.ndarray]:
    """--data as the base tokenizer's ids, split 90/10. Returns (train_data, val_data)."""
    text = inputs.load_text(path)
    try:
        data = np.array(tokenizer.encode(text), dtype=np.int64)
    except ValueError as e:  # a character model meets a character it never saw
        raise ValueError(f"--data {path}: {e}") from e
    train_data, val_data = inputs.train_val_split(data)
    if min(len(train_data), len(val_data)) < seq_len:
        raise ValueError(f"--data has {len(data):,} tokens: too short for --seq-len {seq_len} (its first 90% and "
                         f"its last 10% must each hold one window); give a longer text or a smaller --seq-len")
    return train_data, val_data


def restore(run: FineTune, saved: dict) -> None:
    """Put AdamW's state, the batch stream, the step, the losses and val_before of train_state.pt back into `run`
    (the chapter loads the LoRA matrices)."""
    for optimizer, optimizer_state in zip(run.optimizers, saved["optimizer"], strict=True):
        optimizer.load_state_dict(optimizer_state)
    run.data_gen.set_state(saved["data_rng"])
    run.step, run.losses, run.val_before = saved["step"], saved["losses"], saved["val_loss_before"]


def report_start(run: FineTune, resumed_from: Path | None) -> None:
    """The first lines of a fine-tune: what it resumed, what trains, on what text; then the val loss before
    (measured now for a new run)."""
    if resumed_from is not None:
        print(f"resumed from {resumed_from} at step {run.step}")
    lora_cfg, cfg = run.lora_cfg, run.cfg
    print(f"LoRA rank {lora_cfg.rank}, alpha {lora_cfg.alpha:g} on {','.join(lora_cfg.targets)}: "
          f"{run.trainable_params:,} trainable of {run.total_params:,} parameters "
          f"({run.trainable_params / run.total_params:.3%}); base in "
          f"{str(run.model.tok_embeddings.weight.dtype).removeprefix('torch.')} on {run.device}")
    print(f"{len(run.train_data):,} train / {len(run.val_data):,} val tokens; {cfg.max_iters} steps of "
          f"{cfg.grad_accum * cfg.batch_size} windows of {run.seq_len} tokens ({cfg.grad_accum} micro-batches of "
          f"{cfg.batch_size})")
    if resumed_from is None:
        run.val_before = run.val_loss()
    print(f"val loss before fine-tuning: {run.val_before:.4f}")


def save(run: FineTune, lora: dict[str, torch.Tensor]) -> None:
    """out-dir/adapter.pt (the LoRA tensors `lora` and the settings) and train_state.pt (the same, plus what
    --resume needs), each written atomically."""
    adapter = {"lora": lora, "lora_config": asdict(run.lora_cfg), "train_config": asdict(run.cfg),
               "seq_len": run.seq_len, "step": run.step, "base": run.base}
    save_checkpoint(run.out_dir / "train_state.pt", {
        **adapter, "optimizer": [o.state_dict() for o in run.optimizers], "data_rng": run.data_gen.get_state(),
        "losses": run.losses, "val_loss_before": run.val_before})
    save_checkpoint(run.out_dir / "adapter.pt", adapter)


def finish(run: FineTune, progress: Progress, t_start: float) -> None:
    """After the last step: the val loss after against before, and out-dir/metrics.json."""
    val_after = run.val_loss()
    print(f"val loss after fine-tuning: {val_after:.4f} (before: {run.val_before:.4f})")
    write_metrics(run.out_dir / "metrics.json", {
        "val_loss_before": run.val_before, "val_loss_after": val_after, "train_losses": run.losses,
        "train_tokens_per_s": progress.tokens_per_s(), "trainable_params": run.trainable_params,
        "total_params": run.total_params, "iters": run.step, **asdict(run.lora_cfg), "device": run.device,
        "wall_s": time.perf_counter() - t_start})
    print(f"wrote {run.out_dir / 'adapter.pt'}, {run.out_dir / 'train_state.pt'} and {run.out_dir / 'metrics.json'}")
