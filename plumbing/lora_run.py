"""Chapter 6's run machinery: what a fine-tune holds as it goes (`FineTune`), its settings (from the flags, or the
saved run's with --resume), the frozen base and the text it loads (under torchrun, each rank its shards of the
base: plumbing/sharding.py), and what it writes: adapter.pt and train_state.pt (every SAVE_INTERVAL steps, at the
end and on a signal) and metrics.json, with the whole adapter gathered from every rank. Nothing here is LoRA's
maths: the chapter hands in LoRA (add_lora, its settings and tensors)."""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from main import (
    ModelArgs,
    TrainConfig,
    Transformer,
    configure_optimizer,
    estimate_loss,
    learning_rates,
    load_checkpoint,
    model_from_checkpoint,
    train_step,
)
from plumbing.reports import write_metrics
from plumbing.runtime import Progress, gather_from_ranks, save_checkpoint, wait_for_all_ranks
from plumbing.sharding import gathered, shard_as, shard_model

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
    data_gen: torch.Generator  # this rank's stream of batches: the same state gives the same batches
    device: str
    rank: int
    world_size: int
    out_dir: Path
    base: str  # --llama-dir or --ckpt, recorded in the adapter
    trainable_params: int
    total_params: int
    step: int = 0
    losses: list[float] = field(default_factory=list)  # every step's train loss
    val_before: float = float("nan")

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.grad_accum * self.world_size * self.seq_len

    def val_loss(self) -> float:
        """The val loss on eval_iters batches, the same batches every call (and on every rank: a sharded model's
        forward pass is a collective)."""
        return estimate_loss(self.model, self.val_data, self.cfg, self.seq_len, self.bos_id, self.device,
                             nullcontext())

    def log(self, line: str) -> None:
        """Print on rank 0 only."""
        if self.rank == 0:
            print(line)


def run_settings(args: argparse.Namespace, saved: dict | None, lora_cfg: Any, cfg: TrainConfig
                 ) -> tuple[Any, TrainConfig, int | None]:
    """LoRA's settings, the training's, and --seq-len (None: the base's default): those of the flags (`lora_cfg`,
    `cfg`), or with --resume the saved run's own, of which only --max-iters may change."""
    if saved is None:
        return lora_cfg, cfg, args.seq_len
    cfg = TrainConfig(**saved["train_config"])
    cfg = replace(cfg, max_iters=args.max_iters or cfg.max_iters)
    return type(lora_cfg)(**saved["lora_config"]), cfg, saved["seq_len"]


def load_base(args: argparse.Namespace, seq_len: int | None, default_seq_len: int, device: str,
              adapt: Callable[[Transformer], object], rank: int = 0, world_size: int = 1
              ) -> tuple[Transformer, inputs.CharTokenizer | llama.Llama3Tokenizer, int]:
    """The frozen base model, `adapt` (add_lora) applied to it, and its tokenizer: Meta's Llama 3 (--llama-dir;
    seq_len None: default_seq_len) or main.py's character model (--ckpt; seq_len None: its context), in --dtype or
    its own dtype. With world_size > 1 (torchrun) the model is built on the meta device and adapted, then each rank
    keeps its shards (plumbing/sharding.py): no rank reads the whole checkpoint. Returns (model, tokenizer, seq_len).
    """
    dtype = getattr(torch, args.dtype) if args.dtype else None
    log = (lambda line: print(line, file=sys.stderr)) if rank == 0 else (lambda line: None)
    row_order = {}
    if args.llama_dir is not None:
        seq_len = seq_len or default_seq_len
        if world_size == 1:
            model, tokenizer = llama.load_llama(args.llama_dir, seq_len, dtype, device, log)
            adapt(model)
            return model, tokenizer, seq_len
        model, weights, tokenizer, meta_layout = llama.read_llama(Path(args.llama_dir), seq_len, log)
        for name, w in weights.items():  # Hugging Face's wq and wk: which of its rows is each of Meta's rows
            heads = None if meta_layout else llama.qk_heads(name, model.params)
            if heads:
                row_order[name] = llama.unpermute_hf(torch.arange(w.shape[0])[:, None], heads)[:, 0]
    else:
        checkpoint = load_checkpoint(args.ckpt)
        model_args, tokenizer = ModelArgs(**checkpoint["model_args"]), inputs.CharTokenizer.from_dict(
            checkpoint["tokenizer"])
        seq_len = seq_len or model_args.max_seq_len
        if seq_len > model_args.max_seq_len:
            raise ValueError(f"--seq-len {seq_len} is longer than the context {model_args.max_seq_len} that "
                             f"{args.ckpt} was trained with")
        if world_size == 1:
            model = model_from_checkpoint(checkpoint).to(device, dtype)
            adapt(model)
            return model, tokenizer, seq_len
        with torch.device("meta"):
            model = Transformer(model_args)
        weights = checkpoint["model"]  # a character model is small: every rank reads it whole
    adapt(model)
    shard_model(model, weights, dtype, device, row_order)
    n_params = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    log(f"sharded {n_params:,} frozen parameters over {world_size} ranks: {n_params // world_size:,} or so each")
    return model, tokenizer, seq_len


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


