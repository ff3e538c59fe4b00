"""Chapter 2: RMSNorm and rotary position embeddings, checked against their formulas."""

from __future__ import annotations

import importlib
import math

import pytest
import torch

normalization_and_rope = importlib.import_module("02_normalization_and_rope")


# ----------------------------------------------------------------------------- RMSNorm


@pytest.mark.parametrize("eps", [1e-5, 1.0])
def test_rmsnorm_matches_its_formula(eps):
    """RMSNorm(x) = x / sqrt(mean(x^2) + eps) * weight (no mean subtraction, no bias)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 16, generator=g) * 3 + 1  # a non-zero mean, which RMSNorm must not remove
    norm = normalization_and_rope.RMSNorm(16, eps=eps)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(16, generator=g) + 0.5)
    expected = x / torch.sqrt((x**2).mean(dim=-1, keepdim=True) + eps) * norm.weight
    torch.testing.assert_close(norm(x), expected)


def test_rmsnorm_output_has_unit_rms_and_a_learnable_gain():
    norm = normalization_and_rope.RMSNorm(64)
    x = torch.randn(3, 7, 64) * 25.0
    rms = norm(x).pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.ones(3, 7), atol=1e-4, rtol=0)
    assert [name for name, _ in norm.named_parameters()] == ["weight"]
    assert torch.equal(norm.weight, torch.ones(64))


def test_rmsnorm_computes_in_float32_for_bfloat16_input():
    """A bf16 model gets bf16 out, equal to the float32 computation rounded once at the end.

    Computing the statistics in bf16 instead rounds several times and misses about a third of these values.
    """
    norm = normalization_and_rope.RMSNorm(256).to(torch.bfloat16)
    x = (torch.randn(4, 256, generator=torch.Generator().manual_seed(1)) * 3).to(torch.bfloat16)
    out = norm(x)
    assert out.dtype == torch.bfloat16
    xf = x.float()
    expected = (xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + norm.eps)).to(torch.bfloat16)
    assert (out == expected).float().mean() > 0.99
    torch.testing.assert_close(out, expected, atol=0, rtol=2**-7)  # and the rest one bf16 rounding apart


# ----------------------------------------------------------------------------- RoPE


def test_freqs_cis_are_unit_rotations_by_m_times_theta_i():
    dim, end, theta = 8, 12, 500000.0
    freqs_cis = normalization_and_rope.precompute_freqs_cis(dim, end, theta)
    assert freqs_cis.shape == (end, dim // 2)
    assert freqs_cis.dtype == torch.complex64
    m = torch.arange(end, dtype=torch.float64)[:, None]
    theta_i = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # theta^(-2i/dim)
    expected = torch.exp(1j * m * theta_i)
    torch.testing.assert_close(freqs_cis.to(torch.complex128), expected, atol=1e-5, rtol=0)


def reference_rope(x: torch.Tensor, theta: float = 500000.0) -> torch.Tensor:
    """Pairs (2i, 2i+1) as complex numbers a + jb, multiplied by e^(j m theta_i). x: (bsz, seqlen, heads, head_dim)."""
    x = x.double()
    head_dim = x.shape[-1]
    z = torch.complex(x[..., 0::2], x[..., 1::2])  # (bsz, seqlen, heads, head_dim // 2)
    m = torch.arange(x.shape[1], dtype=torch.float64)[None, :, None, None]
    theta_i = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    z = z * torch.exp(1j * m * theta_i)
    out = torch.empty_like(x)
    out[..., 0::2], out[..., 1::2] = z.real, z.imag
    return out


def test_apply_rotary_emb_equals_the_complex_number_formula():
    g = torch.Generator().manual_seed(0)
    xq = torch.randn(2, 10, 4, 16, generator=g)
    xk = torch.randn(2, 10, 2, 16, generator=g)
    freqs_cis = normalization_and_rope.precompute_freqs_cis(16, 10)
    rq, rk = normalization_and_rope.apply_rotary_emb(xq, xk, freqs_cis)
    assert rq.shape == xq.shape and rk.shape == xk.shape
    torch.testing.assert_close(rq.double(), reference_rope(xq), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rk.double(), reference_rope(xk), atol=1e-5, rtol=1e-5)


def test_rope_keeps_vector_norms():
    g = torch.Generator().manual_seed(1)
    xq, xk = torch.randn(1, 32, 2, 8, generator=g), torch.randn(1, 32, 1, 8, generator=g)
    rq, rk = normalization_and_rope.apply_rotary_emb(xq, xk, normalization_and_rope.precompute_freqs_cis(8, 32))
    torch.testing.assert_close(rq.norm(dim=-1), xq.norm(dim=-1))
    torch.testing.assert_close(rk.norm(dim=-1), xk.norm(dim=-1))
    assert not torch.allclose(rq[:, 1:], xq[:, 1:])  # but it does rotate


def test_rope_uses_adjacent_pairs():
    """Meta's convention: dimensions (2i, 2i+1) rotate together. Pair 0 spins at 1 radian per position."""
    head_dim, seqlen = 8, 4
    e0 = torch.zeros(1, seqlen, 1, head_dim)
    e0[..., 0] = 1.0  # unit vector along dimension 0 at every position
    freqs_cis = normalization_and_rope.precompute_freqs_cis(head_dim, seqlen)
    rotated, _ = normalization_and_rope.apply_rotary_emb(e0, e0, freqs_cis)
    m = torch.arange(seqlen, dtype=torch.float32)
    torch.testing.assert_close(rotated[0, :, 0, 0], torch.cos(m))
    torch.testing.assert_close(rotated[0, :, 0, 1], torch.sin(m))  # its partner is dimension 1 ...
    torch.testing.assert_close(rotated[0, :, 0, 2:], torch.zeros(seqlen, head_dim - 2))  # ... not head_dim // 2


