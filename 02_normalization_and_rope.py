"""Chapter 2: RMSNorm and rotary position embeddings (RoPE).

RMSNorm. Before attention and before the feed-forward network, LLaMA rescales each
token vector to unit root-mean-square, then multiplies by a learned gain:

    RMSNorm(x) = x / sqrt(mean(x_i^2) + eps) * weight

Unlike LayerNorm it does not subtract the mean and has no bias: cheaper, and just
as good in practice. The statistics are computed in float32 even when the model
runs in bfloat16: bfloat16 has float32's exponent range, so nothing underflows, but
only an 8-bit mantissa (about 2 to 3 significant digits), too coarse for a mean of
thousands of squares.

RoPE. Attention by itself does not know where tokens are. LLaMA rotates each query
and key vector by an angle proportional to its position m. Dimensions (2i, 2i+1)
form a pair, read as the complex number x_2i + j*x_2i+1, and rotate by m * theta_i:

    theta_i = rope_theta ** (-2i / head_dim),   q'_m = q_m * e^(j*m*theta_i)

A rotation keeps vector lengths, and q'_m . k'_n depends only on m - n: the
attention score sees relative position. Early pairs spin fast, late pairs slowly.

Llama 3.1's frequency scaling (`use_scaled_rope`, used by the real checkpoints of chapter 5).
Llama 3 was trained on 8,192-token windows; 3.1 stretches RoPE to 131,072 by slowing the slow
pairs down. Pair i makes a full turn every 2*pi / theta_i positions (its wavelength): pairs with
wavelengths over 8,192 turn `scale_factor` times slower (8 for Llama 3.1, 32 for Llama 3.2 1B and 3B),
pairs under 2,048 are kept, and the band between is slowed by a blend of the two.

Needs: nothing from the other chapters.
Run:   python 02_normalization_and_rope.py
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square normalization with a learnable per-channel gain (Meta's `RMSNorm`)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in float32, then return to the input's dtype before the gain.
        output = self._norm(x.float()).type_as(x)
        return output * self.weight


def precompute_freqs_cis(dim: int, end: int, theta: float = 500000.0, use_scaled: bool = False,
                         scale_factor: float = 8.0) -> torch.Tensor:
    """The rotations e^(j * m * theta_i) for every position m < end and pair i < dim / 2.

    Args:
        dim: head dimension (even).
        end: number of positions.
        theta: RoPE base; LLaMA 3 uses 500000 (LLaMA 2 used 10000).
        use_scaled: apply Llama 3.1's frequency scaling with `scale_factor`.
    Returns:
        complex64 tensor of shape (end, dim // 2).
    """
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: (dim // 2)].float() / dim))  # (dim // 2,)
    if use_scaled:
        freqs = apply_scaling(freqs, scale_factor)
    t = torch.arange(end, dtype=torch.float32)
    freqs = torch.outer(t, freqs)  # (end, dim // 2): angle m * theta_i
    return torch.polar(torch.ones_like(freqs), freqs)  # cos + j sin


def apply_scaling(freqs: torch.Tensor, scale_factor: float, low_freq_factor: float = 1.0,
                  high_freq_factor: float = 4.0, old_context_len: int = 8192) -> torch.Tensor:
    """Llama 3.1's RoPE scaling of precompute_freqs_cis's frequencies (Meta's `apply_scaling`, with the factor
    as a parameter).

    Args:
        freqs: (dim // 2,) frequencies theta_i.
        scale_factor: 8 for Llama 3.1, 32 for Llama 3.2 1B and 3B.
    Returns:
        (dim // 2,): the frequencies of long wavelengths divided by scale_factor (their wavelengths multiplied),
        short ones kept, the band between blended.
    """
    wavelen = 2 * math.pi / freqs
    low_freq_wavelen = old_context_len / low_freq_factor  # longer than this: scaled
    high_freq_wavelen = old_context_len / high_freq_factor  # shorter than this: kept
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)  # 0 .. 1 in the band
    blended = (1 - smooth) * freqs / scale_factor + smooth * freqs
    scaled = torch.where(wavelen > low_freq_wavelen, freqs / scale_factor, blended)
    return torch.where(wavelen < high_freq_wavelen, freqs, scaled)


def reshape_for_broadcast(freqs_cis: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(seqlen, head_dim // 2) -> (1, seqlen, 1, head_dim // 2), to match x's (bsz, seqlen, heads, pairs)."""
    assert freqs_cis.shape == (x.shape[1], x.shape[-1])
    shape = [d if i in (1, x.ndim - 1) else 1 for i, d in enumerate(x.shape)]
    return freqs_cis.view(*shape)


def apply_rotary_emb(
    xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate queries and keys by their positions.

    Args:
        xq: (bsz, seqlen, n_heads, head_dim)
        xk: (bsz, seqlen, n_kv_heads, head_dim)
        freqs_cis: (seqlen, head_dim // 2), the rows for these positions.
    Returns:
        xq, xk rotated, same shapes and dtypes.
    """
    # Adjacent pairs (2i, 2i+1) become one complex number each.
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))  # (bsz, seqlen, n_heads, head_dim // 2)
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    freqs_cis = reshape_for_broadcast(freqs_cis, xq_)
    xq_out = torch.view_as_real(xq_ * freqs_cis).flatten(3)  # (bsz, seqlen, n_heads, head_dim)
    xk_out = torch.view_as_real(xk_ * freqs_cis).flatten(3)
    return xq_out.type_as(xq), xk_out.type_as(xk)


def plot_figures(fig_dir: Path, head_dim: int = 64, n_pos: int = 128) -> list[Path]:
    """RoPE angles per pair and position; q.k against distance; activations before/after RMSNorm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig_dir.mkdir(parents=True, exist_ok=True)
    freqs_cis = precompute_freqs_cis(head_dim, n_pos)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    im = axes[0].imshow(torch.angle(freqs_cis).T.numpy(), aspect="auto", cmap="twilight", origin="lower",
                        interpolation="nearest")
    axes[0].set(title=f"RoPE angle m·θᵢ per dimension pair (head_dim {head_dim})", xlabel="position m",
                ylabel="pair i (low = fast, high = slow)")
    fig.colorbar(im, ax=axes[0], label="angle, wrapped to [-π, π] (radians)")
    # The same q and k placed at every distance: the score depends on distance alone.
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 1, head_dim, generator=g).expand(1, n_pos, 1, head_dim)
    rq, rk = apply_rotary_emb(q, q, freqs_cis)
    scores = (rq[0, :, 0] @ rk[0, 0, 0]).tolist()  # q at m, k at 0
    axes[1].plot(range(n_pos), scores)
    axes[1].set(title="One vector as q and k, moved apart:\nq·k peaks at distance 0, then oscillates",
                xlabel="relative distance m − n", ylabel="q·k after rotation")
    fig.tight_layout()
    rope_path = fig_dir / "02_rope.png"
    fig.savefig(rope_path, dpi=90)
    plt.close(fig)

    x = torch.randn(256, head_dim, generator=g) * torch.linspace(0.2, 6.0, 256)[:, None]
    y = RMSNorm(head_dim)(x).detach()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(x.pow(2).mean(-1).sqrt(), label="before RMSNorm")
    ax.plot(y.pow(2).mean(-1).sqrt(), label="after RMSNorm (weight = 1)")
    ax.set(title=f"RMSNorm rescales every token vector to RMS 1 ({len(x)} tokens, dim {head_dim})",
           xlabel="token (scaled up from left to right)", ylabel="root mean square of the vector")
    ax.legend()
    fig.tight_layout()
    norm_path = fig_dir / "02_rmsnorm.png"
    fig.savefig(norm_path, dpi=90)
    plt.close(fig)

    # Llama 3's real head: head_dim 128, theta 500000.
    freqs = 1.0 / (500000.0 ** (torch.arange(0, 128, 2).float() / 128))  # (64,)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(2 * math.pi / freqs, label="Llama 3 (no scaling)", lw=2.5)
    for factor, name in [(8, "Llama 3.1"), (32, "Llama 3.2 1B and 3B")]:
        ax.plot(2 * math.pi / apply_scaling(freqs, factor), label=f"{name}: factor {factor}")
    ax.axhspan(2048, 8192, color="gray", alpha=0.15, label="blended band (2,048 to 8,192)")
    ax.axhline(8192, color="gray", ls="--", lw=1)
    ax.set_yscale("log")
    ax.set(title="use_scaled_rope: pairs with wavelengths over 2,048 turn slower\n(by the whole factor over 8,192)",
           xlabel="pair i (head_dim 128, rope_theta 500000)", ylabel="wavelength 2π/θᵢ (positions, log scale)")
    ax.legend()
    fig.tight_layout()
    scaling_path = fig_dir / "02_rope_scaling.png"
    fig.savefig(scaling_path, dpi=90)
    plt.close(fig)
    return [rope_path, norm_path, scaling_path]


def main() -> None:
    parser = argparse.ArgumentParser(description="Chapter 2 demo: RMSNorm and RoPE.")
    parser.add_argument("--fig-dir", type=Path, default=Path("out/figures"), help="where figures go")
    args = parser.parse_args()
    torch.manual_seed(0)

    x = torch.randn(2, 5, 16) * 7.0  # (bsz, seqlen, dim)
    y = RMSNorm(16)(x)
    print(f"RMSNorm: {tuple(x.shape)} -> {tuple(y.shape)}")
    rms_before, rms_after = x.pow(2).mean(-1).sqrt().mean(), y.pow(2).mean(-1).sqrt().mean()
    print(f"  RMS before {rms_before:.3f}, after {rms_after:.3f} (should be 1.000)")

    head_dim, seqlen = 8, 16
    freqs_cis = precompute_freqs_cis(head_dim, seqlen)
    print(f"freqs_cis: {tuple(freqs_cis.shape)} {freqs_cis.dtype}")
    q = torch.randn(1, seqlen, 2, head_dim)  # (bsz, seqlen, n_heads, head_dim)
    k = torch.randn(1, seqlen, 1, head_dim)  # (bsz, seqlen, n_kv_heads, head_dim)
    rq, rk = apply_rotary_emb(q, k, freqs_cis)
    print(f"apply_rotary_emb: q {tuple(rq.shape)}, k {tuple(rk.shape)}")
    print(f"  every vector keeps its length: {torch.allclose(rq.norm(dim=-1), q.norm(dim=-1), atol=1e-5)} "
          f"(should be True)")

    # Put the same q and k at positions (m, n) and (m + 5, n + 5): the score is unchanged.
    qv = torch.randn(head_dim).expand(1, seqlen, 1, head_dim)
    kv = torch.randn(head_dim).expand(1, seqlen, 1, head_dim)
    rq, rk = apply_rotary_emb(qv, kv, freqs_cis)
    s1, s2 = rq[0, 7, 0] @ rk[0, 3, 0], rq[0, 12, 0] @ rk[0, 8, 0]
    print(f"  q.k at positions (7, 3) = {s1:.4f}, at (12, 8) = {s2:.4f} (should be equal: only m - n counts)")

    # Llama 3.1's scaling on Llama 3's real head (head_dim 128): which pairs change, and by how much.
    freqs = 1.0 / (500000.0 ** (torch.arange(0, 128, 2).float() / 128))
    ratio = freqs / apply_scaling(freqs, scale_factor=32)
    kept, divided = torch.isclose(ratio, torch.tensor(1.0)), torch.isclose(ratio, torch.tensor(32.0))
    # Expected, by hand: pair i's wavelength is 2 pi * 500000 ** (i / 64), under 2,048 positions (kept) while
    # i < 64 * ln(2048 / 2 pi) / ln(500000) = 28.2, over 8,192 (divided) once i > 64 * ln(8192 / 2 pi) / ln(500000)
    # = 34.98: pairs 0-28 kept, 29-34 blended, 35-63 divided.
    first_blended, first_divided = (math.ceil(64 * math.log(wavelength / (2 * math.pi)) / math.log(500000.0))
                                    for wavelength in (2048, 8192))
    print(f"use_scaled_rope (factor 32) on Llama 3's 64 pairs: {int(kept.sum())} fast pairs kept, "
          f"{int((~kept & ~divided).sum())} in the band slowed by less, {int(divided.sum())} slow pairs divided by 32 "
          f"(should be {first_blended}, {first_divided - first_blended} and {64 - first_divided}, from the 2,048 and "
          f"8,192 wavelength thresholds)")
    for path in plot_figures(args.fig_dir):
        print(f"figure: {path}")
    print("caption: low pairs spin fast and high pairs slowly; the score depends on distance only; "
          "RMSNorm brings every token to RMS 1; scaling slows the pairs with wavelengths over 2,048 positions.")


if __name__ == "__main__":
    main()
