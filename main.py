"""LLaMA 3 from scratch: assemble the chapters, train on Tiny Shakespeare, and sample.

    tokens (bsz, seqlen)
      -> tok_embeddings                         (bsz, seqlen, dim)
      -> n_layers x TransformerBlock            (chapter 4, using chapters 2 and 3)
      -> norm (RMSNorm) -> output (Linear)      (bsz, seqlen, vocab_size) logits

Training minimizes the cross-entropy of the next character with AdamW, or with Muon
for the matrices inside the blocks (see `configure_optimizer`), after a linear warmup
of the learning rate, then a cosine decay or WSD (flat, then a linear decay: `get_lr`).
Generation runs the prompt through
the model once (filling the KV cache), then feeds one token at a time, sampling
with temperature and top-p (nucleus) sampling.

Run:   python main.py                      # train the default CPU model, then sample
       python main.py --sample --prompt "ROMEO:"
       python main.py --help               # every flag
Importing this module runs nothing.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from plumbing import cli
from plumbing.runtime import (
    Progress,
    Stopped,
    StopSignals,
    all_ranks_max,
    collective_errors,
    gather_from_ranks,
    lock_out_dir,
    pick_device,
    save_checkpoint,
    setup_distributed,
    teardown_distributed,
    wait_for_all_ranks,
)

inputs = importlib.import_module("01_input_block")
rope = importlib.import_module("02_normalization_and_rope")
attention = importlib.import_module("03_attention")
blocks = importlib.import_module("04_feedforward_and_transformer_block")


# ----------------------------------------------------------------------------- model


@dataclass
class ModelArgs:
    """The architecture, with Meta's field names. Llama 3 8B is dim=4096, n_layers=32, n_heads=32,
    n_kv_heads=8, vocab_size=128256, multiple_of=1024, ffn_dim_multiplier=1.3, rope_theta=500000."""

    dim: int = 64
    n_layers: int = 4
    n_heads: int = 2
    n_kv_heads: int | None = 1
    vocab_size: int = -1  # set from the tokenizer
    multiple_of: int = 32
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    max_batch_size: int = 32
    max_seq_len: int = 128
    dropout: float = 0.0  # not in Meta's model; helps the larger GPU preset
    use_scaled_rope: bool = False  # Llama 3.1's RoPE frequency scaling (chapter 2)
    rope_scaling_factor: float = 8.0  # 8 for Llama 3.1, 32 for Llama 3.2 1B and 3B


class Transformer(nn.Module):
    """The LLaMA 3 decoder: Meta's `Transformer`, with the same layers, maths and state-dict keys.

    The weight initialization is ours, not Meta's: their reference code defines none, because it only
    ever loads trained weights. We train from scratch, so we use GPT-2's (below), which works well at this size.
    """

    def __init__(self, params: ModelArgs):
        super().__init__()
        self.params = params
        self.tok_embeddings = nn.Embedding(params.vocab_size, params.dim)
        self.layers = nn.ModuleList(
            blocks.TransformerBlock(
                i, params.dim, params.n_heads, params.n_kv_heads, params.multiple_of, params.ffn_dim_multiplier,
                params.norm_eps, params.max_batch_size, params.max_seq_len, params.dropout,
            )
            for i in range(params.n_layers)
        )
        self.norm = rope.RMSNorm(params.dim, eps=params.norm_eps)
        self.output = nn.Linear(params.dim, params.vocab_size, bias=False)
        # Computed once, and a plain attribute as in Meta's code, not a buffer: `model.to(torch.bfloat16)`
        # would cast a buffer's complex rotations to real numbers, and RoPE would scale instead of rotate.
        # Built on the CPU also when the weights are built on the meta device (chapter 5); forward moves it.
        with torch.device("cpu"):
            self.freqs_cis = rope.precompute_freqs_cis(params.dim // params.n_heads, params.max_seq_len,
                                                       params.rope_theta, params.use_scaled_rope,
                                                       params.rope_scaling_factor)

        self.apply(self._init_weights)
        # GPT-2's scaled init: the projections that write into the residual stream get a smaller
        # std, so the stream's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * params.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(
        self, tokens: torch.Tensor, targets: torch.Tensor | None = None, start_pos: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """
        Args:
            tokens: (bsz, seqlen) int64.
            targets: (bsz, seqlen) next tokens, or None.
            start_pos: None for training and evaluation (no KV cache). In generation, the position
                of tokens[:, 0]: 0 for the prompt, then the running position (reads and fills the cache).
        Returns:
            logits (bsz, seqlen, vocab_size) in float32, and the mean cross-entropy (None without targets).
        """
        seqlen = tokens.shape[1]
        pos = 0 if start_pos is None else start_pos
        if pos + seqlen > self.params.max_seq_len:
            raise ValueError(f"positions {pos}..{pos + seqlen - 1} exceed max_seq_len {self.params.max_seq_len}")
        self.freqs_cis = self.freqs_cis.to(tokens.device)  # a no-op once it is there
        freqs_cis = self.freqs_cis[pos : pos + seqlen]  # (seqlen, head_dim // 2)
        h = self.tok_embeddings(tokens)  # (bsz, seqlen, dim)
        for layer in self.layers:
            h = layer(h, freqs_cis, start_pos)
        logits = self.output(self.norm(h)).float()  # (bsz, seqlen, vocab_size)
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss


# ----------------------------------------------------------------------------- training


@dataclass
class TrainConfig:
    batch_size: int = 32
    max_iters: int = 1000
    learning_rate: float = 8e-3
    min_lr: float = 8e-5
    warmup_iters: int = 50
    lr_decay_iters: int | None = None  # None: decay until max_iters
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    grad_accum: int = 1
    eval_interval: int = 250
    eval_iters: int = 10
    seed: int = 1337
    optimizer: str = "adamw"  # "adamw", or "muon": Muon for the blocks' matrices, AdamW for the rest
    muon_lr: float = 0.02  # Muon's peak learning rate; learning_rate is AdamW's
    schedule: str = "cosine"  # "cosine", or "wsd": warmup, stable (flat), then a linear decay
    cooldown_frac: float = 0.4  # wsd: the share of lr_decay_iters spent decaying


# `--preset cpu` (the default) learns in about three minutes on a 2-core laptop CPU: the dataclass defaults
# (1,000 steps of 32 x 128 characters) with Muon and WSD, which beat AdamW and the cosine (the README lists
# the runs behind these numbers).
# `--preset gpu` is sized like nanoGPT's 10.7M-parameter Shakespeare model. It learns faster than
# nanoGPT's GPT and overfits sooner: on an H100, 5000 steps at dropout 0.2 ended at val 1.89 (best 1.47
# at step 1250); 2500 steps at dropout 0.3 end at 1.48.
PRESETS: dict[str, tuple[ModelArgs, TrainConfig]] = {
    "cpu": (
        ModelArgs(),
        TrainConfig(eval_iters=5, optimizer="muon", muon_lr=0.015, schedule="wsd", cooldown_frac=0.6),
    ),
    "gpu": (
        ModelArgs(dim=384, n_layers=6, n_heads=6, n_kv_heads=6, max_seq_len=256, max_batch_size=64, dropout=0.3),
        TrainConfig(batch_size=64, max_iters=2500, learning_rate=1e-3, min_lr=1e-4, warmup_iters=100,
                    beta2=0.99, eval_interval=250, eval_iters=50),
    ),
}


def get_lr(step: int, cfg: TrainConfig, peak_lr: float | None = None) -> float:
    """The learning rate at `step`: a linear warmup to the peak, then the decay that cfg.schedule names.

    cosine: a cosine from the peak down to the floor at lr_decay_iters.
    wsd (warmup, stable, decay): flat at the peak, then a straight line down to the floor over the last
        cooldown_frac of lr_decay_iters. The high flat stretch explores; the short decay settles into a minimum.
    Both stay at the floor after lr_decay_iters.

    Args:
        peak_lr: the optimizer's peak; default cfg.learning_rate (AdamW's). The floor is min_lr scaled by
            peak_lr / learning_rate, so Muon and AdamW follow the same shape from their own peaks.
    """
    peak = cfg.learning_rate if peak_lr is None else peak_lr
    floor = cfg.min_lr * peak / cfg.learning_rate
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if step < cfg.warmup_iters:
        return peak * (step + 1) / cfg.warmup_iters
    if step >= decay_iters:
        return floor
    if cfg.schedule == "wsd":
        cooldown_start = max(cfg.warmup_iters, decay_iters - cfg.cooldown_frac * decay_iters)
        progress = max(0.0, step - cooldown_start) / (decay_iters - cooldown_start)
        return peak - progress * (peak - floor)
    progress = (step - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak - floor)


def newton_schulz(g: torch.Tensor, dtype: torch.dtype, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Orthogonalize each matrix of the stack g approximately: for g = U S V^T, about U V^T (singular
    values pushed towards 1).

    Each step maps x to a x + b (x x^T) x + c (x x^T)^2 x, an odd polynomial of the singular values;
    Keller Jordan tuned (a, b, c) to pull small ones up fast (they end between about 0.7 and 1.2).

    Args:
        g: (n_matrices, rows, cols)
    Returns:
        (n_matrices, rows, cols), in `dtype`.
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.to(dtype)
    tall = g.size(1) > g.size(2)
    if tall:
        x = x.mT  # iterate on the wide form: x x^T is then the smaller Gram matrix
    x = x / x.norm(dim=(1, 2), keepdim=True).clamp(min=eps)  # Frobenius norm 1: every singular value <= 1
    for _ in range(steps):
        gram = x @ x.mT  # (n_matrices, rows, rows)
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


class Muon(torch.optim.Optimizer):
    """Muon, computed as torch.optim.Muon computes it (Nesterov momentum, 5 Newton-Schulz steps, updates
    scaled by sqrt(max(1, rows / cols)), decoupled weight decay), except that the Newton-Schulz products
    run in `ns_dtype`. torch.optim.Muon always uses bfloat16: fast on a GPU, but emulated by a CPU without
    bf16 instructions, where one Muon step of the default model took 122 ms in bfloat16 against 16 ms in
    float32, one matrix at a time (a forward and backward pass of the batch: 330 ms).
    """

    def __init__(self, params, lr: float, weight_decay: float, momentum: float = 0.95,
                 ns_dtype: torch.dtype = torch.bfloat16):
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "momentum": momentum})
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
            # Matrices of one shape are orthogonalized together, as one stack: a few larger matrix products
            # instead of many tiny ones (the default model's 28 matrices come in 4 shapes).
            by_shape: dict[torch.Size, list[nn.Parameter]] = {}
            for p in group["params"]:
                if p.grad is not None:
                    by_shape.setdefault(p.shape, []).append(p)
            for (rows, cols), params in by_shape.items():
                nesterov = []
                for p in params:
                    state = self.state[p]
                    if not state:
                        state["momentum_buffer"] = torch.zeros_like(p)
                    buf = state["momentum_buffer"]
                    buf.lerp_(p.grad, 1 - momentum)  # the running mean of gradients
                    nesterov.append(p.grad.lerp(buf, momentum))  # Nesterov: a step ahead
                updates = newton_schulz(torch.stack(nesterov), self.ns_dtype)
                for p, update in zip(params, updates, strict=True):
                    p.mul_(1 - lr * weight_decay)
                    p.add_(update, alpha=-lr * math.sqrt(max(1, rows / cols)))


def is_muon_param(name: str, p: nn.Parameter) -> bool:
    """Muon's share of the model: the 2-D matrices inside the blocks (wq, wk, wv, wo, w1, w2, w3)."""
    return name.startswith("layers.") and p.dim() == 2