def test_rope_position_zero_is_the_identity():
    x = torch.randn(2, 1, 3, 8)
    rq, rk = normalization_and_rope.apply_rotary_emb(x, x, normalization_and_rope.precompute_freqs_cis(8, 1))
    torch.testing.assert_close(rq, x)


def test_rotated_scores_depend_only_on_relative_position():
    head_dim, seqlen = 16, 24
    g = torch.Generator().manual_seed(2)
    q = torch.randn(head_dim, generator=g).expand(1, seqlen, 1, head_dim)  # the same q at every position
    k = torch.randn(head_dim, generator=g).expand(1, seqlen, 1, head_dim)
    freqs_cis = normalization_and_rope.precompute_freqs_cis(head_dim, seqlen, theta=10000.0)
    rq, rk = normalization_and_rope.apply_rotary_emb(q, k, freqs_cis)
    scores = rq[0, :, 0] @ rk[0, :, 0].T  # scores[m, n] = q at m . k at n
    for shift in (1, 5, 11):
        torch.testing.assert_close(scores[shift:, shift:], scores[:-shift, :-shift], atol=1e-4, rtol=1e-4)
    assert not torch.isclose(scores[7, 3], scores[7, 6], atol=1e-3)  # a different distance, a different score


def test_rope_keeps_the_input_dtype():
    x = torch.randn(1, 6, 2, 8, dtype=torch.bfloat16)
    rq, rk = normalization_and_rope.apply_rotary_emb(x, x[:, :, :1], normalization_and_rope.precompute_freqs_cis(8, 6))
    assert rq.dtype == rk.dtype == torch.bfloat16


# ----------------------------------------------------------------------------- Llama 3.1's RoPE scaling


def llama3_freqs(head_dim: int = 128, theta: float = 500000.0) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))


@pytest.mark.parametrize("factor", [8.0, 32.0])
def test_scaled_frequencies_equal_transformers_llama3_rope(factor):
    """transformers' own implementation of rope_type "llama3" is the reference, for both factors."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(hidden_size=4096, num_attention_heads=32, max_position_embeddings=131072,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": factor,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192})
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    scaled = normalization_and_rope.apply_scaling(llama3_freqs(), factor)
    torch.testing.assert_close(scaled, expected.float(), rtol=1e-6, atol=0)


def test_scaling_keeps_fast_pairs_and_divides_slow_ones_by_the_factor():
    freqs = llama3_freqs()
    scaled = normalization_and_rope.apply_scaling(freqs, scale_factor=32)
    wavelen = 2 * math.pi / freqs
    fast, slow = wavelen < 2048, wavelen > 8192
    assert fast.sum() > 0 and slow.sum() > 0
    torch.testing.assert_close(scaled[fast], freqs[fast], rtol=0, atol=0)
    torch.testing.assert_close(scaled[slow], freqs[slow] / 32, rtol=1e-6, atol=0)
    band = ~fast & ~slow
    assert ((scaled[band] < freqs[band]) & (scaled[band] > freqs[band] / 32)).all()


def test_precompute_freqs_cis_scales_only_when_asked():
    plain = normalization_and_rope.precompute_freqs_cis(128, 64)
    scaled = normalization_and_rope.precompute_freqs_cis(128, 64, use_scaled=True, scale_factor=32)
    assert scaled.dtype == torch.complex64 and scaled.shape == plain.shape
    angles = torch.outer(torch.arange(64.0), normalization_and_rope.apply_scaling(llama3_freqs(), 32))
    expected = torch.polar(torch.ones(64, 64), angles)
    torch.testing.assert_close(scaled, expected)
    assert not torch.allclose(scaled, plain)
