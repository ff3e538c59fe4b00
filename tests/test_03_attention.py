"""Chapter 3: grouped-query causal attention, its two paths, and the KV cache."""

from __future__ import annotations

import importlib
import math

import pytest
import torch

normalization_and_rope = importlib.import_module("02_normalization_and_rope")
attention = importlib.import_module("03_attention")

DIM, SEQLEN = 32, 12


def make_attention(n_heads: int = 4, n_kv_heads: int | None = 2, seed: int = 0, **kwargs) -> attention.Attention:
    torch.manual_seed(seed)
    return attention.Attention(dim=DIM, n_heads=n_heads, n_kv_heads=n_kv_heads, max_batch_size=2, max_seq_len=SEQLEN,
                               **kwargs).eval()


def inputs_for(attn: attention.Attention, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(2, SEQLEN, DIM, generator=torch.Generator().manual_seed(seed))  # (bsz, seqlen, dim)
    return x, normalization_and_rope.precompute_freqs_cis(attn.head_dim, SEQLEN)


def reference_multi_head_attention(attn: attention.Attention, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Textbook causal multi-head attention, one head at a time, written without anything from 03_attention."""
    bsz, seqlen, _ = x.shape
    n_heads, head_dim = attn.n_heads, attn.head_dim
    q = (x @ attn.wq.weight.T).view(bsz, seqlen, n_heads, head_dim)
    k = (x @ attn.wk.weight.T).view(bsz, seqlen, n_heads, head_dim)
    v = (x @ attn.wv.weight.T).view(bsz, seqlen, n_heads, head_dim)
    q, k = normalization_and_rope.apply_rotary_emb(q, k, freqs_cis)
    future = torch.triu(torch.ones(seqlen, seqlen, dtype=torch.bool), diagonal=1)  # key after query
    heads = []
    for h in range(n_heads):
        scores = q[:, :, h] @ k[:, :, h].transpose(1, 2) / math.sqrt(head_dim)  # (bsz, seqlen, seqlen)
        scores = scores.masked_fill(future, float("-inf"))
        heads.append(torch.softmax(scores, dim=-1) @ v[:, :, h])  # (bsz, seqlen, head_dim)
    return torch.cat(heads, dim=-1) @ attn.wo.weight.T


# ----------------------------------------------------------------------------- repeat_kv and GQA


@pytest.mark.parametrize("n_rep", [1, 2, 4])
def test_repeat_kv_equals_repeat_interleave(n_rep):
    x = torch.randn(2, 5, 3, 8)  # (bsz, seqlen, n_kv_heads, head_dim)
    out = attention.repeat_kv(x, n_rep)
    assert out.shape == (2, 5, 3 * n_rep, 8)
    assert torch.equal(out, torch.repeat_interleave(x, n_rep, dim=2))  # query head h reads KV head h // n_rep


@pytest.mark.parametrize("fused", [True, False])
def test_gqa_with_as_many_kv_heads_as_heads_is_plain_multi_head_attention(fused):
    attn = make_attention(n_heads=4, n_kv_heads=4, fused=fused)
    x, freqs_cis = inputs_for(attn)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, freqs_cis), reference_multi_head_attention(attn, x, freqs_cis))


def test_gqa_shares_each_kv_head_with_n_rep_query_heads():
    """Grouped-query attention equals multi-head attention whose K and V heads are copied in blocks of n_rep."""
    gqa = make_attention(n_heads=4, n_kv_heads=2)
    mha = make_attention(n_heads=4, n_kv_heads=4)
    head_dim = gqa.head_dim
    with torch.no_grad():
        mha.wq.weight.copy_(gqa.wq.weight)
        mha.wo.weight.copy_(gqa.wo.weight)
        for name in ("wk", "wv"):
            w = getattr(gqa, name).weight.view(2, head_dim, DIM)  # (n_kv_heads, head_dim, dim)
            getattr(mha, name).weight.copy_(w.repeat_interleave(2, dim=0).reshape(4 * head_dim, DIM))
        x, freqs_cis = inputs_for(gqa)
        torch.testing.assert_close(gqa(x, freqs_cis), mha(x, freqs_cis))
    assert gqa.wk.weight.shape == (2 * head_dim, DIM)  # GQA's smaller K and V projections


def test_heads_must_divide_evenly():
    with pytest.raises(ValueError):
        attention.Attention(dim=DIM, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError):
        attention.Attention(dim=30, n_heads=4, n_kv_heads=2)


# ----------------------------------------------------------------------------- causality and the two paths


@pytest.mark.parametrize("fused", [True, False])
def test_future_tokens_do_not_change_past_outputs(fused):
    attn = make_attention(fused=fused)
    x, freqs_cis = inputs_for(attn)
    changed = x.clone()
    changed[:, 7:] = torch.randn(2, SEQLEN - 7, DIM)
    with torch.no_grad():
        out, out_changed = attn(x, freqs_cis), attn(changed, freqs_cis)
    torch.testing.assert_close(out[:, :7], out_changed[:, :7])
    assert not torch.allclose(out[:, 7:], out_changed[:, 7:])  # later positions do see the change


def test_attention_weights_are_causal_probabilities():
    attn = make_attention()
    x, freqs_cis = inputs_for(attn)
    with torch.no_grad():
        weights = attention.attention_weights(attn, x, freqs_cis)  # (bsz, n_heads, seqlen, seqlen)
    assert weights.shape == (2, 4, SEQLEN, SEQLEN)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, SEQLEN))
    past = torch.ones(SEQLEN, SEQLEN, dtype=torch.bool).tril()  # key at or before the query
    assert torch.all(weights[..., ~past] == 0)
    assert torch.all(weights[..., past] > 0)


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
def test_manual_path_equals_fused_path(n_kv_heads):
    attn = make_attention(n_kv_heads=n_kv_heads)
    x, freqs_cis = inputs_for(attn)
    with torch.no_grad():
        fused = attn(x, freqs_cis)
        attn.fused = False
        manual = attn(x, freqs_cis)
    torch.testing.assert_close(manual, fused)


def run_with_cache(attn: attention.Attention, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """A prefix of 5 tokens, then a chunk of 4, then one token at a time: how generation feeds the cache."""
    pieces, pos = [], 0
    for length in (5, 4, 1, 1, 1):
        pieces.append(attn(x[:, pos : pos + length], freqs_cis[pos : pos + length], start_pos=pos))
        pos += length
    assert pos == SEQLEN
    return torch.cat(pieces, dim=1)


@pytest.mark.parametrize("fused", [True, False])
def test_cached_attention_equals_uncached(fused):
    """The chunk after the prefix needs a bottom-right aligned causal mask to match."""
    attn = make_attention(fused=fused)
    x, freqs_cis = inputs_for(attn)
    with torch.no_grad():
        uncached = attn(x, freqs_cis)
        cached = run_with_cache(attn, x, freqs_cis)
    torch.testing.assert_close(cached, uncached, atol=1e-5, rtol=1e-5)


def test_manual_and_fused_agree_with_a_cache():
    attn = make_attention()
    x, freqs_cis = inputs_for(attn)
    with torch.no_grad():
        fused = run_with_cache(attn, x, freqs_cis)
        attn.fused = False
        manual = run_with_cache(attn, x, freqs_cis)
    torch.testing.assert_close(manual, fused)


# ----------------------------------------------------------------------------- the KV cache


def test_cache_is_lazy_and_untouched_without_start_pos():
    attn = make_attention()
    x, freqs_cis = inputs_for(attn)
    with torch.no_grad():
        attn(x, freqs_cis)  # training / evaluation call
        assert attn.cache_k is None and attn.cache_v is None
        attn(x[:1, :3], freqs_cis[:3], start_pos=0)
    assert attn.cache_k.shape == (2, SEQLEN, 2, attn.head_dim)  # (max_batch_size, max_seq_len, n_kv_heads, head_dim)
    assert attn.cache_k.dtype == x.dtype and attn.cache_k.device == x.device
    assert "cache_k" not in attn.state_dict() and "cache_v" not in attn.state_dict()


def test_cache_overflow_is_a_clear_error():
    attn = make_attention()
    x, freqs_cis = inputs_for(attn)
    with torch.no_grad(), pytest.raises(ValueError, match="KV cache"):
        attn(x[:, :2], freqs_cis[:2], start_pos=SEQLEN - 1)


def test_cache_in_another_dtype_mid_sequence_is_an_error_not_a_silent_reset():
    attn = make_attention()
    x, freqs_cis = inputs_for(attn)
    with torch.no_grad():
        attn(x[:, :4], freqs_cis[:4], start_pos=0)
        attn.to(torch.float64)
        with pytest.raises(ValueError, match="start_pos 0"):
            attn(x[:, 4:5].double(), freqs_cis[4:5], start_pos=4)
        attn(x[:, :4].double(), freqs_cis[:4], start_pos=0)  # a new sequence gets a new cache
    assert attn.cache_k.dtype == torch.float64


# ----------------------------------------------------------------------------- dropout


@pytest.mark.parametrize("fused", [True, False])
def test_dropout_is_off_in_eval_mode_and_on_in_training(fused):
    """Dropout is ours (the GPU preset uses 0.3): evaluation and generation must not drop anything."""
    plain = make_attention(fused=fused)
    dropped = make_attention(fused=fused, dropout=0.5)  # same seed, same weights
    x, freqs_cis = inputs_for(plain)
    with torch.no_grad():
        assert torch.equal(dropped(x, freqs_cis), plain(x, freqs_cis))
        dropped.train()
        torch.manual_seed(0)
        assert not torch.allclose(dropped(x, freqs_cis), plain(x, freqs_cis))