def configure_optimizer(model: nn.Module, cfg: TrainConfig, device_type: str) -> list[torch.optim.Optimizer]:
    """The optimizers that together update every parameter, AdamW first.

    adamw: AdamW for everything; weight decay on matrices (embeddings, linear layers), not on norm gains.
    muon: Muon for the blocks' matrices, AdamW for the embeddings, the output layer and the norm gains.

    Muon (MomentUm Orthogonalized by Newton-Schulz) keeps SGD's momentum, then orthogonalizes each
    matrix's update: a few Newton-Schulz iterations, cheap matrix products, push the update's singular
    values towards 1. A plain gradient step is dominated by a few large directions; the orthogonalized
    one moves every direction of the matrix by the same amount, so rarely used directions learn too.
    That reasoning is about a matrix mapping one hidden vector to another. The embedding and output
    layers are lookups and classifiers over the vocabulary (a row per character, updated only when it
    occurs), and norm gains are vectors, so those stay on AdamW.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    muon = [p for n, p in named if cfg.optimizer == "muon" and is_muon_param(n, p)]
    rest = [p for n, p in named if not (cfg.optimizer == "muon" and is_muon_param(n, p))]
    groups = [
        {"params": [p for p in rest if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
    ]
    # The fused kernel updates all parameters in one pass; it runs on CPU and CUDA.
    optimizers: list[torch.optim.Optimizer] = [
        torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                          fused=device_type in ("cpu", "cuda"))]
    if muon:
        # Updates are scaled as in Keller Jordan's Muon ("original" in torch.optim.Muon): by
        # sqrt(max(1, rows / cols)), so a tall w1 moves as much per output as a square wq. muon_lr is tuned
        # on its own, not tied to AdamW's (the README lists the runs).
        ns_dtype = torch.float32 if device_type == "cpu" else torch.bfloat16
        optimizers.append(Muon(muon, lr=cfg.muon_lr, weight_decay=cfg.weight_decay, ns_dtype=ns_dtype))
    return optimizers


def peak_lr(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> float:
    """The optimizer's peak learning rate: muon_lr for Muon, learning_rate for AdamW."""
    return cfg.muon_lr if isinstance(optimizer, Muon) else cfg.learning_rate


