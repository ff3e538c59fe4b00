"""Chapter 4: the SwiGLU feed-forward network and the transformer block.

Feed-forward. After attention mixes information across tokens, each token is
processed on its own by a small MLP. LLaMA uses SwiGLU: a SiLU-activated gate
multiplies a second linear projection,

    FFN(x) = w2( silu(w1 x) * w3 x ),   silu(z) = z * sigmoid(z)

Three matrices instead of two, so the hidden size is 2/3 of the classic 4 * dim
to keep the parameter count, then scaled by ffn_dim_multiplier and rounded up to
a multiple of multiple_of (hardware-friendly). For Llama 3 8B: dim 4096,
ffn_dim_multiplier 1.3, multiple_of 1024 -> hidden size 14336.

Transformer block. Pre-norm with two residual connections:

    h   = x + attention(attention_norm(x))
    out = h + feed_forward(ffn_norm(h))

Normalizing the input of each branch (not the sum) keeps the residual stream
untouched, which is why deep LLaMAs train stably.

Needs: 02_normalization_and_rope.py (RMSNorm), 03_attention.py (Attention).
Run:   python 04_feedforward_and_transformer_block.py
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

normalization_and_rope = importlib.import_module("02_normalization_and_rope")
attention = importlib.import_module("03_attention")


def ffn_hidden_dim(hidden_dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's rule: 2/3 of hidden_dim (4 * dim), times ffn_dim_multiplier, rounded up to a multiple of multiple_of."""
    hidden_dim = int(2 * hidden_dim / 3)
    if ffn_dim_multiplier is not None:
        hidden_dim = int(ffn_dim_multiplier * hidden_dim)
    return multiple_of * ((hidden_dim + multiple_of - 1) // multiple_of)


class FeedForward(nn.Module):
    """SwiGLU MLP (Meta's `FeedForward`). `hidden_dim` is the starting point (4 * dim), not the final size."""

    def __init__(self, *, dim: int, hidden_dim: int, multiple_of: int, ffn_dim_multiplier: float | None,
                 dropout: float = 0.0):
        super().__init__()
        hidden_dim = ffn_hidden_dim(hidden_dim, multiple_of, ffn_dim_multiplier)
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down projection
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up projection
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (bsz, seqlen, dim) -> (bsz, seqlen, hidden_dim) -> (bsz, seqlen, dim)
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class TransformerBlock(nn.Module):
    """Pre-norm block: RMSNorm -> attention -> residual, RMSNorm -> SwiGLU -> residual."""

    def __init__(self, layer_id: int, *, dim: int, n_heads: int, n_kv_heads: int | None, multiple_of: int,
                 ffn_dim_multiplier: float | None, norm_eps: float, max_batch_size: int, max_seq_len: int,
                 dropout: float = 0.0):
        super().__init__()
        self.layer_id = layer_id
        self.attention = attention.Attention(dim=dim, n_heads=n_heads, n_kv_heads=n_kv_heads,
                                             max_batch_size=max_batch_size, max_seq_len=max_seq_len, dropout=dropout)
        self.feed_forward = FeedForward(dim=dim, hidden_dim=4 * dim, multiple_of=multiple_of,
                                        ffn_dim_multiplier=ffn_dim_multiplier, dropout=dropout)
        self.attention_norm = normalization_and_rope.RMSNorm(dim, eps=norm_eps)
        self.ffn_norm = normalization_and_rope.RMSNorm(dim, eps=norm_eps)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, start_pos: int | None = None) -> torch.Tensor:
        """x: (bsz, seqlen, dim) -> (bsz, seqlen, dim). start_pos as in `Attention.forward`."""
        h = x + self.attention(self.attention_norm(x), freqs_cis, start_pos)
        return h + self.feed_forward(self.ffn_norm(h))


