"""Chapter 3: grouped-query causal self-attention with a KV cache.

Each token asks a question (query q), every earlier token offers a label (key k)
and a payload (value v). The output is a weighted sum of values:

    Attention(Q, K, V) = softmax(Q K^T / sqrt(head_dim) + mask) V

- Causal: the mask is -inf above the diagonal, so a token never sees the future.
- Grouped-query attention (GQA): LLaMA 3 has fewer key/value heads than query
  heads (8 KV heads for 32 query heads in the 8B model). Query head h reads KV
  head h // n_rep, where n_rep = n_heads // n_kv_heads. The KV cache shrinks by n_rep.
- RoPE (chapter 2) rotates q and k before the scores are taken.
- KV cache: generating one token at a time, the keys and values of earlier
  tokens never change, so we keep them and only compute the new token's.

Dropout (on the attention weights and on the output) is ours, not Meta's: their
`Attention` only runs trained weights, while our larger GPU preset needs it to
keep from overfitting Tiny Shakespeare. It is active only in training mode.

Two paths compute the same thing: a readable manual one (scores, mask, softmax)
and PyTorch's fused `F.scaled_dot_product_attention`, which is faster and never
stores the (seqlen x seqlen) score matrix. Tests check that they agree.

Needs: 02_normalization_and_rope.py (precompute_freqs_cis, apply_rotary_emb).
Run:   python 03_attention.py
"""

from __future__ import annotations

import argparse
import importlib
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# A module whose name starts with a digit cannot be imported with `import 02_...` (a Python name cannot start with a
# digit), so the chapters import each other with importlib, each under a name taken from its title.
normalization_and_rope = importlib.import_module("02_normalization_and_rope")


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """Repeat each KV head n_rep times: equal to torch.repeat_interleave(x, n_rep, dim=2).

    (bsz, seqlen, n_kv_heads, head_dim) -> (bsz, seqlen, n_kv_heads * n_rep, head_dim)
    """
    bsz, seqlen, n_kv_heads, head_dim = x.shape
    if n_rep == 1:
        return x
    return (
        x[:, :, :, None, :]
        .expand(bsz, seqlen, n_kv_heads, n_rep, head_dim)
        .reshape(bsz, seqlen, n_kv_heads * n_rep, head_dim)
    )


