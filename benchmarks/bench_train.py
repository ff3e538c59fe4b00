"""Training speed of the default model: tokens per second and the fraction of matmul peak.

One training step = forward, backward and the preset's optimizer update, exactly as `main.train_step`
runs it for `python main.py`. We time it for the default configuration (`main.ModelArgs()`, `main.TrainConfig()`) in
three variants, on random token ids (speed does not depend on the text):

    fused       F.scaled_dot_product_attention (the default in chapter 3)
    manual      the readable path: scores, mask, softmax, weights @ values
    real-rope   fused attention, with RoPE computed from cos/sin in real numbers
                instead of chapter 2's complex multiplication

In the same run we measure this machine's matmul peak with a large `torch.mm`, and report how
much of it the model reaches (model FLOPs utilization, as in nanoGPT and the PaLM paper).

Run:   python benchmarks/bench_train.py             # about half a minute on 2 CPU cores
       python benchmarks/bench_train.py --steps 5   # quicker, noisier
The last line printed is one JSON object, so figures can be compared over time.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root, where main.py lives
import main  # noqa: E402

normalization_and_rope = importlib.import_module("02_normalization_and_rope")

VOCAB_SIZE = 67  # Tiny Shakespeare: 65 characters + 2 special tokens


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Best GFLOP/s of an (n x n) @ (n x n) float32 product: 2 * n^3 floating-point operations."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm-up: threads start, memory is touched
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def flops_per_token(model: main.Transformer) -> float:
    """Training FLOPs per token (forward + backward), the PaLM / nanoGPT estimate:

        6 * N  +  12 * n_layers * dim * seq_len

    N counts the parameters used in matrix products: all but the token embedding, which is a
    table lookup. Each such weight costs 2 FLOPs per token forward (multiply and add) and 4
    backward (gradients of the input and of the weight): 6 in all. Attention adds, per layer and
    token, q @ k^T and weights @ v over seq_len keys: 2 * 2 * dim * seq_len forward, times 3 with
    the backward. The causal mask could halve that term; we count it whole, as PaLM does.
    Norms, SiLU, softmax and the optimizer are left out (small next to the matrix products).
    """
    p = model.params
    n_matmul = sum(q.numel() for name, q in model.named_parameters() if name != "tok_embeddings.weight")
    return 6 * n_matmul + 12 * p.n_layers * p.dim * p.max_seq_len


def apply_rotary_emb_real(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Chapter 2's RoPE in real numbers: the pair (a, b) turns into (a cos - b sin, a sin + b cos).
    Same result as multiplying by e^(j * angle), without complex tensors."""
    cos = freqs_cis.real[None, :, None, :]  # (1, seqlen, 1, head_dim // 2)
    sin = freqs_cis.imag[None, :, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        pairs = x.float().reshape(*x.shape[:-1], -1, 2)  # (bsz, seqlen, heads, head_dim // 2, 2)
        a, b = pairs[..., 0], pairs[..., 1]
        return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(3).type_as(x)

    return rotate(xq), rotate(xk)


def time_steps(variant: str, model_args: main.ModelArgs, cfg: main.TrainConfig, steps: int, warmup: int) -> float:
    """Seconds per training step: the median of `steps` timed steps, after `warmup` untimed ones.
    The median is what a real run sees (step times vary by +-20% here); the fastest step would flatter it."""
    torch.manual_seed(0)
    model = main.Transformer(model_args)
    for layer in model.layers:
        layer.attention.fused = variant != "manual"
    optimizers = main.configure_optimizer(model, cfg, "cpu")
    lrs = list(main.learning_rates(cfg.warmup_iters, optimizers, cfg).values())  # the peak rates
    x = torch.randint(0, VOCAB_SIZE, (cfg.batch_size, model_args.max_seq_len))  # (bsz, seqlen)
    y = torch.randint(0, VOCAB_SIZE, (cfg.batch_size, model_args.max_seq_len))
    original_rope = normalization_and_rope.apply_rotary_emb
    if variant == "real-rope":  # chapter 3 looks the function up in chapter 2's module at each call
        normalization_and_rope.apply_rotary_emb = apply_rotary_emb_real
    try:
        times = []
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            main.train_step(model, optimizers, [(x, y)], lrs, cfg.grad_clip, nullcontext())
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    finally:
        normalization_and_rope.apply_rotary_emb = original_rope
    return statistics.median(times)


def check_real_rope() -> None:
    """The real-valued RoPE must equal chapter 2's, or its timing means nothing."""
    freqs_cis = normalization_and_rope.precompute_freqs_cis(32, 16)
    xq, xk = torch.randn(2, 16, 4, 32), torch.randn(2, 16, 2, 32)
    ours, theirs = apply_rotary_emb_real(xq, xk, freqs_cis), normalization_and_rope.apply_rotary_emb(xq, xk, freqs_cis)
    torch.testing.assert_close(ours, theirs)  # compares the (xq, xk) tuples element by element


def run() -> None:
    parser = argparse.ArgumentParser(description="Training tokens/s of the default model and its share of matmul peak.")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per variant (the median counts)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: PyTorch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model_args, cfg = main.ModelArgs(vocab_size=VOCAB_SIZE), main.TrainConfig()
    tokens_per_step = cfg.batch_size * model_args.max_seq_len
    flops = flops_per_token(main.Transformer(model_args))
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"default model: dim {model_args.dim}, {model_args.n_layers} layers, {model_args.n_heads} heads, "
          f"{model_args.n_kv_heads} kv heads; batch {cfg.batch_size} x seq_len {model_args.max_seq_len} "
          f"= {tokens_per_step:,} tokens per step; {flops / 1e6:.2f} MFLOPs per token")

    peak = matmul_peak_gflops()
    print(f"matmul peak (2048^3 float32 torch.mm): {peak:.1f} GFLOP/s")

    check_real_rope()
    results = {}
    for variant in ("fused", "manual", "real-rope"):
        seconds = time_steps(variant, model_args, cfg, args.steps, args.warmup)
        tokens_per_s = tokens_per_step / seconds
        results[variant] = {"ms_per_step": 1000 * seconds, "tokens_per_s": tokens_per_s,
                            "model_gflops": tokens_per_s * flops / 1e9}
    # Read the peak again: if another program slowed one reading down, the higher one is fairer.
    peak = max(peak, matmul_peak_gflops())
    print(f"matmul peak, best of two readings: {peak:.1f} GFLOP/s")
    for variant, r in results.items():
        print(f"  {variant:10s} {r['ms_per_step']:7.1f} ms/step  {r['tokens_per_s']:9,.0f} tokens/s  "
              f"{r['model_gflops']:6.1f} GFLOP/s = {r['model_gflops'] / peak:5.1%} of peak")

    default = results["fused"]  # what `python main.py` runs
    print(json.dumps({
        "tokens_per_s": round(default["tokens_per_s"]), "peak_gflops": round(peak, 1),
        "model_gflops": round(default["model_gflops"], 1), "mfu": round(default["model_gflops"] / peak, 3),
        "flops_per_token": flops, "threads": torch.get_num_threads(),
        "variants": {k: {m: round(v, 1) for m, v in r.items()} for k, r in results.items()},
    }))


if __name__ == "__main__":
    run()
