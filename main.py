"""LLaMA 3 from scratch: assemble chapters 1-4, train on Tiny Shakespeare, and sample.

    tokens (bsz, seqlen)
      -> tok_embeddings                         (bsz, seqlen, dim)
      -> n_layers x TransformerBlock            (chapter 4, using chapters 2 and 3)
      -> norm (RMSNorm) -> output (Linear)      (bsz, seqlen, vocab_size) logits

Read in order: the model (Meta's `Transformer`); the recipe and what in it is ours; the learning rate and the
optimizers; one step and the evaluation; the training loop; generation; the entry points. Flags, signals, the
out-dir lock, progress lines, checkpoint contents, torch.distributed and the reports live in plumbing/.

Run:   python main.py                      # train the default CPU model, then sample
       python main.py --sample --prompt "ROMEO:"
       python main.py --help               # every flag
Importing this module runs nothing.
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from plumbing import cli, runtime
from plumbing.checkpoint import checkpoint_to_resume, read_checkpoint, restore_run, save_run
from plumbing.reports import draw_attention, report_run, report_start
from plumbing.validators import check_long_enough, check_prompt, check_sampling, check_vocabulary

inputs = importlib.import_module("01_input_block")
normalization_and_rope = importlib.import_module("02_normalization_and_rope")
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
    rope_scaling_factor: float = 8.0  # ours (Meta's code hard-codes 8, Llama 3.1's): 32 for Llama 3.2 1B and 3B


class Transformer(nn.Module):
    """The LLaMA 3 decoder: Meta's `Transformer`, with the same layers, maths and state-dict keys. The weight
    initialization is ours (GPT-2's, below): Meta's reference code defines none, as it only loads trained weights."""

    def __init__(self, params: ModelArgs):
        super().__init__()
        self.params = params
        self.tok_embeddings = nn.Embedding(params.vocab_size, params.dim)
        self.layers = nn.ModuleList(
            blocks.TransformerBlock(
                i, dim=params.dim, n_heads=params.n_heads, n_kv_heads=params.n_kv_heads, multiple_of=params.multiple_of,
                ffn_dim_multiplier=params.ffn_dim_multiplier, norm_eps=params.norm_eps,
                max_batch_size=params.max_batch_size, max_seq_len=params.max_seq_len, dropout=params.dropout,
            )
            for i in range(params.n_layers)
        )
        self.norm = normalization_and_rope.RMSNorm(params.dim, eps=params.norm_eps)
        self.output = nn.Linear(params.dim, params.vocab_size, bias=False)
        # Computed once, and a plain attribute as in Meta's code, not a buffer: `model.to(torch.bfloat16)`
        # would cast a buffer's complex rotations to real numbers, and RoPE would scale instead of rotate.
        # Built on the CPU also when the weights are built on the meta device (chapter 5); forward moves it.
        with torch.device("cpu"):
            self.freqs_cis = normalization_and_rope.precompute_freqs_cis(
                params.dim // params.n_heads, params.max_seq_len, params.rope_theta, params.use_scaled_rope,
                params.rope_scaling_factor)

        # GPT-2's initialization: N(0, 0.02) for every matrix (the norms' gains stay 1), then a smaller std for
        # the projections that write into the residual stream, so that the stream's variance does not grow with depth.
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, mean=0.0, std=0.02)
        for name, p in self.named_parameters():
            if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * params.n_layers))

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


# ----------------------------------------------------------------------------- the recipe


@dataclass
class TrainConfig:
    """How the model is trained. The defaults are the CPU run, `python main.py`: 1,000 steps of 32 windows of
    128 characters, a minute and a half to three minutes on a laptop CPU (docs/performance.md has the runs
    behind every number)."""

    batch_size: int = 32
    max_iters: int = 1000
    learning_rate: float = 8e-3  # AdamW's peak
    min_lr: float = 8e-5  # AdamW's floor at the end of the decay; Muon's is scaled by the ratio of the peaks
    warmup_iters: int = 50
    lr_decay_iters: int | None = None  # where the decay ends; None: max_iters (--resume --max-iters keeps it)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    grad_accum: int = 1
    eval_interval: int = 250
    eval_iters: int = 5
    seed: int = 1337
    optimizer: str = "muon"  # "muon": Muon for the blocks' matrices and AdamW for the rest; "adamw": AdamW for all
    muon_lr: float = 0.015  # Muon's peak
    schedule: str = "wsd"  # "wsd": warmup, stable (flat), then a linear decay; "cosine": warmup, then a cosine
    cooldown_frac: float = 0.6  # wsd: the share of lr_decay_iters spent decaying

    def __post_init__(self) -> None:
        if self.lr_decay_iters is None:
            self.lr_decay_iters = self.max_iters
        if self.optimizer not in ("adamw", "muon") or self.schedule not in ("cosine", "wsd"):
            raise ValueError(f"optimizer {self.optimizer!r} or schedule {self.schedule!r} is unknown; "
                             f"choose adamw or muon, and cosine or wsd")
        if not 0 < self.cooldown_frac <= 1:
            raise ValueError(f"--cooldown-frac {self.cooldown_frac:g}: the decay cannot be longer than the run; "
                             f"give a value in (0, 1]")
        if self.min_lr > self.learning_rate:
            raise ValueError(f"--learning-rate {self.learning_rate:g} is below the final learning rate "
                             f"(min_lr {self.min_lr:g}); give a smaller --min-lr too")


# `--preset gpu` is nanoGPT's 10.7M-parameter Shakespeare size for one GPU, written as its differences from the
# defaults. It learns faster than nanoGPT's GPT and overfits sooner, hence 2,500 steps and dropout 0.3.
PRESETS: dict[str, tuple[dict, dict]] = {
    "cpu": ({}, {}),
    "gpu": (dict(dim=384, n_layers=6, n_heads=6, n_kv_heads=6, max_seq_len=256, max_batch_size=64, dropout=0.3),
            dict(batch_size=64, max_iters=2500, learning_rate=1e-3, min_lr=1e-4, warmup_iters=100, beta2=0.99,
                 eval_iters=50, optimizer="adamw", schedule="cosine")),
}

# What is ours, not Meta's. The model above is Meta's, name for name. How it is trained is our recipe for a
# small model on a laptop CPU; Meta trained Llama 3 with AdamW, a cosine schedule and 8,192-token windows.
# - Muon for the matrices inside the blocks (AdamW for the rest): about 0.1 lower val loss at 1,000 steps.
# - WSD: the learning rate stays flat, then falls in a straight line over the last 60% of the steps.
# - Every training window opens with <|begin_of_text|>, as every generation does (chapter 1).
# - GPT-2's initialization (in Transformer) and, in the GPU preset, dropout: Meta's code only loads trained weights.


# ----------------------------------------------------------------------------- learning rate and optimizers


def get_lr(step: int, cfg: TrainConfig, peak_lr: float | None = None) -> float:
    """The learning rate at `step` of an optimizer whose peak is peak_lr (default: AdamW's learning_rate): a linear
    warmup, then cosine (down to the floor at lr_decay_iters) or wsd (flat: it explores; then a straight line down
    over the last cooldown_frac of lr_decay_iters: it settles), then the floor, min_lr * peak_lr / learning_rate,
    so that Muon and AdamW follow the same shape from their own peaks."""
    peak = cfg.learning_rate if peak_lr is None else peak_lr
    floor = cfg.min_lr * peak / cfg.learning_rate
    decay_iters = cfg.lr_decay_iters
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
    """Orthogonalize the matrix g approximately: for g = U S V^T, about U V^T, in `dtype`.

    Each step maps X to a X + b (X X^T) X + c (X X^T)^2 X, an odd polynomial of the singular values; Keller Jordan
    tuned (a, b, c) to pull small ones up fast (they end between about 0.7 and 1.2)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.to(dtype)
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T  # iterate on the wide form: X X^T is then the smaller Gram matrix
    x = x / x.norm().clamp(min=eps)  # Frobenius norm 1: every singular value <= 1
    # addmm(C, M, N, beta, alpha) is beta C + alpha M N in one product, as torch.optim.Muon computes it (written out
    # as b * A + c * A @ A, the same sums round differently: docs/performance.md).
    for _ in range(steps):
        A = x @ x.T  # A = X X^T, (rows, rows)
        B = torch.addmm(A, A, A, beta=b, alpha=c)  # B = b A + c A A
        x = torch.addmm(x, B, x, beta=a)  # X = a X + B X
    return x.T if tall else x


class Muon(torch.optim.Optimizer):
    """Muon (MomentUm Orthogonalized by Newton-Schulz) keeps SGD's momentum, then orthogonalizes each matrix's
    update: a plain gradient step is dominated by a few large directions; the orthogonalized one moves every
    direction of the matrix by the same amount, so rarely used directions learn too.

    Computed as torch.optim.Muon computes it (Nesterov momentum, 5 Newton-Schulz steps, updates scaled by
    sqrt(max(1, rows / cols)), decoupled weight decay), except that the Newton-Schulz products run in `ns_dtype`:
    torch.optim.Muon always uses bfloat16, which a CPU without bf16 instructions emulates slowly."""

    def __init__(self, params, lr: float, weight_decay: float, momentum: float = 0.95,
                 ns_dtype: torch.dtype = torch.bfloat16):
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "momentum": momentum})
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)  # the running mean of gradients
                update = newton_schulz(p.grad.lerp(buf, momentum), self.ns_dtype)  # Nesterov: a step ahead
                p.mul_(1 - lr * weight_decay)
                # scaled as in Keller Jordan's Muon: a tall w1 moves as much per output as a square wq
                p.add_(update, alpha=-lr * math.sqrt(max(1, p.size(0) / p.size(1))))