def restore(run: FineTune, saved: dict, load_lora: Callable[[Transformer, dict, str], None]) -> None:
    """Put the LoRA matrices (with the chapter's `load_lora`), AdamW's state, this rank's batch stream, the step,
    the losses and val_before of train_state.pt back into `run`. Each rank takes its shards of the whole tensors."""
    params = dict(run.model.named_parameters())
    load_lora(run.model, {name: shard_as(t, params.get(name)) for name, t in saved["lora"].items()},
              str(run.out_dir / "train_state.pt"))
    for optimizer, optimizer_state in zip(run.optimizers, saved["optimizer"], strict=True):
        by_index = [p for group in optimizer.param_groups for p in group["params"]]
        optimizer.load_state_dict({**optimizer_state, "state": {
            i: {key: shard_as(t, by_index[i]) for key, t in state.items()}
            for i, state in optimizer_state["state"].items()}})
    data_states = saved["data_rng"]  # one per rank: each rank goes on with its own batches
    if isinstance(data_states, torch.Tensor):  # saved by one process before runs could be sharded
        data_states = [data_states]
    if len(data_states) == run.world_size:
        run.data_gen.set_state(data_states[run.rank])
    else:
        run.data_gen.manual_seed(run.cfg.seed + run.rank + 1000003 * saved["step"])
        run.log(f"note: {len(data_states)} processes saved this run and {run.world_size} resume it: every rank "
                f"draws new batches, so the run will not repeat an uninterrupted one")
    run.step, run.losses, run.val_before = saved["step"], saved["losses"], saved["val_loss_before"]


def report_start(run: FineTune, resumed: bool) -> None:
    """The first lines of a fine-tune: what it resumed, what trains, on what text; then the val loss before
    (measured now for a new run)."""
    if resumed:
        run.log(f"resumed from {run.out_dir / 'train_state.pt'} at step {run.step}")
    lora_cfg, cfg = run.lora_cfg, run.cfg
    ranks = f" x {run.world_size} ranks" if run.world_size > 1 else ""
    run.log(f"LoRA rank {lora_cfg.rank}, alpha {lora_cfg.alpha:g} on {','.join(lora_cfg.targets)}: "
            f"{run.trainable_params:,} trainable of {run.total_params:,} parameters "
            f"({run.trainable_params / run.total_params:.3%}); base in "
            f"{str(run.model.tok_embeddings.weight.dtype).removeprefix('torch.')} on {run.device}"
            f"{ranks + ', sharded' if ranks else ''}")
    run.log(f"{len(run.train_data):,} train / {len(run.val_data):,} val tokens; {cfg.max_iters} steps of "
            f"{cfg.grad_accum * cfg.batch_size * run.world_size} windows of {run.seq_len} tokens ({cfg.grad_accum} "
            f"micro-batches of {cfg.batch_size}{ranks})")
    if not resumed:
        run.val_before = run.val_loss()
    run.log(f"val loss before fine-tuning: {run.val_before:.4f}")