def causal_mask(q_len: int, kv_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean (q_len, kv_len) mask, True where a query may attend.

    The queries are the last q_len of kv_len positions (bottom-right aligned), so
    after a cached prefix of kv_len - q_len tokens, query i sees keys 0 .. prefix + i.
    """
    return torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(diagonal=kv_len - q_len)


def attention_probs(xq: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim)), with masked positions at -inf before the softmax.

    Args:
        xq: (bsz, n_heads, q_len, head_dim); keys: (bsz, n_heads, kv_len, head_dim); mask: (q_len, kv_len).
    Returns:
        (bsz, n_heads, q_len, kv_len), each row sums to 1.
    """
    scores = xq @ keys.transpose(2, 3) / math.sqrt(xq.shape[-1])  # (bsz, n_heads, q_len, kv_len)
    scores = scores.masked_fill(~mask, float("-inf"))
    return F.softmax(scores.float(), dim=-1).type_as(xq)  # softmax in float32


class Attention(nn.Module):
    """Multi-head causal self-attention with grouped-query heads and a KV cache (Meta's `Attention`)."""

    def __init__(
        self,
        *,
        dim: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        max_batch_size: int = 32,
        max_seq_len: int = 2048,
        dropout: float = 0.0,
        fused: bool = True,
    ):
        super().__init__()
        self.n_heads = n_heads
        self.n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if dim % n_heads or (dim // n_heads) % 2 or n_heads % self.n_kv_heads:
            raise ValueError(f"need dim / n_heads to be an even whole number (RoPE rotates pairs) and n_heads "
                             f"divisible by n_kv_heads; got dim={dim}, n_heads={n_heads}, n_kv_heads={self.n_kv_heads}")
        self.n_rep = self.n_heads // self.n_kv_heads
        self.head_dim = dim // n_heads
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self.dropout = dropout
        self.fused = fused  # True: F.scaled_dot_product_attention; False: the manual path

        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=False)
        self.resid_dropout = nn.Dropout(dropout)
        # Plain attributes, not buffers: the cache is never part of the state dict.
        self.cache_k: torch.Tensor | None = None
        self.cache_v: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, start_pos: int | None = None) -> torch.Tensor:
        """
        Args:
            x: (bsz, seqlen, dim)
            freqs_cis: (seqlen, head_dim // 2), RoPE rows for positions start_pos .. start_pos + seqlen - 1.
            start_pos: None in training (no cache). In generation, the position of x's first
                token: 0 starts a new sequence, later calls continue from the cache.
        Returns:
            (bsz, seqlen, dim)
        """
        bsz, seqlen, _ = x.shape
        xq, xk, xv = self.project(x, freqs_cis)

        if start_pos is None:
            keys, values = xk, xv
        else:
            keys, values = self._update_cache(xk, xv, start_pos)  # (bsz, start_pos + seqlen, n_kv_heads, head_dim)

        keys = repeat_kv(keys, self.n_rep)  # (bsz, kv_len, n_heads, head_dim)
        values = repeat_kv(values, self.n_rep)
        xq, keys, values = (t.transpose(1, 2) for t in (xq, keys, values))  # (bsz, n_heads, len, head_dim)
        dropout_p = self.dropout if self.training else 0.0
        kv_len = keys.shape[2]

        if self.fused:
            # Which keys each query may see, in the three cases generation and training meet:
            # - one new token (seqlen 1): it sees the whole cache, so no mask at all;
            # - a whole sequence (seqlen == kv_len: training, or a prompt at start_pos 0): the plain causal
            #   triangle, which SDPA builds itself with is_causal=True;
            # - a chunk after a cached prefix (1 < seqlen < kv_len): query i sees the prefix and the chunk up to
            #   itself. is_causal=True would be wrong here (SDPA aligns its triangle top-left, at key 0), so the
            #   mask is causal_mask's, aligned bottom-right.
            if seqlen == 1:
                mask, is_causal = None, False
            elif seqlen == kv_len:
                mask, is_causal = None, True
            else:
                mask, is_causal = causal_mask(seqlen, kv_len, x.device), False
            output = F.scaled_dot_product_attention(
                xq, keys, values, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal
            )
        else:
            probs = attention_probs(xq, keys, causal_mask(seqlen, kv_len, x.device))
            output = F.dropout(probs, dropout_p) @ values  # (bsz, n_heads, seqlen, head_dim)

        output = output.transpose(1, 2).reshape(bsz, seqlen, -1)  # (bsz, seqlen, n_heads * head_dim)
        return self.resid_dropout(self.wo(output))

    def project(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values of x, with RoPE applied to queries and keys."""
        bsz, seqlen, _ = x.shape
        xq = self.wq(x).view(bsz, seqlen, self.n_heads, self.head_dim)  # (bsz, seqlen, n_heads, head_dim)
        xk = self.wk(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)  # (bsz, seqlen, n_kv_heads, head_dim)
        xv = self.wv(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        xq, xk = normalization_and_rope.apply_rotary_emb(xq, xk, freqs_cis)
        return xq, xk, xv

    def _update_cache(self, xk: torch.Tensor, xv: torch.Tensor, start_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this chunk's keys and values at start_pos and return everything cached so far."""
        bsz, seqlen = xk.shape[:2]
        if bsz > self.max_batch_size or start_pos + seqlen > self.max_seq_len:
            raise ValueError(f"KV cache holds {self.max_batch_size} x {self.max_seq_len} tokens; "
                             f"got batch {bsz}, positions up to {start_pos + seqlen}")
        if self.cache_k is None or self.cache_k.device != xk.device or self.cache_k.dtype != xk.dtype:
            # Allocated lazily, on the device and in the dtype of a sequence's first call (start_pos 0).
            if start_pos > 0:  # a new cache now would hold none of the earlier keys
                raise ValueError(f"no KV cache in {xk.dtype} on {xk.device} for start_pos {start_pos}: the model "
                                 f"changed dtype or device mid-sequence; start the sequence again at start_pos 0")
            shape = (self.max_batch_size, self.max_seq_len, self.n_kv_heads, self.head_dim)
            self.cache_k = torch.zeros(shape, device=xk.device, dtype=xk.dtype)
            self.cache_v = torch.zeros(shape, device=xk.device, dtype=xk.dtype)
        self.cache_k[:bsz, start_pos : start_pos + seqlen] = xk
        self.cache_v[:bsz, start_pos : start_pos + seqlen] = xv
        return self.cache_k[:bsz, : start_pos + seqlen], self.cache_v[:bsz, : start_pos + seqlen]


def attention_weights(attn: Attention, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """The causal attention weights of `attn` on x, for plotting: (bsz, n_heads, seqlen, seqlen)."""
    xq, xk, _ = attn.project(x, freqs_cis)
    keys = repeat_kv(xk, attn.n_rep).transpose(1, 2)
    return attention_probs(xq.transpose(1, 2), keys, causal_mask(x.shape[1], x.shape[1], x.device))


def plot_figures(fig_dir: Path) -> list[Path]:
    """Causal attention weights per head of an untrained layer, and the KV cache filling up."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    dim, n_heads, n_kv_heads, seqlen = 32, 4, 2, 12
    attn = Attention(dim=dim, n_heads=n_heads, n_kv_heads=n_kv_heads, max_batch_size=1, max_seq_len=seqlen)
    freqs_cis = normalization_and_rope.precompute_freqs_cis(dim // n_heads, seqlen)
    x = torch.randn(1, seqlen, dim)
    with torch.no_grad():
        weights = attention_weights(attn, x, freqs_cis)[0]  # (n_heads, seqlen, seqlen)
    fig, axes = plt.subplots(1, n_heads, figsize=(14, 4.2), layout="constrained")
    group_colors = ["tab:blue", "tab:orange", "tab:green", "tab:red"]
    for h, ax in enumerate(axes):
        im = ax.imshow(weights[h].numpy(), cmap="Blues", vmin=0, vmax=1)
        color = group_colors[h // attn.n_rep % len(group_colors)]  # one colour per shared KV head
        ax.set_title(f"query head {h} → KV head {h // attn.n_rep}", color=color, fontweight="bold")
        ax.set_xlabel("key position")
        for spine in ax.spines.values():
            spine.set(color=color, linewidth=2.5)
    axes[0].set_ylabel("query position")
    fig.colorbar(im, ax=axes, label="attention weight", shrink=0.85)
    fig.suptitle(f"Causal attention of an untrained layer: nothing above the diagonal. GQA: {n_heads} query heads "
                 f"share {n_kv_heads} KV heads (same colour, same keys and values)")
    heads_path = fig_dir / "03_attention_heads.png"
    fig.savefig(heads_path, dpi=90)
    plt.close(fig)

    filled = torch.zeros(seqlen - 3, seqlen)  # 0 empty, 1 cached before this call, 2 written by it
    with torch.no_grad():
        attn(x[:, :4], freqs_cis[:4], start_pos=0)  # the prompt fills 4 slots at once
        filled[0, :4] = 2
        for pos in range(4, seqlen):
            attn(x[:, pos : pos + 1], freqs_cis[pos : pos + 1], start_pos=pos)
            written = attn.cache_k[0, :, 0].abs().sum(-1) > 0  # (max_seq_len,) slots holding a key
            filled[pos - 3] = written.float() + (torch.arange(seqlen) == pos).float()
    fig, ax = plt.subplots(figsize=(7, 5))
    cmap = matplotlib.colors.ListedColormap(["whitesmoke", "tab:green", "gold"])
    ax.imshow(filled.numpy(), cmap=cmap, vmin=0, vmax=2, aspect="auto")
    ax.set_xticks(range(seqlen))
    ax.set_xticks([i - 0.5 for i in range(seqlen)], minor=True)
    ax.set_yticks([i - 0.5 for i in range(len(filled))], minor=True)
    ax.grid(which="minor", color="white", linewidth=1.5)
    ax.tick_params(which="minor", length=0)
    ax.set(title="The KV cache filling up: a 4-token prompt, then one token per call",
           xlabel="cache slot (token position)", ylabel="forward call (0 = the prompt)")
    patches = [matplotlib.patches.Patch(facecolor=c, edgecolor="gray", label=t) for c, t in
               [("gold", "written by this call"), ("tab:green", "read from the cache"), ("whitesmoke", "empty")]]
    ax.legend(handles=patches, loc="upper right", fontsize=9)
    fig.tight_layout()
    cache_path = fig_dir / "03_kv_cache.png"
    fig.savefig(cache_path, dpi=90)
    plt.close(fig)
    return [heads_path, cache_path]


def main() -> None:
    parser = argparse.ArgumentParser(description="Chapter 3 demo: grouped-query attention and the KV cache.")
    parser.add_argument("--fig-dir", type=Path, default=Path("out/figures"), help="where figures go")
    args = parser.parse_args()
    torch.manual_seed(0)

    dim, n_heads, n_kv_heads, seqlen = 64, 8, 2, 10
    attn = Attention(dim=dim, n_heads=n_heads, n_kv_heads=n_kv_heads, max_batch_size=2, max_seq_len=seqlen).eval()
    freqs_cis = normalization_and_rope.precompute_freqs_cis(dim // n_heads, seqlen)
    x = torch.randn(2, seqlen, dim)  # (bsz, seqlen, dim)
    print(f"Attention(dim={dim}, n_heads={n_heads}, n_kv_heads={n_kv_heads}): n_rep={attn.n_rep}, "
          f"head_dim={attn.head_dim}")
    with torch.no_grad():
        out = attn(x, freqs_cis)
        print(f"  x {tuple(x.shape)} -> out {tuple(out.shape)}")

        attn.fused = False
        manual = attn(x, freqs_cis)
        attn.fused = True
        print(f"  manual path equals fused path: {torch.allclose(manual, out, atol=1e-5)} (should be True)")

        x2 = x.clone()
        x2[:, 6:] = torch.randn(2, seqlen - 6, dim)  # change the future
        out2 = attn(x2, freqs_cis)
        print(f"  changing tokens 6.. leaves outputs 0..5 unchanged: {torch.allclose(out[:, :6], out2[:, :6])} "
              f"(should be True: causal)")

        prefix = attn(x[:, :4], freqs_cis[:4], start_pos=0)
        steps = [attn(x[:, t : t + 1], freqs_cis[t : t + 1], start_pos=t) for t in range(4, seqlen)]
        cached = torch.cat([prefix, *steps], dim=1)
        print(f"  cached (prefix of 4, then one token at a time) equals uncached: "
              f"{torch.allclose(cached, out, atol=1e-5)} (should be True); cache_k {tuple(attn.cache_k.shape)}")
        chunk = attn(x[:, 4:7], freqs_cis[4:7], start_pos=4)  # a chunk of 3 after the cached prefix of 4
        print(f"  a chunk of 3 after the cached prefix (the bottom-right mask) equals uncached: "
              f"{torch.allclose(chunk, out[:, 4:7], atol=1e-5)} (should be True)")
    for path in plot_figures(args.fig_dir):
        print(f"figure: {path}")
    print("caption: each query attends only to itself and earlier keys; the cache gains one slot per new token.")


if __name__ == "__main__":
    main()