def is_muon_param(name: str, p: nn.Parameter) -> bool:
    """Muon's share of the model: the 2-D matrices inside the blocks (wq, wk, wv, wo, w1, w2, w3)."""
    return name.startswith("layers.") and p.dim() == 2


def configure_optimizer(model: nn.Module, cfg: TrainConfig, device_type: str) -> list[torch.optim.Optimizer]:
    """The optimizers that together update every parameter, AdamW first. adamw: AdamW for everything.
    muon: Muon for the blocks' matrices; AdamW for the embeddings and the output layer (lookups and a classifier
    over the vocabulary, not maps between hidden vectors) and the norm gains (vectors). AdamW decays the
    matrices' weights, not the norm gains."""
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
        ns_dtype = torch.float32 if device_type == "cpu" else torch.bfloat16
        optimizers.append(Muon(muon, lr=cfg.muon_lr, weight_decay=cfg.weight_decay, ns_dtype=ns_dtype))
    return optimizers


def learning_rates(step: int, optimizers: list[torch.optim.Optimizer], cfg: TrainConfig) -> dict[str, float]:
    """Each optimizer's learning rate at `step`, by name, in the order of `optimizers`: Muon's schedule starts
    from muon_lr, AdamW's from learning_rate."""
    rates = {}
    for optimizer in optimizers:
        muon = isinstance(optimizer, Muon)
        rates["muon" if muon else "adamw"] = get_lr(step, cfg, cfg.muon_lr if muon else cfg.learning_rate)
    return rates


