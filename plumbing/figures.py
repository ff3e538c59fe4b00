"""The figures of chapters 5 to 7, drawn from the numbers each chapter's demo computes. Matplotlib only: nothing
here is about LLaMA."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def draw_llama3_weights(logits: dict[str, torch.Tensor], counts: dict[str, int], fig_dir: Path) -> Path:
    """Chapter 5's figure. Left: the logits of Hugging Face's layout against Meta's, with and without undoing the
    reordering. Right: where Llama 3.2 1B's parameters are."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig_dir.mkdir(parents=True, exist_ok=True)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    meta = logits["meta"].flatten()
    left.scatter(meta, logits["hf_as_stored"].flatten(), s=2, alpha=0.3, color="tab:red",
                 label="Hugging Face's file, wq and wk taken as stored")
    left.scatter(meta, logits["hf"].flatten(), s=2, color="tab:blue", label="Hugging Face's file, unpermute_hf")
    left.set(title="The same random weights in two layouts: logits of a tiny Llama 3",
             xlabel="logit, loaded from Meta's layout", ylabel="logit, loaded from Hugging Face's layout")
    left.legend(markerscale=6)
    total = sum(counts.values())
    bars = right.barh(list(counts), [c / 1e6 for c in counts.values()], color=["tab:green", "tab:blue", "tab:orange",
                                                                                 "tab:gray"])
    right.bar_label(bars, [f"{c / 1e6:,.1f}M ({c / total:.0%})" for c in counts.values()], padding=3)
    right.invert_yaxis()
    right.set_xlim(0, max(counts.values()) / 1e6 * 1.35)
    right.set(title=f"Llama 3.2 1B: {total:,} parameters, output tied\n({2 * total / 1e9:.2f} GB in bfloat16; "
                    f"an untied output would add {counts['embedding = output'] / 1e6:,.0f}M)",
              xlabel="parameters (millions)")
    fig.tight_layout()
    path = fig_dir / "05_llama3_weights.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def draw_lora(n_total: int, n_lora: int, losses: list[float], val_log: list[tuple[int, float]], fig_dir: Path
              ) -> Path:
    """Chapter 6's figure. Left: the memory that AdamW's parameters take in a fine-tune of Llama 3.2 1B, full
    against LoRA (16 bytes per trained parameter: float32 weight, gradient, two moments; a frozen bfloat16 weight,
    2 bytes). Right: the demo's LoRA fine-tune."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig_dir.mkdir(parents=True, exist_ok=True)
    fig, (mem_ax, loss_ax) = plt.subplots(1, 2, figsize=(13, 4.4), width_ratios=[1, 1.1])
    runs = ["full fine-tune\n(float32)", "LoRA, rank 8\n(base in bfloat16)"]
    parts = {"weights": [4 * n_total, 2 * n_total + 4 * n_lora], "gradients": [4 * n_total, 4 * n_lora],
             "AdamW moments": [8 * n_total, 8 * n_lora]}  # bytes
    left = np.zeros(len(runs))
    for (part, sizes), color in zip(parts.items(), ["tab:blue", "tab:orange", "tab:green"], strict=True):
        mem_ax.barh(runs, np.array(sizes) / 1e9, left=left, color=color, label=part)
        left += np.array(sizes) / 1e9
    mem_ax.bar_label(mem_ax.containers[-1], [f"{left[0]:.1f} GB", f"{left[1]:.1f} GB\n(LoRA's matrices, gradients\n"
                                             f"and moments: {16 * n_lora / 1e9:.2f} GB)"], padding=4)
    mem_ax.invert_yaxis()
    mem_ax.set_xlim(0, left.max() * 1.2)
    mem_ax.set(title=f"Fine-tuning Llama 3.2 1B with AdamW: memory of the parameters\n(LoRA trains "
                     f"{n_lora:,} of {n_total:,}, {n_lora / n_total:.2%})", xlabel="GB (activations not included)")
    mem_ax.legend(loc="lower right")

    loss_ax.plot(range(1, len(losses) + 1), losses, color="tab:blue", alpha=0.35, label="train loss (each step)")
    steps, val_losses = zip(*val_log, strict=True)
    loss_ax.plot(steps, val_losses, "o-", color="tab:red", label="val loss (this chapter's last 10%)")
    loss_ax.axhline(val_losses[0], color="gray", ls="--", label=f"the base: val {val_losses[0]:.2f}")
    loss_ax.set(title="The demo: a tiny LLaMA 3 trained on chapters 1-4 learns chapter 6\n"
                      "with LoRA (rank 8, the base frozen)",
                xlabel="LoRA step", ylabel="cross-entropy (nats per character)")
    loss_ax.grid(alpha=0.3)
    loss_ax.legend()
    fig.tight_layout()
    path = fig_dir / "06_lora.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def draw_serving(speeds: dict[str, dict[int, float]], errors: torch.Tensor, fig_dir: Path) -> Path:
    """Chapter 7's figure. Left: new tokens per second against batch size, in bfloat16 and int8 (speeds: dtype ->
    {batch size: tokens/s}). Right: each weight's rounding error, in steps of its row's scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig_dir.mkdir(parents=True, exist_ok=True)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    for (name, by_batch), color in zip(speeds.items(), ["tab:blue", "tab:orange"], strict=True):
        left.plot(list(by_batch), list(by_batch.values()), "o-", color=color, label=name)
    left.set_xscale("log", base=2)
    left.set_xticks(list(next(iter(speeds.values()))), [str(b) for b in next(iter(speeds.values()))])
    left.set(title="One block of Llama 3.2 1B's shape, random weights:\nnew tokens per second, all rows together",
             xlabel="batch size (prompts decoded together)", ylabel="tokens/s", ylim=(0, None))
    left.grid(alpha=0.3)
    left.legend()
    right.hist(errors.numpy(), bins=50, color="tab:green")
    right.axvline(-0.5, color="gray", ls="--")
    right.axvline(0.5, color="gray", ls="--", label="half a step: the bound")
    right.set(title=f"int8 rounding of {errors.numel():,} weights (a tiny model):\n(w - q s) / s, one scale s per row",
              xlabel="error, in steps of the row's scale", ylabel="weights")
    right.legend()
    fig.tight_layout()
    path = fig_dir / "07_batching_and_int8.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