def train_step(model: nn.Module, optimizers: list[torch.optim.Optimizer],
               batches: list[tuple[torch.Tensor, torch.Tensor]], lrs: list[float], grad_clip: float, autocast) -> float:
    """One optimizer step over `batches` (gradient accumulation: the same update as one batch
    of all of them together). Under DDP, gradients are averaged across ranks on the last one only.

    Args:
        optimizers, lrs: each optimizer and its learning rate for this step.
    Returns:
        the mean loss over the batches.
    """
    for optimizer, lr in zip(optimizers, lrs, strict=True):
        for group in optimizer.param_groups:
            group["lr"] = lr
    total = 0.0
    for i, (x, y) in enumerate(batches):
        last = i == len(batches) - 1
        with (model.no_sync() if isinstance(model, DDP) and not last else nullcontext()):
            with autocast:
                _, loss = model(x, y)
            (loss / len(batches)).backward()
        total = total + loss.detach().float() / len(batches)  # stays on the device: no sync per micro-batch
    if grad_clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    for optimizer in optimizers:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return total.item()  # the one sync per step


@torch.no_grad()
def estimate_loss(model: nn.Module, data: np.ndarray, cfg: TrainConfig, seq_len: int, bos_id: int, device: str,
                  autocast) -> float:
    """Mean loss over eval_iters random batches; the same batches every call (a fixed seed)."""
    model.eval()
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    losses = []
    for _ in range(cfg.eval_iters):
        x, y = inputs.get_batch(data, cfg.batch_size, seq_len, bos_id, generator, device)
        with autocast:
            losses.append(model(x, y)[1].item())
    model.train()
    return float(np.mean(losses))