# ----------------------------------------------------------------------------- one step and evaluation


def train_step(model: nn.Module, optimizers: list[torch.optim.Optimizer],
               batches: list[tuple[torch.Tensor, torch.Tensor]], lrs: list[float], grad_clip: float, autocast) -> float:
    """One step of each optimizer, at its learning rate in `lrs`, over `batches` (gradient accumulation: the same
    update as one batch of all of them together; under DDP, gradients are averaged across ranks on the last one
    only). Returns the mean loss over the batches."""
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


# ----------------------------------------------------------------------------- the training loop


@dataclass
class RunState:
    """What changes as training goes. With the weights and the optimizer states, it is all that --resume
    needs to go on exactly where a run stopped."""

    data_gen: torch.Generator  # this rank's stream of batches: the same state gives the same batches
    step: int = 0
    best_val: float = float("inf")
    loss_log: list[dict] = field(default_factory=list)  # one row per evaluation
    train_losses: list[float] = field(default_factory=list)  # every step's loss on its batch (this rank's)
    last_eval: int = -1  # the step of the latest evaluation, so that a resumed run does not repeat it


@dataclass
class Run:
    """One process's training run: its settings, data, model and optimizers, and its RunState."""

    model_args: ModelArgs
    cfg: TrainConfig
    tokenizer: inputs.CharTokenizer
    train_data: np.ndarray
    val_data: np.ndarray
    raw_model: Transformer  # what is evaluated, saved and sampled
    model: nn.Module  # what trains: raw_model, compiled and wrapped in DDP when asked
    optimizers: list[torch.optim.Optimizer]
    state: RunState
    dtype: str  # "bfloat16" (autocast, float32 weights) or "float32"
    device: str
    rank: int
    world_size: int
    out_dir: Path

    @property
    def device_type(self) -> str:
        return torch.device(self.device).type  # "cuda:1" -> "cuda"

    @property
    def autocast(self) -> torch.autocast | nullcontext:
        bf16 = self.dtype == "bfloat16"
        return torch.autocast(self.device_type, dtype=torch.bfloat16) if bf16 else nullcontext()

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.grad_accum * self.world_size * self.model_args.max_seq_len

    def log(self, line: str) -> None:
        """Print on rank 0 only."""
        if self.rank == 0:
            print(line)


