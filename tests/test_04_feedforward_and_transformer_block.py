"""Chapter 4: SwiGLU feed-forward with Meta's hidden-size rule, and the pre-norm transformer block."""

from __future__ import annotations

import importlib

import pytest
import torch

normalization_and_rope = importlib.import_module("02_normalization_and_rope")
blocks = importlib.import_module("04_feedforward_and_transformer_block")


@pytest.mark.parametrize(
    ("dim", "multiple_of", "ffn_dim_multiplier", "hidden"),
    [
        (4096, 1024, 1.3, 14336),  # Llama 3 8B
        (8192, 4096, 1.3, 28672),  # Llama 3 70B
        (16384, 4096, 1.2, 53248),  # Llama 3.1 405B
        (4096, 256, None, 11008),  # Llama 2 7B: no multiplier
    ],
)
def test_ffn_hidden_size_on_meta_configs(dim, multiple_of, ffn_dim_multiplier, hidden):
    assert blocks.ffn_hidden_dim(4 * dim, multiple_of, ffn_dim_multiplier) == hidden


def test_feedforward_hidden_size_on_the_meta_device():
    """The real 8B layer, built without allocating memory, has Meta's weight shapes."""
    with torch.device("meta"):
        ffn = blocks.FeedForward(dim=4096, hidden_dim=4 * 4096, multiple_of=1024, ffn_dim_multiplier=1.3)
    assert ffn.w1.weight.shape == ffn.w3.weight.shape == (14336, 4096)
    assert ffn.w2.weight.shape == (4096, 14336)


def test_feedforward_is_swiglu():
    """FFN(x) = w2(silu(w1 x) * w3 x), with silu(z) = z * sigmoid(z) and no biases."""
    torch.manual_seed(0)
    ffn = blocks.FeedForward(dim=16, hidden_dim=64, multiple_of=8, ffn_dim_multiplier=None)
    hidden = ffn.w1.out_features
    assert hidden == 48  # 2/3 of 64 = 42, rounded up to a multiple of 8
    assert all(layer.bias is None for layer in (ffn.w1, ffn.w2, ffn.w3))
    x = torch.randn(2, 5, 16)
    gate = x @ ffn.w1.weight.T
    expected = (gate * torch.sigmoid(gate) * (x @ ffn.w3.weight.T)) @ ffn.w2.weight.T
    with torch.no_grad():
        torch.testing.assert_close(ffn(x), expected)


def make_block(layer_id: int = 0) -> blocks.TransformerBlock:
    torch.manual_seed(layer_id)
    block = blocks.TransformerBlock(layer_id, dim=32, n_heads=4, n_kv_heads=2, multiple_of=16, ffn_dim_multiplier=None,
                                    norm_eps=1e-5, max_batch_size=2, max_seq_len=10).eval()
    with torch.no_grad():  # distinct gains, so swapping the two norms would show
        block.attention_norm.weight.uniform_(0.5, 1.5)
        block.ffn_norm.weight.uniform_(0.5, 1.5)
    return block


def test_block_is_pre_norm_with_two_residuals():
    block = make_block()
    x = torch.randn(2, 10, 32)
    freqs_cis = normalization_and_rope.precompute_freqs_cis(8, 10)
    with torch.no_grad():
        out = block(x, freqs_cis)
        h = x + block.attention(block.attention_norm(x), freqs_cis)
        expected = h + block.feed_forward(block.ffn_norm(h))
    assert out.shape == x.shape == (2, 10, 32)
    torch.testing.assert_close(out, expected)


def test_block_state_dict_keys_follow_meta():
    keys = set(make_block().state_dict())
    assert keys == {
        "attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "attention.wo.weight",
        "feed_forward.w1.weight", "feed_forward.w2.weight", "feed_forward.w3.weight",
        "attention_norm.weight", "ffn_norm.weight",
    }


def test_block_cached_equals_uncached():
    block = make_block()
    x = torch.randn(1, 10, 32)
    freqs_cis = normalization_and_rope.precompute_freqs_cis(8, 10)
    with torch.no_grad():
        full = block(x, freqs_cis)
        first = block(x[:, :6], freqs_cis[:6], start_pos=0)
        rest = block(x[:, 6:], freqs_cis[6:], start_pos=6)
    torch.testing.assert_close(torch.cat([first, rest], dim=1), full, atol=1e-5, rtol=1e-5)