@torch.no_grad()
def evaluate_split(model: nn.Module, data: np.ndarray, seq_len: int, bos_id: int, batch_size: int, device: str,
                   autocast) -> float:
    """Mean next-token loss over a whole split, cut into windows of seq_len targets that each open
    with BOS (as in training): every token of the split is predicted once, except a last partial window."""
    model.eval()
    n = len(data) // seq_len
    y_all = torch.from_numpy(data[: n * seq_len]).view(n, seq_len)  # (n, seq_len) targets
    x_all = inputs.inputs_for(y_all, bos_id)
    total = 0.0
    for i in range(0, n, batch_size):
        x, y = x_all[i : i + batch_size].to(device), y_all[i : i + batch_size].to(device)
        with autocast:
            total += model(x, y)[1].item() * len(x)
    model.train()
    return total / n


# ----------------------------------------------------------------------------- checkpoints and logs


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint holding tensors and plain data only (weights_only=True: never runs pickled code).

    Raises:
        FileNotFoundError: no file at path.
        ValueError: the file is not a checkpoint of this program (truncated, foreign, or unsafe).
    """
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: train first (python main.py --out-dir {path.parent})")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad file; all mean the same here
        raise ValueError(f"{path} is not a readable checkpoint ({type(e).__name__}): "
                         f"delete it and train again") from e
    required = {"model", "model_args", "tokenizer", "step"}
    if not isinstance(checkpoint, dict) or required - checkpoint.keys():
        raise ValueError(f"{path} is not a checkpoint of main.py (it needs the keys {sorted(required)})")
    try:  # the weights must fit the model settings stored beside them
        model_from_checkpoint(checkpoint)
    except (TypeError, RuntimeError) as e:
        raise ValueError(f"{path} is not a checkpoint of main.py ({type(e).__name__}: {e}); "
                         f"delete it and train again") from e
    return checkpoint


def model_from_checkpoint(checkpoint: dict) -> Transformer:
    """The Transformer that a checkpoint's `model_args` describe, with its weights loaded (strictly)."""
    model = Transformer(ModelArgs(**checkpoint["model_args"]))
    model.load_state_dict(checkpoint["model"])
    return model