def train(args: argparse.Namespace, rank: int, world_size: int, device: str, t_start: float) -> None:
    """One process of a training run (one per rank under torchrun; rank 0 evaluates, saves and reports)."""
    run = set_up(args, rank, world_size, device)
    cfg, state = run.cfg, run.state
    progress = runtime.Progress(cfg.max_iters, state.step, run.tokens_per_step, args.log_interval, enabled=rank == 0)
    with runtime.StopSignals() as stop:
        while state.step < cfg.max_iters:
            # once in a while: evaluate, and save a checkpoint (best.pt too when val improved)
            if state.step % cfg.eval_interval == 0 and state.step != state.last_eval:
                evaluate_and_save(run, progress)

            # one training step: grad_accum micro-batches, then each optimizer at its scheduled learning rate
            t0 = time.perf_counter()
            batches = [inputs.get_batch(run.train_data, cfg.batch_size, run.model_args.max_seq_len,
                                        run.tokenizer.bos_id, state.data_gen, device) for _ in range(cfg.grad_accum)]
            lrs = learning_rates(state.step, run.optimizers, cfg)
            loss = train_step(run.model, run.optimizers, batches, list(lrs.values()), cfg.grad_clip, run.autocast)
            seconds = time.perf_counter() - t0

            # every rank stops at the same step or none does: on a loss that diverged, or on Ctrl-C / SIGTERM
            signum, bad_loss = runtime.all_ranks_max([stop.signum, not math.isfinite(loss)], device)
            if bad_loss:
                raise diverged(run, loss)
            state.step += 1
            state.train_losses.append(loss)
            progress.update(state.step, loss, lrs, seconds)
            if signum:
                save_run(run)
                progress.close()
                raise runtime.interrupted(signum, state.step, run.out_dir / "ckpt.pt", world_size, args.data, run.log)
    progress.close()
    finish(run, args, progress, t_start)


