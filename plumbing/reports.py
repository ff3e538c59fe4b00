"""What a run tells people: its first lines, and what it leaves behind: loss.csv, loss.png, metrics.json and the
attention figure. Nothing about LLaMA: the numbers come from main.py."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch


def write_loss_log(log: list[dict], train_losses: list[float], lr_at: Callable[[int], dict[str, float]],
                   out_dir: Path) -> None:
    """out_dir/loss.csv (pandas): train and val loss at each evaluation. out_dir/loss.png (matplotlib): those, every
    step's loss on its batch, and each optimizer's learning rate at every step.

    Args:
        log: one dict per evaluation: step, tokens, lr (AdamW's), train_loss, val_loss.
        train_losses: the loss of every step's batch, from step 0.
        lr_at: step -> {optimizer name: learning rate}.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    df = pd.DataFrame(log)
    df.to_csv(out_dir / "loss.csv", index=False)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(np.arange(len(train_losses)), train_losses, color="tab:blue", alpha=0.3, lw=0.8,
            label="train, each step's batch")
    ax.plot(df["step"], df["train_loss"], marker="o", ms=3, color="tab:blue", label="train (evaluation)")
    ax.plot(df["step"], df["val_loss"], marker="o", ms=3, color="tab:orange", label="val (evaluation)")
    ax.set(title="LLaMA 3 on Tiny Shakespeare", xlabel="step", ylabel="cross-entropy loss (nats per character)")
    ax.grid(alpha=0.3)
    tokens_per_step = df["tokens"].iloc[-1] / max(1, df["step"].iloc[-1])
    top = ax.secondary_xaxis("top", functions=(lambda s: s * tokens_per_step / 1e6,
                                               lambda t: t * 1e6 / tokens_per_step))
    top.set_xlabel("tokens seen (millions)")
    lr_ax = ax.twinx()
    steps = np.arange(df["step"].iloc[-1] + 1)
    rates = [lr_at(s) for s in steps]
    for name, style in zip(rates[0], ["--", ":"], strict=False):
        lr_ax.plot(steps, [r[name] for r in rates], color="gray", ls=style, label=f"learning rate ({name})")
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_ylim(bottom=0)
    handles = ax.get_legend_handles_labels()[0] + lr_ax.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="upper right")  # one box: losses and learning rates
    fig.tight_layout()
    fig.savefig(out_dir / "loss.png", dpi=90)
    plt.close(fig)


def report_start(run, compiled: bool) -> None:
    """The first lines of a training run, on rank 0: the device, the model's and the data's sizes, and the global
    batch. run: main.Run."""
    cfg = run.cfg
    run.log(f"device {run.device} ({run.dtype}{', compiled' if compiled else ''}), "
            f"{sum(p.numel() for p in run.raw_model.parameters()):,} parameters, "
            f"{len(run.train_data):,} train / {len(run.val_data):,} val tokens")
    run.log(f"global batch {cfg.batch_size} x {cfg.grad_accum} accum x {run.world_size} ranks = "
            f"{run.tokens_per_step:,} tokens per step; {cfg.max_iters} steps")


def report_run(run, final_val: float, sample: str, args, tokens_per_s: float, t_start: float,
               lr_at: Callable[[int], dict[str, float]]) -> None:
    """The end of a training run on rank 0: loss.csv and loss.png, the final figures and the sample on stdout,
    then metrics.json. run: main.Run; args: main.py's flags (the sample's prompt and settings)."""
    write_loss_log(run.state.loss_log, run.state.train_losses, lr_at, run.out_dir)
    print(f"final val loss (whole val split) {final_val:.4f}; {tokens_per_s:,.0f} train tokens/s")
    print(f"wrote {run.out_dir / 'ckpt.pt'}, {run.out_dir / 'loss.csv'}, {run.out_dir / 'loss.png'}")
    print(f"\n--- sample (temperature {args.temperature}, top-p {args.top_p}) ---\n{args.prompt}{sample}")
    metrics = {"final_val_loss": final_val, "final_train_loss": run.state.loss_log[-1]["train_loss"],
               "train_losses": run.state.train_losses,
               "train_tokens_per_s": tokens_per_s, "wall_s": time.perf_counter() - t_start,
               "params": sum(p.numel() for p in run.raw_model.parameters()), "iters": run.state.step,
               "device": run.device, "dtype": run.dtype}
    if run.device_type == "cuda":
        metrics["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    write_metrics(run.out_dir / "metrics.json", metrics)


def write_metrics(path: Path, metrics: dict) -> None:
    """metrics.json: the figures of a finished run, for scripts and benchmarks."""
    path.write_text(json.dumps(metrics, indent=2) + "\n")


def draw_attention(weights: torch.Tensor, labels: list[str], n_rep: int, text: str, path: Path) -> None:
    """A grid of heatmaps, one per head: weights (n_heads, seqlen, seqlen), labels one per position."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_heads, seqlen = weights.shape[0], weights.shape[1]
    ncols = min(n_heads, 2)  # a 2-column grid keeps one label per character legible
    nrows = -(-n_heads // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.5 * ncols, 6.5 * nrows + 0.6), layout="constrained",
                             squeeze=False)
    for head, ax in enumerate(axes.flat):
        if head >= n_heads:
            ax.axis("off")
            continue
        ax.imshow(weights[head].numpy(), cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(seqlen), labels, fontsize=6.5, family="monospace")
        ax.set_yticks(range(seqlen), labels, fontsize=6.5, family="monospace")
        ax.tick_params(length=0)
        ax.set(title=f"head {head} (KV head {head // n_rep})", xlabel="key: the character attended to",
               ylabel="query: the current character")
    fig.suptitle(f"Trained model, last layer: causal attention over {text!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