def write_loss_log(log: list[dict], cfg: TrainConfig, out_dir: Path) -> None:
    """out/loss.csv (pandas) and out/loss.png (matplotlib): the losses at each evaluation, and the learning
    rate (AdamW's; Muon's has the same shape) at every step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    df = pd.DataFrame(log)
    df.to_csv(out_dir / "loss.csv", index=False)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(df["step"], df["train_loss"], marker="o", ms=3, label="train")
    ax.plot(df["step"], df["val_loss"], marker="o", ms=3, label="val")
    ax.set(title="LLaMA 3 on Tiny Shakespeare", xlabel="step", ylabel="cross-entropy loss (nats per character)")
    ax.grid(alpha=0.3)
    tokens_per_step = df["tokens"].iloc[-1] / max(1, df["step"].iloc[-1])
    top = ax.secondary_xaxis("top", functions=(lambda s: s * tokens_per_step / 1e6,
                                               lambda t: t * 1e6 / tokens_per_step))
    top.set_xlabel("tokens seen (millions)")
    lr_ax = ax.twinx()
    steps = np.arange(df["step"].iloc[-1] + 1)
    lr_ax.plot(steps, [get_lr(s, cfg) for s in steps], color="gray", ls="--", label="learning rate")
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_ylim(bottom=0)
    handles = ax.get_legend_handles_labels()[0] + lr_ax.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="upper right")  # one box: losses and learning rate
    fig.tight_layout()
    fig.savefig(out_dir / "loss.png", dpi=90)
    plt.close(fig)


# ----------------------------------------------------------------------------- generation


def sample_top_p(probs: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Nucleus sampling (Meta's `sample_top_p`): keep the most likely tokens, in order, until their total
    probability exceeds p, and sample among them. A token is dropped only when the tokens before it already
    hold more than p, so the token that crosses p is kept and the set is never empty.

    Args:
        probs: (bsz, vocab_size), rows sum to 1.
    Returns:
        (bsz, 1) token ids.
    """
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    mask = probs_sum - probs_sort > p  # the mass before this token already reaches p
    probs_sort[mask] = 0.0
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    next_token = torch.multinomial(probs_sort, num_samples=1, generator=generator)
    return torch.gather(probs_idx, -1, next_token)


def generate(model: Transformer, tokenizer, prompt: str, max_new_tokens: int, temperature: float = 0.8,
             top_p: float = 0.9, generator: torch.Generator | None = None) -> str:
    """Continue `prompt` by up to max_new_tokens characters and return only the new text.
    The context opens with <|begin_of_text|>, like every training window. Stops early at <|end_of_text|>.

    Raises:
        ValueError: bad arguments, or prompt characters outside the vocabulary.
    """
    tokens = tokenizer.encode(prompt, bos=True)
    new_tokens = generate_tokens(model, tokens, max_new_tokens, {tokenizer.eos_id}, temperature, top_p, generator)
    return tokenizer.decode(list(new_tokens))