def set_up(args: argparse.Namespace, rank: int, world_size: int, device: str) -> Run:
    """Everything one process needs to train: the settings, the data, the model and its optimizers, new or as
    out-dir/ckpt.pt left them (--resume)."""
    ckpt_path = args.out_dir / "ckpt.pt"
    checkpoint = checkpoint_to_resume(ckpt_path, args.resume, load=load_checkpoint)
    model_args, cfg = resolve_configs(args, checkpoint)
    tokenizer, train_data, val_data = load_data(args, model_args.max_seq_len, checkpoint)
    model_args = replace(model_args, vocab_size=tokenizer.vocab_size)

    device_type = torch.device(device).type
    dtype = args.dtype or ("bfloat16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "float32")
    torch.manual_seed(cfg.seed)
    raw_model = Transformer(model_args).to(device)
    optimizers = configure_optimizer(raw_model, cfg, device_type)
    state = RunState(data_gen=torch.Generator().manual_seed(cfg.seed + rank))  # every rank samples its own batches
    run = Run(model_args, cfg, tokenizer, train_data, val_data, raw_model, raw_model, optimizers, state, dtype,
              device, rank, world_size, args.out_dir)
    if checkpoint is not None:
        restore_run(checkpoint, run)
        run.log(f"resumed from {ckpt_path} at step {state.step}")
    if args.compile:
        run.model = torch.compile(raw_model)
    if world_size > 1:
        run.model = DDP(run.model, device_ids=[device] if device_type == "cuda" else None)
    report_start(run, args.compile)
    return run


def load_data(args: argparse.Namespace, seq_len: int, checkpoint: dict | None) -> tuple:
    """The character tokenizer of --data and its 90/10 split into token ids, checked against the checkpoint
    being resumed, the prompt and the context length. Returns (tokenizer, train_data, val_data)."""
    text = inputs.load_text(args.data)
    tokenizer = inputs.CharTokenizer.from_text(text)
    if checkpoint is not None:
        check_vocabulary(tokenizer.chars, checkpoint, args.out_dir / "ckpt.pt",
                         "use the same --data, or train a new model in another --out-dir")
    check_prompt(tokenizer, args.prompt)  # now, not after training
    train_data, val_data = inputs.train_val_split(np.array(tokenizer.encode(text), dtype=np.int64))
    check_long_enough(text, len(val_data), seq_len)
    return tokenizer, train_data, val_data


def evaluate_and_save(run: Run, progress: runtime.Progress) -> None:
    """Rank 0 estimates the train and val loss; then every rank takes part in the save (it gathers their batch
    streams), which also writes best.pt when val is the lowest so far (a model that overfits keeps its best)."""
    state = run.state
    improved = False
    if run.rank == 0:
        train_loss, val_loss = (estimate_loss(run.raw_model, data, run.cfg, run.model_args.max_seq_len,
                                              run.tokenizer.bos_id, run.device, run.autocast)
                                for data in (run.train_data, run.val_data))
        if not math.isfinite(train_loss + val_loss):  # stop before a diverged model overwrites the checkpoint
            raise diverged(run, train_loss + val_loss)
        improved, state.best_val = val_loss < state.best_val, min(state.best_val, val_loss)
        state.loss_log.append({"step": state.step, "tokens": state.step * run.tokens_per_step,
                               "lr": get_lr(state.step, run.cfg), "train_loss": train_loss, "val_loss": val_loss})
        progress.write(f"step {state.step}: train loss {train_loss:.4f}, val loss {val_loss:.4f}")
    state.last_eval = state.step
    save_run(run, best=improved)


def diverged(run: Run, loss: float) -> FloatingPointError:
    return FloatingPointError(f"the loss became {loss} at step {run.state.step}: training diverged. The last good "
                              f"checkpoint is {run.out_dir / 'ckpt.pt'}; try a lower --learning-rate")


def finish(run: Run, args: argparse.Namespace, progress: runtime.Progress, t_start: float) -> None:
    """After the last step: a last evaluation and save; then rank 0 measures the loss over the whole val split,
    samples from the model, and reports (loss.csv, loss.png, metrics.json)."""
    if run.state.step != run.state.last_eval:
        evaluate_and_save(run, progress)
    else:
        save_run(run)
    if run.rank != 0:
        return
    final_val = evaluate_split(run.raw_model, run.val_data, run.model_args.max_seq_len, run.tokenizer.bos_id,
                               run.cfg.batch_size, run.device, run.autocast)
    sample = generate(run.raw_model, run.tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.top_p,
                      torch.Generator().manual_seed(run.cfg.seed))
    report_run(run, final_val, sample, args, progress.tokens_per_s(), t_start,
               lr_at=lambda step: learning_rates(step, run.optimizers, run.cfg))


# ----------------------------------------------------------------------------- generation


def sample_top_p(probs: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Nucleus sampling (Meta's `sample_top_p`): keep the most likely tokens, in order, until their total
    probability exceeds p, and sample among them. A token is dropped only when the tokens before it already
    hold more than p, so the token that crosses p is kept and the set is never empty.
    probs (bsz, vocab_size), rows summing to 1 -> (bsz, 1) token ids."""
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    mask = probs_sum - probs_sort > p  # the mass before this token already exceeds p
    probs_sort[mask] = 0.0
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    next_token = torch.multinomial(probs_sort, num_samples=1, generator=generator)
    return torch.gather(probs_idx, -1, next_token)


def generate(model: Transformer, tokenizer, prompt: str, max_new_tokens: int, temperature: float = 0.8,
             top_p: float = 0.9, generator: torch.Generator | None = None) -> str:
    """Continue `prompt` by up to max_new_tokens tokens (characters, with chapter 1's tokenizer); return only the
    new text. The context opens with <|begin_of_text|>, like every training window; <|end_of_text|> stops it.
    Raises ValueError for bad arguments, or prompt characters outside the vocabulary."""
    tokens = tokenizer.encode(prompt, bos=True)
    new_tokens = generate_tokens(model, tokens, max_new_tokens, {tokenizer.eos_id}, temperature, top_p, generator)
    return tokenizer.decode(list(new_tokens))


def sample_next(logits: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """The next token from the last position's logits (bsz, vocab_size): the most likely one at temperature 0,
    else top-p sampling of softmax(logits / temperature). Returns (bsz, 1) token ids, on the logits' device."""
    if temperature == 0:
        return torch.argmax(logits, dim=-1, keepdim=True)
    probs = torch.softmax(logits / temperature, dim=-1)
    return sample_top_p(probs.cpu(), top_p, generator).to(logits.device)


@torch.no_grad()
def generate_tokens(model: Transformer, tokens: list[int], max_new_tokens: int, stop_ids: set[int],
                    temperature: float = 0.8, top_p: float = 0.9,
                    generator: torch.Generator | None = None) -> Iterator[int]:
    """Sample up to max_new_tokens tokens after `tokens`, yielding each one as soon as it is chosen.

    `tokens` opens with <|begin_of_text|>, as every training window does. The prompt runs through the
    model once (start_pos=0), then one token at a time through the KV cache. When the cache is full
    the window slides: BOS and the newest half of the context become a new prompt. Stops early at a
    token in stop_ids (not yielded). temperature 0 is greedy (argmax). Raises ValueError for bad arguments.
    """
    check_sampling(temperature, top_p, max_new_tokens)
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
            next_token = sample_next(logits[:, -1], temperature, top_p, generator)  # (1, 1)
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
                # One token multiplies each weight by a vector: on a CPU, oneDNN's kernel reads bfloat16 weights (Llama
                # 3's, in chapter 6) slower than PyTorch's own, so it is off for this step (docs/llama3.md, "Speed").
                with runtime.cpu_matrix_vector_kernel(seqlen=1):
                    logits, _ = model(next_token.view(1, 1), start_pos=pos)
                pos += 1
    finally:
        model.train(was_training)


@torch.no_grad()
def last_layer_attention(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    """The attention weights of every head of the last layer over tokens (1, seqlen), as the model computes
    them in its forward pass. Returns (n_heads, seqlen, seqlen)."""
    seqlen = tokens.shape[1]
    freqs_cis = model.freqs_cis[:seqlen].to(tokens.device)
    h = model.tok_embeddings(tokens)
    for layer in model.layers[:-1]:
        h = layer(h, freqs_cis)  # the last layer's input
    last = model.layers[-1]
    return attention.attention_weights(last.attention, last.attention_norm(h), freqs_cis)[0]


# ----------------------------------------------------------------------------- entry points
# You may skip from here: LLaMA and its training end above. Below, the command line runs them (train, or load a
# checkpoint and sample); its flags, checks and reports are plumbing/'s.

DEFAULT_PROMPT = "ROMEO:"
ATTENTION_LINE = "ROMEO:\nBut soft, what light through yonder window breaks?"


def main(argv: list[str] | None = None) -> None:
    """`python main.py [flags]`: train (one process, or one per rank under torchrun), or --sample. Every problem
    ends in one line `error: ...`; Ctrl-C and SIGTERM end with the exit status of the signal."""
    t_start = time.perf_counter()
    args = build_parser().parse_args(argv)
    with runtime.exit_on_error():
        if args.plot_attention and not args.sample:
            raise ValueError("--plot-attention draws a trained model: use it with --sample, after training")
        if args.sample:
            sample_only(args)
        else:
            with runtime.training_process(args.device, args.out_dir) as (rank, world_size, device):
                train(args, rank, world_size, device, t_start)


def build_parser() -> argparse.ArgumentParser:
    """Every flag of main.py (written out in plumbing/cli.py), with each preset's defaults in --help."""
    presets = {name: (ModelArgs(**m), TrainConfig(**t)) for name, (m, t) in PRESETS.items()}
    return cli.build_parser(presets, DEFAULT_PROMPT)


def resolve_configs(args: argparse.Namespace, checkpoint: dict | None) -> tuple[ModelArgs, TrainConfig]:
    """The run's settings: the preset's (or those of the checkpoint being resumed), with the flags given on top."""
    fields = PRESETS[args.preset] if checkpoint is None else (checkpoint["model_args"], checkpoint["train_config"])
    model_fields, train_fields = cli.merge_flags(args, *fields, resuming=checkpoint is not None)
    try:
        return ModelArgs(**model_fields), TrainConfig(**train_fields)
    except TypeError as e:  # a checkpoint whose settings this main.py does not know
        raise ValueError(f"--resume: the checkpoint's settings do not fit this main.py ({e})") from e


def load_checkpoint(path: Path) -> dict:
    """A checkpoint of main.py, read safely (weights_only: never pickled code) and checked: its weights must fit
    its model_args. Raises FileNotFoundError or ValueError."""
    return read_checkpoint(path, check=model_from_checkpoint)


def model_from_checkpoint(checkpoint: dict) -> Transformer:
    """The Transformer that a checkpoint's `model_args` describe, with its weights loaded (strictly)."""
    model = Transformer(ModelArgs(**checkpoint["model_args"]))
    model.load_state_dict(checkpoint["model"])
    return model


def sample_only(args: argparse.Namespace) -> None:
    """--sample: load out-dir/ckpt.pt (or best.pt with --best) and generate, without training."""
    ckpt_path = args.out_dir / ("best.pt" if args.best else "ckpt.pt")
    checkpoint = load_checkpoint(ckpt_path)
    tokenizer = inputs.CharTokenizer.from_dict(checkpoint["tokenizer"])
    if args.data is not None:
        check_vocabulary(inputs.CharTokenizer.from_text(inputs.load_text(args.data)).chars, checkpoint, ckpt_path,
                         "drop --data, or give the file it was trained on")
    check_prompt(tokenizer, args.prompt)
    device = runtime.pick_device(args.device)
    print(f"device {device}", file=sys.stderr)
    model = model_from_checkpoint(checkpoint).to(device)
    seed = checkpoint.get("train_config", {}).get("seed", 0) if args.seed is None else args.seed
    text = generate(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.top_p,
                    torch.Generator().manual_seed(seed))
    print(f"{args.prompt}{text}")
    if args.plot_attention:
        path = args.out_dir / "figures" / "main_attention.png"
        tokens = tokenizer.encode(ATTENTION_LINE, bos=True)[: model.params.max_seq_len]  # BOS first, as in training
        weights = last_layer_attention(model.cpu().eval(), torch.tensor([tokens]))
        labels = ["BOS", *(inputs.VISIBLE.get(c, c) for c in tokenizer.decode(tokens[1:]))]
        draw_attention(weights, labels, model.layers[-1].attention.n_rep, ATTENTION_LINE, path)
        print(f"figure: {path}\ncaption: each row shows which earlier characters one character attends to.")


if __name__ == "__main__":
    main()