def plot_figures(block: TransformerBlock, fig_dir: Path) -> list[Path]:
    """SwiGLU's gate beside ReLU and GELU; where the block's parameters go."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig_dir.mkdir(parents=True, exist_ok=True)
    z = torch.linspace(-4, 4, 200)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(z, F.relu(z), label="ReLU")
    ax.plot(z, F.gelu(z), label="GELU")
    ax.plot(z, F.silu(z), label="SiLU(z) = z·σ(z), SwiGLU's gate", lw=2.5)
    ax.axhline(0, color="gray", lw=0.5)
    ax.grid(alpha=0.3)
    ax.set(title="SwiGLU's gate against ReLU and GELU\n(SwiGLU(x) = SiLU(x W1) ⊙ (x W3), then W2)",
           xlabel="input z", ylabel="activation(z)")
    ax.legend()
    fig.tight_layout()
    act_path = fig_dir / "04_activations.png"
    fig.savefig(act_path, dpi=90)
    plt.close(fig)

    parts = {
        "attention wq": block.attention.wq, "attention wk": block.attention.wk,
        "attention wv": block.attention.wv, "attention wo": block.attention.wo,
        "ffn w1 (gate)": block.feed_forward.w1, "ffn w2 (down)": block.feed_forward.w2,
        "ffn w3 (up)": block.feed_forward.w3,
        "norms": [block.attention_norm, block.ffn_norm],
    }
    counts = {name: sum(p.numel() for m in (mods if isinstance(mods, list) else [mods]) for p in m.parameters())
              for name, mods in parts.items()}
    n_attn = sum(v for k, v in counts.items() if k.startswith("attention"))
    n_ffn = sum(v for k, v in counts.items() if k.startswith("ffn"))
    total = sum(counts.values())
    fig, ax = plt.subplots(figsize=(8, 4.5))
    colors = ["tab:blue"] * 4 + ["tab:orange"] * 3 + ["tab:gray"]
    bars = ax.barh(list(counts), [v / 1e6 for v in counts.values()], color=colors)
    ax.bar_label(bars, [f"{v / 1e6:,.1f}M" if v >= 1e5 else f"{v:,}" for v in counts.values()], padding=3)
    ax.invert_yaxis()
    ax.set_xlim(0, max(counts.values()) / 1e6 * 1.15)
    ax.set(title=f"Parameters of one Llama 3 8B block: attention {n_attn / total:.0%}, "
                 f"feed-forward {n_ffn / total:.0%}\n(GQA: {block.attention.n_kv_heads} KV heads for "
                 f"{block.attention.n_heads} query heads shrink wk and wv)",
           xlabel="parameters (millions)")
    fig.tight_layout()
    params_path = fig_dir / "04_block_parameters.png"
    fig.savefig(params_path, dpi=90)
    plt.close(fig)
    return [act_path, params_path]


def main() -> None:
    parser = argparse.ArgumentParser(description="Chapter 4 demo: SwiGLU feed-forward and the transformer block.")
    parser.add_argument("--fig-dir", type=Path, default=Path("out/figures"), help="where figures go")
    args = parser.parse_args()
    torch.manual_seed(0)

    print(f"FFN hidden size for Llama 3 8B (dim 4096, multiple_of 1024, ffn_dim_multiplier 1.3): "
          f"{ffn_hidden_dim(4 * 4096, 1024, 1.3)} (should be 14336, as in Meta's checkpoint)")
    dim, seqlen = 64, 12
    block = TransformerBlock(0, dim=dim, n_heads=4, n_kv_heads=2, multiple_of=32, ffn_dim_multiplier=None,
                             norm_eps=1e-5, max_batch_size=2, max_seq_len=seqlen)
    print(f"FeedForward(dim={dim}): hidden size {block.feed_forward.w1.out_features}")
    freqs_cis = normalization_and_rope.precompute_freqs_cis(dim // 4, seqlen)
    x = torch.randn(2, seqlen, dim)
    with torch.no_grad():
        out = block(x, freqs_cis)
    n_attn = sum(p.numel() for p in block.attention.parameters())
    n_ffn = sum(p.numel() for p in block.feed_forward.parameters())
    print(f"TransformerBlock: x {tuple(x.shape)} -> out {tuple(out.shape)}; "
          f"parameters: attention {n_attn:,}, feed-forward {n_ffn:,}")
    # Zero the two projections that write into the residual stream: both branches then add nothing, and the
    # block passes its input through untouched, the path that lets deep LLaMAs train.
    with torch.no_grad():
        block.attention.wo.weight.zero_()
        block.feed_forward.w2.weight.zero_()
        passed = block(x, freqs_cis)
    print(f"  with wo and w2 zeroed, the residual path alone: out equals x exactly: {torch.equal(passed, x)} "
          f"(should be True)")

    # The real thing: one block with Llama 3 8B's sizes, on the meta device (shapes, no memory).
    with torch.device("meta"):
        big = TransformerBlock(0, dim=4096, n_heads=32, n_kv_heads=8, multiple_of=1024, ffn_dim_multiplier=1.3,
                               norm_eps=1e-5, max_batch_size=1, max_seq_len=8192)
    n_attn, n_ffn = (sum(p.numel() for p in m.parameters()) for m in (big.attention, big.feed_forward))
    # By hand, in columns of 4096: attention has wq and wo (4096 rows each) and wk and wv (1024 rows each: 8 KV
    # heads of 128); the feed-forward network has w1, w2 and w3 (14336 each).
    expected = 3 * 14336 / (3 * 14336 + 2 * 4096 + 2 * 1024)
    print(f"Llama 3 8B block: attention {n_attn:,}, feed-forward {n_ffn:,} parameters: the feed-forward network "
          f"holds {n_ffn / (n_attn + n_ffn):.1%} of the block's matrices (should be {expected:.1%}, about four fifths)")
    for path in plot_figures(big, args.fig_dir):
        print(f"figure: {path}")
    print("caption: SiLU is a smooth ReLU that lets small negatives through; "
          "in Llama 3 8B about four fifths of each block's parameters are in the feed-forward network.")


if __name__ == "__main__":
    main()