@torch.no_grad()
def generate_tokens(model: Transformer, tokens: list[int], max_new_tokens: int, stop_ids: set[int],
                    temperature: float = 0.8, top_p: float = 0.9,
                    generator: torch.Generator | None = None) -> Iterator[int]:
    """Sample up to max_new_tokens tokens after `tokens`, yielding each one as soon as it is chosen.

    `tokens` opens with <|begin_of_text|>, as every training window does. The prompt runs through the
    model once (start_pos=0), then one token at a time through the KV cache. When the cache is full
    the window slides: BOS and the newest half of the context become a new prompt. Stops early at a
    token in stop_ids (not yielded). temperature 0 is greedy (argmax).

    Raises:
        ValueError: bad arguments.
    """
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    if not (0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    max_seq_len = model.params.max_seq_len
    if len(tokens) > max_seq_len:  # keep BOS and the end of the prompt
        print(f"note: the prompt is longer than the context; keeping its last {max_seq_len - 1} tokens",
              file=sys.stderr)
        tokens = [tokens[0], *tokens[-(max_seq_len - 1) :]]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    new_tokens: list[int] = []
    context = tokens
    try:
        while len(new_tokens) < max_new_tokens:
            if context is not None:  # (re)fill the cache with the whole context
                logits, _ = model(torch.tensor([context], device=device), start_pos=0)
                pos, context = len(context), None
            logits = logits[:, -1]  # (1, vocab_size)
            if temperature == 0:
                next_token = torch.argmax(logits, dim=-1, keepdim=True)
            else:
                probs = torch.softmax(logits / temperature, dim=-1)
                next_token = sample_top_p(probs.cpu(), top_p, generator).to(device)
            token = next_token.item()
            if token in stop_ids:
                break
            new_tokens.append(token)
            yield token
            if len(new_tokens) == max_new_tokens:
                break  # no forward pass whose logits nobody would read
            if pos == max_seq_len:  # cache full: slide the window
                context = [tokens[0], *(tokens[1:] + new_tokens)[-(max_seq_len // 2) :]]
            else:
                logits, _ = model(next_token.view(1, 1), start_pos=pos)
                pos += 1
    finally:
        model.train(was_training)


def plot_attention(model: Transformer, tokenizer, text: str, path: Path) -> None:
    """The trained model's causal attention weights over `text`, for every head of the last layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = torch.tensor([tokenizer.encode(text, bos=True)[: model.params.max_seq_len]])  # as in training
    seqlen = tokens.shape[1]
    model.eval()
    last = model.layers[-1]
    with torch.no_grad():
        freqs_cis = model.freqs_cis[:seqlen].to(tokens.device)
        h = model.tok_embeddings(tokens)
        for layer in model.layers[:-1]:
            h = layer(h, freqs_cis)  # the last layer's input
        weights = attention.attention_weights(last.attention, last.attention_norm(h), freqs_cis)[0]
    n_heads, n_rep = weights.shape[0], last.attention.n_rep
    labels = ["BOS", *(inputs.VISIBLE.get(c, c) for c in tokenizer.decode(tokens[0, 1:].tolist()))]
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


# ----------------------------------------------------------------------------- command line

DEFAULT_PROMPT = "ROMEO:"
ATTENTION_LINE = "ROMEO:\nBut soft, what light through yonder window breaks?"


def build_parser() -> argparse.ArgumentParser:
    """Every flag of main.py (written out in plumbing/cli.py), with each preset's defaults in --help."""
    return cli.build_parser(PRESETS, DEFAULT_PROMPT)


def resolve_configs(args: argparse.Namespace, checkpoint: dict | None) -> tuple[ModelArgs, TrainConfig]:
    """Start from the preset (or the checkpoint being resumed) and apply the flags given."""
    if checkpoint is None:
        model_args, cfg = PRESETS[args.preset]
    else:
        model_args = ModelArgs(**checkpoint["model_args"])
        cfg = TrainConfig(**checkpoint["train_config"])
    return cli.apply_flags(args, model_args, cfg, resuming=checkpoint is not None)


def train(args: argparse.Namespace, t_start: float) -> None:
    """Train from the command-line flags; under torchrun, one process per rank with DistributedDataParallel.
    Rank 0 locks the out-dir first (one run per out-dir), so a second run fails before any work."""
    rank, world_size, device = setup_distributed(pick_device(args.device))
    try:
        with lock_out_dir(args.out_dir) if rank == 0 else nullcontext(), collective_errors():
            train_process(args, t_start, rank, world_size, device)
    finally:
        teardown_distributed()


def train_process(args: argparse.Namespace, t_start: float, rank: int, world_size: int, device: str) -> None:
    """What one process does: set up, train, and on rank 0 evaluate, save, plot and sample."""
    master = rank == 0
    device_type = device.split(":")[0]
    log = print if master else (lambda *a, **k: None)

    out_dir: Path = args.out_dir
    ckpt_path = out_dir / "ckpt.pt"
    resume = args.resume is True or (args.resume == "auto" and ckpt_path.exists())
    checkpoint = load_checkpoint(ckpt_path) if resume else None
    model_args, cfg = resolve_configs(args, checkpoint)

    text = inputs.load_text(args.data)
    tokenizer = inputs.CharTokenizer.from_text(text)
    if checkpoint is not None and tokenizer.chars != checkpoint["tokenizer"]["chars"]:
        raise ValueError(f"--data gives a different vocabulary than {ckpt_path} was trained on; "
                         f"use the same --data, or train a new model in another --out-dir")
    check_prompt(tokenizer, args.prompt)  # now, not after training
    data = np.array(tokenizer.encode(text), dtype=np.int64)
    train_data, val_data = inputs.train_val_split(data)
    if len(val_data) <= model_args.max_seq_len:
        raise ValueError(f"--data has {len(text):,} characters: too short for --seq-len "
                         f"{model_args.max_seq_len} (its last 10% must hold one window); "
                         f"give a longer file or a smaller --seq-len")
    model_args = replace(model_args, vocab_size=tokenizer.vocab_size)

    dtype = args.dtype or ("bfloat16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "float32")
    autocast = (torch.autocast(device_type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext())
    torch.manual_seed(cfg.seed)
    model = Transformer(model_args).to(device)
    optimizers = configure_optimizer(model, cfg, device_type)
    data_gen = torch.Generator().manual_seed(cfg.seed + rank)  # every rank samples its own batches
    step, best_val, loss_log = 0, float("inf"), []
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        for optimizer, state in zip(optimizers, checkpoint["optimizer"], strict=True):
            optimizer.load_state_dict(state)
        step, best_val, loss_log = checkpoint["step"], checkpoint["best_val_loss"], checkpoint["loss_log"]
        torch.set_rng_state(checkpoint["rng"]["torch"])
        if device_type == "cuda" and checkpoint["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(checkpoint["rng"]["cuda"])
        data_states = checkpoint["rng"]["data"]  # one per rank: each rank goes on with its own batches
        if len(data_states) == world_size:
            data_gen.set_state(data_states[rank])
        else:
            data_gen.manual_seed(cfg.seed + rank + 1000003 * step)
            log(f"note: {ckpt_path} was saved by {len(data_states)} processes and this run has {world_size}: "
                f"every rank draws new batches, so this run will not repeat an uninterrupted one")
        log(f"resumed from {ckpt_path} at step {step}")

    raw_model = model
    if args.compile:
        model = torch.compile(model)
    if world_size > 1:
        model = DDP(model, device_ids=[device] if device_type == "cuda" else None)

    n_params = sum(p.numel() for p in raw_model.parameters())
    tokens_per_step = cfg.batch_size * cfg.grad_accum * world_size * model_args.max_seq_len
    log(f"device {device} ({dtype}{', compiled' if args.compile else ''}), {n_params:,} parameters, "
        f"{len(train_data):,} train / {len(val_data):,} val tokens")
    log(f"global batch {cfg.batch_size} x {cfg.grad_accum} accum x {world_size} ranks = "
        f"{tokens_per_step:,} tokens per step; {cfg.max_iters} steps")
    progress = Progress(cfg.max_iters, step, tokens_per_step, args.log_interval, enabled=master)

    def save(best: bool = False) -> None:
        """Rank 0 writes the checkpoint, with every rank's data-stream state (so that --resume is exact);
        with best=True also to best.pt, the weights of the lowest val loss (a model that overfits keeps them)."""
        data_states = gather_from_ranks(data_gen.get_state())
        if master:
            checkpoint = {
                "model": raw_model.state_dict(), "optimizer": [o.state_dict() for o in optimizers],
                "model_args": asdict(model_args), "train_config": asdict(cfg),
                "tokenizer": tokenizer.to_dict(), "step": step, "best_val_loss": best_val, "loss_log": loss_log,
                "rng": {"torch": torch.get_rng_state(), "data": data_states,
                        "cuda": torch.cuda.get_rng_state_all() if device_type == "cuda" else []},
            }
            save_checkpoint(ckpt_path, checkpoint)
            if best:
                save_checkpoint(out_dir / "best.pt", checkpoint)

    def diverged(loss: float) -> FloatingPointError:
        return FloatingPointError(f"the loss became {loss} at step {step}: training diverged. "
                                  f"The last good checkpoint is {ckpt_path}; try a lower --learning-rate")

    def evaluate() -> bool:
        """Estimate train and val loss, log them; True when val is the best so far."""
        nonlocal best_val
        train_loss = estimate_loss(raw_model, train_data, cfg, model_args.max_seq_len, tokenizer.bos_id, device,
                                   autocast)
        val_loss = estimate_loss(raw_model, val_data, cfg, model_args.max_seq_len, tokenizer.bos_id, device,
                                 autocast)
        if not math.isfinite(train_loss + val_loss):  # stop before a diverged model overwrites the checkpoint
            raise diverged(train_loss + val_loss)
        improved = val_loss < best_val
        best_val = min(best_val, val_loss)
        loss_log.append({"step": step, "tokens": step * tokens_per_step, "lr": get_lr(step, cfg),
                         "train_loss": train_loss, "val_loss": val_loss})
        progress.write(f"step {step}: train loss {train_loss:.4f}, val loss {val_loss:.4f}")
        return improved

    last_eval = loss_log[-1]["step"] if loss_log else -1  # the same on every rank
    train_time, train_steps = 0.0, 0
    with StopSignals() as stop:
        while step < cfg.max_iters:
            if step % cfg.eval_interval == 0 and step != last_eval:
                save(best=evaluate() if master else False)
                last_eval = step
            t0 = time.perf_counter()
            batches = [inputs.get_batch(train_data, cfg.batch_size, model_args.max_seq_len, tokenizer.bos_id,
                                        data_gen, device) for _ in range(cfg.grad_accum)]
            lrs = [get_lr(step, cfg, peak_lr(o, cfg)) for o in optimizers]
            loss = train_step(model, optimizers, batches, lrs, cfg.grad_clip, autocast)
            train_time += time.perf_counter() - t0
            train_steps += 1
            # Every rank stops at the same step, or none does.
            signum, bad_loss = all_ranks_max([stop.signum, not math.isfinite(loss)], device)
            if bad_loss:
                raise diverged(loss)
            step += 1
            progress.update(step, loss, get_lr(step - 1, cfg))
            if signum:
                save()
                progress.close()
                stopped = Stopped(int(signum))
                launcher = "python main.py" if world_size == 1 else "torchrun [the same options] main.py"
                log(f"\ninterrupted at step {step} ({stopped}): checkpoint saved to {ckpt_path}.\n"
                    f"continue with: {launcher} --resume --out-dir {out_dir}"
                    + (f" --data {args.data}" if args.data else ""))
                wait_for_all_ranks()  # torchrun ends the other ranks when one exits: not before rank 0 has saved
                raise stopped
    progress.close()
    save(best=evaluate() if master and step != last_eval else False)
    if master:
        final_train = loss_log[-1]["train_loss"]
        final_val = evaluate_split(raw_model, val_data, model_args.max_seq_len, tokenizer.bos_id, cfg.batch_size,
                                   device, autocast)
        write_loss_log(loss_log, cfg, out_dir)
        tokens_per_s = train_steps * tokens_per_step / train_time if train_time else float("nan")
        log(f"final val loss (whole val split) {final_val:.4f}; {tokens_per_s:,.0f} train tokens/s")
        log(f"wrote {ckpt_path}, {out_dir / 'loss.csv'}, {out_dir / 'loss.png'}")
        sample = generate(raw_model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.top_p,
                          torch.Generator().manual_seed(cfg.seed))
        print(f"\n--- sample (temperature {args.temperature}, top-p {args.top_p}) ---\n{args.prompt}{sample}")
        metrics = {"final_val_loss": final_val, "final_train_loss": final_train, "train_tokens_per_s": tokens_per_s,
                   "wall_s": time.perf_counter() - t_start, "params": n_params, "iters": step, "device": device,
                   "dtype": dtype}
        if device_type == "cuda":
            metrics["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")


def check_prompt(tokenizer, prompt: str) -> None:
    """Raise ValueError naming --prompt and its characters outside the vocabulary."""
    try:
        tokenizer.encode(prompt)
    except ValueError as e:
        raise ValueError(f"--prompt {prompt!r}: {e}") from e


def sample_only(args: argparse.Namespace) -> None:
    """--sample: load out-dir/ckpt.pt (or best.pt with --best) and generate, without training."""
    ckpt_path = args.out_dir / ("best.pt" if args.best else "ckpt.pt")
    checkpoint = load_checkpoint(ckpt_path)
    tokenizer = inputs.CharTokenizer.from_dict(checkpoint["tokenizer"])
    if args.data is not None and inputs.CharTokenizer.from_text(inputs.load_text(args.data)).chars != tokenizer.chars:
        raise ValueError(f"--data gives a different vocabulary than {ckpt_path} was trained on; "
                         f"drop --data, or give the file it was trained on")
    check_prompt(tokenizer, args.prompt)
    device = pick_device(args.device)
    print(f"device {device}", file=sys.stderr)
    model = model_from_checkpoint(checkpoint).to(device)
    seed = checkpoint.get("train_config", {}).get("seed", 0) if args.seed is None else args.seed
    text = generate(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.top_p,
                    torch.Generator().manual_seed(seed))
    print(f"{args.prompt}{text}")
    if args.plot_attention:
        path = args.out_dir / "figures" / "main_attention.png"
        plot_attention(model.cpu(), tokenizer, ATTENTION_LINE, path)
        print(f"figure: {path}\ncaption: each row shows which earlier characters one character attends to.")


def main(argv: list[str] | None = None) -> None:
    t_start = time.perf_counter()
    args = build_parser().parse_args(argv)
    try:
        if args.plot_attention and not args.sample:
            raise ValueError("--plot-attention draws a trained model: use it with --sample, after training")
        if args.sample:
            sample_only(args)
        else:
            train(args, t_start)
    except Stopped as e:
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except (OSError, ValueError, FloatingPointError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