def save(run: FineTune, lora: dict[str, torch.Tensor]) -> None:
    """out-dir/adapter.pt (the LoRA tensors `lora` and the settings) and train_state.pt (the same, plus what
    --resume needs), each written atomically by rank 0, with the whole of every sharded tensor. Every rank must call
    it (the gathers and the barrier are collectives); all leave it together, once the files are written."""
    lora, optimizers = gathered(lora), gathered([o.state_dict() for o in run.optimizers])
    data_states = gather_from_ranks(run.data_gen.get_state())
    if run.rank == 0:
        adapter = {"lora": lora, "lora_config": asdict(run.lora_cfg), "train_config": asdict(run.cfg),
                   "seq_len": run.seq_len, "step": run.step, "base": run.base}
        save_checkpoint(run.out_dir / "train_state.pt", {
            **adapter, "optimizer": optimizers, "data_rng": data_states, "losses": run.losses,
            "val_loss_before": run.val_before})
        save_checkpoint(run.out_dir / "adapter.pt", adapter)
    wait_for_all_ranks()  # as main.py's save_run (plumbing/checkpoint.py): no rank exits during a gather's clean-up


def finish(run: FineTune, progress: Progress, t_start: float) -> None:
    """After the last step: the val loss after against before (every rank computes it), and, from rank 0,
    out-dir/metrics.json."""
    val_after = run.val_loss()
    if run.rank != 0:
        return
    print(f"val loss after fine-tuning: {val_after:.4f} (before: {run.val_before:.4f})")
    write_metrics(run.out_dir / "metrics.json", {
        "val_loss_before": run.val_before, "val_loss_after": val_after, "train_losses": run.losses,
        "train_tokens_per_s": progress.tokens_per_s(), "trainable_params": run.trainable_params,
        "total_params": run.total_params, "iters": run.step, **asdict(run.lora_cfg), "device": run.device,
        "world_size": run.world_size, "wall_s": time.perf_counter() - t_start})
    print(f"wrote {run.out_dir / 'adapter.pt'}, {run.out_dir / 'train_state.pt'} and {run.out_dir / 'metrics.json'}")


def demo_base(chapter: Path, seq_len: int, generator: torch.Generator
              ) -> tuple[Transformer, inputs.CharTokenizer, tuple[np.ndarray, np.ndarray]]:
    """Chapter 6's demo base: a tiny LLaMA 3, every weight trained briefly (main.py's way, in miniature) on the code
    of chapters 1-4, with a character tokenizer that also covers `chapter`'s text, the new text to learn.
    Returns (model, tokenizer, (train_data, val_data) of the new text)."""
    old_text = "".join((chapter.parent / name).read_text(encoding="utf-8") for name in (
        "01_input_block.py", "02_normalization_and_rope.py", "03_attention.py",
        "04_feedforward_and_transformer_block.py"))
    new_text = chapter.read_text(encoding="utf-8")
    tokenizer = inputs.CharTokenizer.from_text(old_text + new_text)
    data = np.array(tokenizer.encode(old_text), dtype=np.int64)
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tokenizer.vocab_size,
                                  max_seq_len=seq_len))
    cfg = TrainConfig(batch_size=8, max_iters=200, warmup_iters=20)  # main.py's recipe: Muon, WSD
    optimizers = configure_optimizer(model, cfg, "cpu")
    for step in range(cfg.max_iters):
        batch = inputs.get_batch(data, cfg.batch_size, seq_len, tokenizer.bos_id, generator, "cpu")
        train_step(model, optimizers, [batch], list(learning_rates(step, optimizers, cfg).values()), cfg.grad_clip,
                   nullcontext())
    print(f"base: a tiny LLaMA 3 (dim 64, 2 layers, {sum(p.numel() for p in model.parameters()):,} parameters) "
          f"trained {cfg.max_iters} steps on chapters 1-4 ({len(data):,} characters); new text: this chapter")
    return model, tokenizer, inputs.train_val_split(np.array(tokenizer.encode(new_text), dtype=np.int64))
