"""main.py: the Transformer, training, checkpoints, sampling and the command line, on tiny configurations."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import main
from plumbing import runtime

inputs = main.inputs
REPO = Path(__file__).resolve().parents[1]
META_FIELDS = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
               "norm_eps", "rope_theta", "max_batch_size", "max_seq_len"}


@pytest.fixture(scope="module")
def tokenizer(tiny_text):
    return inputs.CharTokenizer.from_text(tiny_text)


def make_model(vocab_size: int, seed: int = 0, fused: bool = True, **overrides) -> main.Transformer:
    settings = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab_size, multiple_of=16,
                    max_seq_len=16, max_batch_size=2)
    settings.update(overrides)
    torch.manual_seed(seed)
    model = main.Transformer(main.ModelArgs(**settings)).eval()
    for layer in model.layers:
        layer.attention.fused = fused  # False: the manual attention path
    return model


def meta_keys(n_layers: int) -> set[str]:
    keys = {"tok_embeddings.weight", "norm.weight", "output.weight"}
    for i in range(n_layers):
        keys |= {f"layers.{i}.attention.{w}.weight" for w in ("wq", "wk", "wv", "wo")}
        keys |= {f"layers.{i}.feed_forward.{w}.weight" for w in ("w1", "w2", "w3")}
        keys |= {f"layers.{i}.attention_norm.weight", f"layers.{i}.ffn_norm.weight"}
    return keys


# ----------------------------------------------------------------------------- the model


def test_model_args_keep_metas_field_names():
    assert META_FIELDS <= {f.name for f in dataclasses.fields(main.ModelArgs)}


def test_logits_shape_and_no_loss_without_targets():
    model = make_model(40)
    tokens = torch.randint(40, (2, 10))
    logits, loss = model(tokens)
    assert logits.shape == (2, 10, 40)
    assert logits.dtype == torch.float32
    assert loss is None


def test_loss_is_next_token_cross_entropy_near_log_vocab_at_init():
    model = make_model(40)
    tokens, targets = torch.randint(40, (2, 10)), torch.randint(40, (2, 10))
    logits, loss = model(tokens, targets)
    expected = -torch.log_softmax(logits, dim=-1).gather(-1, targets[..., None]).mean()
    torch.testing.assert_close(loss, expected)
    assert abs(loss.item() - math.log(40)) < 0.1  # small init: close to a uniform guess


def test_rope_theta_reaches_the_rotary_tables(tokenizer):
    """The same weights with another rope_theta must give other logits: the model uses its own theta."""
    tokens = torch.tensor([tokenizer.encode("Deny thy father")])
    with torch.no_grad():
        llama3 = make_model(tokenizer.vocab_size, rope_theta=500000.0)(tokens)[0]
        llama2 = make_model(tokenizer.vocab_size, rope_theta=10000.0)(tokens)[0]  # same seed, same weights
    assert not torch.allclose(llama3, llama2, atol=1e-4)


def test_state_dict_keys_are_exactly_metas():
    """RoPE tables and KV caches stay out; nothing else gets in."""
    model = make_model(40, n_layers=3)
    with torch.no_grad():
        model(torch.zeros(1, 4, dtype=torch.long), start_pos=0)  # fill the KV caches
    assert set(model.state_dict()) == meta_keys(3)
    assert model.state_dict()["layers.2.attention.wk.weight"].shape == (16, 32)  # 2 KV heads x head_dim 8


def test_init_std_with_scaled_residual_projections():
    """N(0, 0.02) everywhere, and 0.02 / sqrt(2 * n_layers) on wo and w2, which write into the residual stream."""
    n_layers = 8
    model = make_model(64, dim=64, n_layers=n_layers, n_heads=4, n_kv_heads=4, multiple_of=64)
    params = dict(model.named_parameters())

    def std(suffix: str) -> float:
        return torch.cat([p.flatten() for name, p in params.items() if name.endswith(suffix)]).std().item()

    scaled = 0.02 / math.sqrt(2 * n_layers)
    for suffix in ("attention.wo.weight", "feed_forward.w2.weight"):
        assert std(suffix) == pytest.approx(scaled, rel=0.05)
    for suffix in ("tok_embeddings.weight", "attention.wq.weight", "attention.wk.weight", "feed_forward.w1.weight",
                   "feed_forward.w3.weight", "output.weight"):
        assert std(suffix) == pytest.approx(0.02, rel=0.05)
    assert torch.equal(params["norm.weight"], torch.ones(64))


def test_rope_tables_stay_complex64_when_the_model_changes_dtype():
    """A registered buffer would be cast to a real bfloat16 tensor: RoPE would scale instead of rotate."""
    model = make_model(50, rope_theta=100.0)
    tokens = torch.randint(0, 50, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(tokens)[0].flatten()
        model.to(torch.bfloat16)
        assert model.freqs_cis.dtype == torch.complex64
        assert "freqs_cis" not in model.state_dict()
        logits = model(tokens)[0].flatten()
    assert F.cosine_similarity(logits, reference, dim=0) > 0.999


def test_training_forward_never_touches_the_kv_cache():
    model = make_model(40)
    tokens = torch.randint(40, (2, 10))
    model(tokens, tokens)
    assert all(layer.attention.cache_k is None for layer in model.layers)
    with torch.no_grad():
        model(tokens[:, :4], start_pos=0)  # generation fills the cache ...
        snapshot = [layer.attention.cache_k.clone() for layer in model.layers]
        model(tokens, tokens)  # ... and evaluation leaves it alone
    for layer, before in zip(model.layers, snapshot, strict=True):
        assert torch.equal(layer.attention.cache_k, before)


@pytest.mark.parametrize("fused", [True, False])
def test_cached_logits_equal_uncached_token_by_token(fused):
    model = make_model(40, fused=fused)
    tokens = torch.randint(40, (2, 16))
    with torch.no_grad():
        uncached, _ = model(tokens)
        steps = [model(tokens[:, t : t + 1], start_pos=t)[0] for t in range(16)]
    torch.testing.assert_close(torch.cat(steps, dim=1), uncached, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_cached_logits_equal_uncached_for_a_chunk_after_a_prefix(fused):
    model = make_model(40, fused=fused)
    tokens = torch.randint(40, (2, 16))
    with torch.no_grad():
        uncached, _ = model(tokens)
        prefix, _ = model(tokens[:, :6], start_pos=0)
        chunk, _ = model(tokens[:, 6:11], start_pos=6)
        rest, _ = model(tokens[:, 11:], start_pos=11)
    torch.testing.assert_close(torch.cat([prefix, chunk, rest], dim=1), uncached, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- training


def test_lr_warms_up_linearly_then_decays_by_cosine():
    cfg = main.TrainConfig(learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, max_iters=110, schedule="cosine")
    assert main.get_lr(0, cfg) == pytest.approx(1e-4)  # 1/10 of the way up
    assert main.get_lr(4, cfg) == pytest.approx(5e-4)
    assert main.get_lr(9, cfg) == pytest.approx(1e-3)  # the last warmup step reaches the peak
    assert main.get_lr(10, cfg) == pytest.approx(1e-3)  # the peak
    assert main.get_lr(60, cfg) == pytest.approx(5.5e-4)  # halfway down the cosine
    assert main.get_lr(110, cfg) == pytest.approx(1e-4)
    assert main.get_lr(500, cfg) == pytest.approx(1e-4)  # flat at min_lr after the decay
    lrs = [main.get_lr(s, cfg) for s in range(111)]
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10], strict=False))  # rising through the warmup
    assert all(a > b for a, b in zip(lrs[10:], lrs[11:], strict=False))  # then falling


def test_weight_decay_only_on_matrices():
    model = make_model(40)
    (optimizer,) = main.configure_optimizer(model, main.TrainConfig(weight_decay=0.1, optimizer="adamw"), "cpu")
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"])
    assert all(p.dim() == 1 for p in no_decay["params"])  # the RMSNorm gains
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_wsd_warms_up_stays_flat_then_decays_linearly():
    cfg = main.TrainConfig(learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, max_iters=110, schedule="wsd",
                           cooldown_frac=0.4)
    assert main.get_lr(0, cfg) == pytest.approx(1e-4)  # the same warmup as the cosine
    assert main.get_lr(9, cfg) == pytest.approx(1e-3)
    assert all(main.get_lr(s, cfg) == pytest.approx(1e-3) for s in range(10, 67))  # flat until 110 - 0.4 * 110
    assert main.get_lr(88, cfg) == pytest.approx(5.5e-4)  # halfway down the straight line
    assert main.get_lr(110, cfg) == pytest.approx(1e-4)
    assert main.get_lr(500, cfg) == pytest.approx(1e-4)
    lrs = [main.get_lr(s, cfg) for s in range(66, 111)]
    assert all(a > b for a, b in zip(lrs, lrs[1:], strict=False))
    # Muon's rates: the same shape from its own peak, down to min_lr scaled by the ratio of the peaks.
    assert main.get_lr(50, cfg, peak_lr=0.02) == pytest.approx(0.02)
    assert main.get_lr(88, cfg, peak_lr=0.02) == pytest.approx(0.011)
    assert main.get_lr(110, cfg, peak_lr=0.02) == pytest.approx(0.002)


def test_train_config_checks_its_own_invariants():
    assert main.TrainConfig(max_iters=300).lr_decay_iters == 300  # the decay ends with the first run
    for bad in [dict(cooldown_frac=0.0), dict(cooldown_frac=1.5), dict(learning_rate=1e-5), dict(optimizer="sgd"),
                dict(schedule="linear")]:
        with pytest.raises(ValueError):
            main.TrainConfig(**bad)


def test_the_cpu_preset_is_the_defaults_and_the_gpu_preset_its_differences():
    cpu_model, cpu_cfg = main.resolve_configs(main.build_parser().parse_args([]), None)
    assert cpu_model == main.ModelArgs() and cpu_cfg == main.TrainConfig()
    assert (cpu_cfg.optimizer, cpu_cfg.schedule, cpu_cfg.muon_lr, cpu_cfg.max_iters) == ("muon", "wsd", 0.015, 1000)
    gpu_model, gpu_cfg = main.resolve_configs(main.build_parser().parse_args(["--preset", "gpu"]), None)
    assert (gpu_model.dim, gpu_model.n_layers, gpu_model.max_seq_len, gpu_model.dropout) == (384, 6, 256, 0.3)
    assert (gpu_cfg.optimizer, gpu_cfg.schedule, gpu_cfg.max_iters, gpu_cfg.lr_decay_iters) == ("adamw", "cosine",
                                                                                                  2500, 2500)


def test_learning_rates_name_each_optimizer_with_its_own_peak():
    model = make_model(40)
    cfg = main.TrainConfig(warmup_iters=0)
    assert main.learning_rates(10, main.configure_optimizer(model, cfg, "cpu"), cfg) == {"adamw": 8e-3, "muon": 0.015}


def test_our_muon_in_bfloat16_is_torch_optim_muon_bit_for_bit():
    """Ours only adds the choice of the Newton-Schulz dtype: in bfloat16 it must be torch.optim.Muon exactly,
    momentum, Nesterov, the tall/wide handling, the update scale and the weight decay included, for every matrix."""
    torch.manual_seed(0)
    shapes = [(24, 8), (8, 24), (24, 8), (16, 16), (24, 8)]
    ours = [nn.Parameter(torch.randn(shape)) for shape in shapes]
    theirs = [nn.Parameter(p.detach().clone()) for p in ours]
    opt_ours = main.Muon(ours, lr=0.02, weight_decay=0.1, ns_dtype=torch.bfloat16)
    opt_theirs = torch.optim.Muon(theirs, lr=0.02, weight_decay=0.1, adjust_lr_fn="original")
    for _ in range(3):
        for p, q in zip(ours, theirs, strict=True):
            p.grad = torch.randn(p.shape)
            q.grad = p.grad.clone()
        opt_ours.step()
        opt_theirs.step()
        for p, q in zip(ours, theirs, strict=True):
            assert torch.equal(p, q)
    # float32 Newton-Schulz (our CPU default) is the same update up to bfloat16's rounding
    for g in (ours[0].grad, ours[1].grad, ours[3].grad):
        fp32 = main.newton_schulz(g, torch.float32)
        torch.testing.assert_close(main.newton_schulz(g, torch.bfloat16).float(), fp32, atol=0.03, rtol=0)
        singular_values = torch.linalg.svdvals(fp32)
        assert singular_values.min() > 0.5 and singular_values.max() < 1.3  # orthogonalized: all near 1


def test_muon_gets_the_blocks_matrices_and_adamw_the_rest():
    model = make_model(40)
    adamw, muon = main.configure_optimizer(model, main.TrainConfig(optimizer="muon"), "cpu")
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(muon, main.Muon)
    names = {id(p): n for n, p in model.named_parameters()}
    muon_names = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    adamw_names = {names[id(p)] for g in adamw.param_groups for p in g["params"]}
    blocks = {k for k in meta_keys(2) if k.endswith(("wq.weight", "wk.weight", "wv.weight", "wo.weight",
                                                     "w1.weight", "w2.weight", "w3.weight"))}
    assert muon_names == blocks
    assert adamw_names == meta_keys(2) - blocks  # embeddings, output layer, norm gains: each exactly once
    decay, no_decay = adamw.param_groups
    assert {names[id(p)] for p in decay["params"]} == {"tok_embeddings.weight", "output.weight"}


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_resume_is_exact_for_every_optimizer_and_schedule(optimizer, schedule, tmp_path, tiny_corpus, capsys):
    """8 steps straight equal 4 steps, then --resume to 8: the same weights and optimizer states, bit for bit."""
    common = ["--data", tiny_corpus, "--dim", "32", "--n-layers", "1", "--n-heads", "2", "--n-kv-heads", "1",
              "--seq-len", "16", "--batch-size", "4", "--eval-iters", "2", "--eval-interval", "4",
              "--max-new-tokens", "0", "--warmup-iters", "2", "--lr-decay-iters", "8", "--cooldown-frac", "0.5",
              "--optimizer", optimizer, "--schedule", schedule]
    main.main([str(a) for a in [*common, "--out-dir", tmp_path / "straight", "--max-iters", "8"]])
    main.main([str(a) for a in [*common, "--out-dir", tmp_path / "split", "--max-iters", "4"]])
    main.main([str(a) for a in ["--resume", "--data", tiny_corpus, "--out-dir", tmp_path / "split",
                                "--max-iters", "8", "--max-new-tokens", "0"]])
    capsys.readouterr()
    a, b = (torch.load(tmp_path / run / "ckpt.pt", weights_only=True) for run in ("straight", "split"))
    assert a["step"] == b["step"] == 8
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert len(a["optimizer"]) == len(b["optimizer"]) == (2 if optimizer == "muon" else 1)
    for state_a, state_b in zip(a["optimizer"], b["optimizer"], strict=True):
        assert state_a["param_groups"] == state_b["param_groups"]  # the same learning rate at the last step
        for i, tensors in state_a["state"].items():
            assert all(torch.equal(t, state_b["state"][i][k]) for k, t in tensors.items())


def test_optimizer_cannot_change_on_resume_and_cooldown_fits_the_run(tmp_path, tiny_corpus):
    argv = ["--data", str(tiny_corpus), "--out-dir", str(tmp_path), "--dim", "32", "--n-layers", "1",
            "--seq-len", "16", "--batch-size", "4", "--eval-iters", "2", "--max-new-tokens", "0", "--max-iters", "2"]
    main.main([*argv, "--optimizer", "muon"])
    with pytest.raises(SystemExit, match="--optimizer adamw differs"):
        main.main([*argv, "--resume", "--optimizer", "adamw"])
    with pytest.raises(SystemExit, match="--cooldown-frac 1.5"):
        main.main([*argv, "--cooldown-frac", "1.5"])


def test_best_checkpoint_keeps_the_lowest_val_loss_and_sample_best_reads_it(tmp_path, tiny_corpus, capsys, tokenizer):
    argv = ["--data", str(tiny_corpus), "--out-dir", str(tmp_path), "--dim", "32", "--n-layers", "1", "--seq-len", "16",
            "--batch-size", "4", "--eval-iters", "2", "--eval-interval", "2", "--max-iters", "4",
            "--learning-rate", "0.05", "--min-lr", "0.05", "--warmup-iters", "0", "--max-new-tokens", "0",
            "--optimizer", "adamw"]
    main.main(argv)
    last, best = (torch.load(tmp_path / name, weights_only=True) for name in ("ckpt.pt", "best.pt"))
    val = {row["step"]: row["val_loss"] for row in last["loss_log"]}
    best_step = min(val, key=val.get)
    assert 0 < best_step < last["step"] == 4  # a learning rate this high makes the val loss rise again
    assert best["step"] == best_step and best["best_val_loss"] == val[best_step]
    capsys.readouterr()
    main.main(["--sample", "--best", "--out-dir", str(tmp_path), "--temperature", "0", "--max-new-tokens", "20"])
    expected = main.generate(main.model_from_checkpoint(best), tokenizer, "ROMEO:", 20, temperature=0)
    assert capsys.readouterr().out == f"ROMEO:{expected}\n"


def test_thirty_steps_on_a_tiny_corpus_lower_the_loss(tokenizer, tiny_text):
    data = np.array(tokenizer.encode(tiny_text), dtype=np.int64)
    train_data, val_data = inputs.train_val_split(data)
    model = make_model(tokenizer.vocab_size, n_layers=1, n_heads=2, n_kv_heads=1, max_batch_size=8).train()
    cfg = main.TrainConfig(batch_size=8, max_iters=30, learning_rate=1e-2, min_lr=1e-3, warmup_iters=3, eval_iters=4,
                           optimizer="adamw", schedule="cosine")
    optimizers = main.configure_optimizer(model, cfg, "cpu")
    before = main.estimate_loss(model, val_data, cfg, 16, tokenizer.bos_id, "cpu", nullcontext())
    generator = torch.Generator().manual_seed(0)
    for step in range(cfg.max_iters):
        batch = inputs.get_batch(train_data, cfg.batch_size, 16, tokenizer.bos_id, generator)
        loss = main.train_step(model, optimizers, [batch], [main.get_lr(step, cfg)], cfg.grad_clip, nullcontext())
        assert math.isfinite(loss)
    after = main.estimate_loss(model, val_data, cfg, 16, tokenizer.bos_id, "cpu", nullcontext())
    assert before == pytest.approx(math.log(tokenizer.vocab_size), abs=0.15)
    assert after < before - 0.5


def test_evaluate_split_is_the_mean_loss_over_every_token_by_hand(tokenizer, tiny_text):
    """Every token of the split is a target once, predicted from BOS and the tokens before it in its window."""
    model = make_model(tokenizer.vocab_size, max_seq_len=8)
    data = np.array(tokenizer.encode(tiny_text[:83]), dtype=np.int64)  # 10 windows of 8, 3 tokens left over
    got = main.evaluate_split(model, data, 8, tokenizer.bos_id, 3, "cpu", nullcontext())
    losses = []
    with torch.no_grad():
        for start in range(0, 80, 8):
            window = data[start : start + 8].tolist()
            logits = model(torch.tensor([[tokenizer.bos_id, *window[:-1]]]))[0][0]  # (8, vocab_size)
            log_probs = torch.log_softmax(logits, dim=-1)
            losses += [-log_probs[t, window[t]].item() for t in range(8)]
    assert got == pytest.approx(sum(losses) / len(losses), rel=1e-5)


def test_bf16_autocast_runs_the_training_step_in_bfloat16(tokenizer, tiny_text):
    """The --dtype bfloat16 path of train_step, on CPU: the same batch gives a loss close to float32's
    but not equal to it (the matmuls really ran in bfloat16), and the weights stay float32."""
    data = np.array(tokenizer.encode(tiny_text), dtype=np.int64)
    batch = inputs.get_batch(data, 4, 16, tokenizer.bos_id, torch.Generator().manual_seed(0))
    cfg = main.TrainConfig(optimizer="adamw")
    losses = {}
    for name, autocast in [("fp32", nullcontext()), ("bf16", torch.autocast("cpu", dtype=torch.bfloat16))]:
        model = make_model(tokenizer.vocab_size).train()
        optimizers = main.configure_optimizer(model, cfg, "cpu")
        before = model.output.weight.detach().clone()
        losses[name] = main.train_step(model, optimizers, [batch], [1e-3], cfg.grad_clip, autocast)
        assert model.output.weight.dtype == torch.float32
        assert not torch.equal(model.output.weight, before)  # a step was taken
    assert losses["bf16"] != losses["fp32"]
    assert losses["bf16"] == pytest.approx(losses["fp32"], abs=0.02)


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip_gives_identical_logits(tmp_path, tokenizer):
    model = make_model(tokenizer.vocab_size)
    path = tmp_path / "ckpt.pt"
    runtime.save_checkpoint(path, {"model": model.state_dict(), "model_args": dataclasses.asdict(model.params),
                                "tokenizer": tokenizer.to_dict(), "step": 3})
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary file left behind

    checkpoint = main.load_checkpoint(path)
    restored = main.Transformer(main.ModelArgs(**checkpoint["model_args"])).eval()
    restored.load_state_dict(checkpoint["model"])  # strict: every key must match
    tokens = torch.tensor([tokenizer.encode("Juliet, sun!")])
    with torch.no_grad():
        assert torch.equal(restored(tokens)[0], model(tokens)[0])
    assert checkpoint["step"] == 3
    assert inputs.CharTokenizer.from_dict(checkpoint["tokenizer"]).chars == tokenizer.chars
    assert set(torch.load(path, weights_only=True)["model"]) == meta_keys(2)  # plain tensors and data only


def test_load_checkpoint_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError):
        main.load_checkpoint(tmp_path / "missing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pt"):
        main.load_checkpoint(garbage)


# ----------------------------------------------------------------------------- sampling


def draw(probs: list[float], p: float, n: int = 4000) -> torch.Tensor:
    """n samples from sample_top_p, as a flat tensor of token ids."""
    batch = torch.tensor(probs).expand(n, len(probs)).clone()
    out = main.sample_top_p(batch, p, torch.Generator().manual_seed(0))
    assert out.shape == (n, 1)
    return out.flatten()


def test_top_p_keeps_the_token_that_crosses_p():
    """0.5 alone is below p = 0.6; adding 0.3 crosses it, so both are kept, renormalized to 5/8 and 3/8."""
    samples = draw([0.05, 0.5, 0.15, 0.3], p=0.6)  # unsorted on purpose: ids must map back
    assert set(samples.tolist()) == {1, 3}
    assert (samples == 1).float().mean().item() == pytest.approx(0.625, abs=0.03)


def test_top_p_never_samples_from_an_empty_set():
    assert set(draw([0.2, 0.7, 0.1], p=1e-9).tolist()) == {1}  # below the top probability: the top token
    assert set(draw([0.0, 0.0, 1.0], p=0.5).tolist()) == {2}


def test_top_p_of_one_keeps_every_token():
    probs = [0.4, 0.3, 0.2, 0.08, 0.02]
    samples = draw(probs, p=1.0, n=20000)
    frequencies = torch.bincount(samples, minlength=5).float() / len(samples)
    torch.testing.assert_close(frequencies, torch.tensor(probs), atol=0.015, rtol=0)


def greedy_without_cache(model: main.Transformer, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """The slow way: BOS + the visible window through the model for every new token, take the argmax.
    When BOS + the window would not fit max_seq_len, the window restarts at the newest half."""
    max_seq_len = model.params.max_seq_len
    seq = tokenizer.encode(prompt)
    start, new = 0, []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            context = [tokenizer.bos_id, *seq[start:]]
            token = model(torch.tensor([context]))[0][0, -1].argmax().item()
            if token == tokenizer.eos_id:
                break
            new.append(token)
            seq.append(token)
            if 1 + len(seq) - start > max_seq_len:
                start = len(seq) - max_seq_len // 2
    return tokenizer.decode(new)


def test_temperature_zero_is_greedy_and_deterministic(tokenizer):
    model = make_model(tokenizer.vocab_size)
    prompt = "ROMEO:"
    a = main.generate(model, tokenizer, prompt, 9, temperature=0, generator=torch.Generator().manual_seed(1))
    b = main.generate(model, tokenizer, prompt, 9, temperature=0, generator=torch.Generator().manual_seed(2))
    assert a == b
    assert a == greedy_without_cache(model, tokenizer, prompt, 9)


def test_generation_past_the_context_slides_to_the_newest_tokens(tokenizer):
    """60 new tokens with max_seq_len 16: the cache fills and the window slides several times. The
    model is random but sharp (large weights), so its argmax depends on which tokens it sees."""
    model = make_model(tokenizer.vocab_size, seed=3)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(15)
    # Special tokens are forbidden: only a bug can end generation early, and every character is one token.
    special = torch.tensor([tokenizer.bos_id, tokenizer.eos_id])
    model.output.register_forward_hook(lambda module, args, out: out.index_fill(-1, special, float("-inf")))
    text = main.generate(model, tokenizer, "JULIET:", 60, temperature=0)
    assert len(text) == 60
    assert text == greedy_without_cache(model, tokenizer, "JULIET:", 60)
    sampled = main.generate(model, tokenizer, "JULIET:", 60, temperature=1.0, top_p=1.0,
                            generator=torch.Generator().manual_seed(0))
    assert len(sampled) == 60


def always_predict(model: main.Transformer, token_id: int) -> main.Transformer:
    """Replace the output layer by one whose logits strongly favour a single token, whatever the input."""
    model.output = nn.Linear(model.params.dim, model.params.vocab_size, bias=True)
    with torch.no_grad():
        model.output.weight.zero_()
        model.output.bias.zero_()
        model.output.bias[token_id] = 50.0
    return model


def test_generation_stops_at_end_of_text(tokenizer):
    model = always_predict(make_model(tokenizer.vocab_size), tokenizer.eos_id)
    assert main.generate(model, tokenizer, "ROMEO:", 20, temperature=0.8, top_p=0.9) == ""


def test_generation_runs_past_the_context_length(tokenizer):
    """More new tokens than max_seq_len (16): the cache window slides instead of overflowing."""
    a_id = tokenizer.encode("a")[0]
    model = always_predict(make_model(tokenizer.vocab_size), a_id)
    assert main.generate(model, tokenizer, "JULIET:", 40, temperature=1.0, top_p=1.0) == "a" * 40


def test_empty_prompt_starts_from_bos_alone(tokenizer):
    model = make_model(tokenizer.vocab_size, seed=1)
    text = main.generate(model, tokenizer, "", max_new_tokens=8, temperature=0)
    assert text and text == greedy_without_cache(model, tokenizer, "", 8)


def test_long_prompt_keeps_its_last_tokens(tokenizer, capsys):
    model = make_model(tokenizer.vocab_size, seed=1)
    prompt = "ROMEO: But soft, what light through yonder window breaks?"  # 57 characters, context 16
    text = main.generate(model, tokenizer, prompt, max_new_tokens=30, temperature=0)
    err = capsys.readouterr().err
    assert err.count("note: the prompt is longer than the context") == 1
    assert "last 15 tokens" in err  # BOS + 15 characters fill the 16 positions
    assert text == greedy_without_cache(model, tokenizer, prompt[-15:], 30)


def record_forward_calls(model: main.Transformer) -> list[torch.Tensor]:
    """Wrap model.forward so that every call's tokens are kept, in order."""
    calls, forward = [], model.forward

    def spy(tokens, *args, **kwargs):
        calls.append(tokens)
        return forward(tokens, *args, **kwargs)

    model.forward = spy
    return calls


def test_a_prompt_that_fills_the_context_is_kept_whole(capsys):
    model = make_model(50)  # max_seq_len 16
    calls = record_forward_calls(model)
    prompt = list(range(1, 17))
    new = list(main.generate_tokens(model, prompt, 3, stop_ids=set(), temperature=0))
    assert len(new) == 3
    assert calls[0].tolist() == [prompt]
    assert "note" not in capsys.readouterr().err
    list(main.generate_tokens(model, [0, *prompt], 1, stop_ids=set(), temperature=0))
    assert calls[-1].tolist() == [[0, *prompt[1:]]]  # one too many: the first token (BOS) stays, the next goes
    assert "keeping its last 15 tokens" in capsys.readouterr().err


@pytest.mark.parametrize("max_new_tokens", [0, 1, 5])
def test_generation_runs_no_forward_pass_after_its_last_token(max_new_tokens):
    """The prompt's pass gives the first token; each later token needs one pass more, and no pass follows the last."""
    model = make_model(50)
    calls = record_forward_calls(model)
    new = list(main.generate_tokens(model, [1, 2, 3], max_new_tokens, stop_ids=set(), temperature=0))
    assert len(new) == max_new_tokens
    assert len(calls) == max_new_tokens  # 1 for the prompt + (max_new_tokens - 1), or none at all


def test_one_token_steps_use_the_cpu_matrix_vector_kernel():
    """oneDNN is off for the one-token steps (PyTorch's own kernel reads a matrix faster for one vector, chapter 5),
    on for the prompt's chunk, and on again afterwards."""
    model = make_model(50)
    seen, forward = [], model.forward

    def spy(tokens, *args, **kwargs):
        seen.append((tokens.shape[1], torch.backends.mkldnn.enabled))
        return forward(tokens, *args, **kwargs)

    model.forward = spy
    list(main.generate_tokens(model, [1, 2, 3], 4, stop_ids=set(), temperature=0))
    assert seen == [(3, True), (1, False), (1, False), (1, False)]
    assert torch.backends.mkldnn.enabled


def test_prompt_with_unknown_characters_is_a_value_error(tokenizer):
    model = make_model(tokenizer.vocab_size)
    with pytest.raises(ValueError, match="Ω"):
        main.generate(model, tokenizer, "ROMEO Ω", 5)


# ----------------------------------------------------------------------------- the command line


def test_cli_trains_samples_and_resumes(tmp_path, tiny_corpus, capsys, tokenizer):
    out_dir = tmp_path / "run"
    model_flags = ["--dim", "32", "--n-layers", "1", "--n-heads", "2", "--n-kv-heads", "1", "--seq-len", "16"]
    common = ["--data", str(tiny_corpus), "--out-dir", str(out_dir), "--batch-size", "4", "--eval-iters", "2",
              "--max-new-tokens", "20"]
    main.main([*common, *model_flags, "--max-iters", "5"])  # the same code path as `python main.py ...`
    assert "--- sample" in capsys.readouterr().out

    for name in ("loss.csv", "loss.png", "ckpt.pt", "metrics.json"):
        assert (out_dir / name).is_file(), name
    assert (out_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log = pd.read_csv(out_dir / "loss.csv")
    assert {"step", "train_loss", "val_loss"} <= set(log.columns)
    assert log["step"].tolist() == [0, 5]
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["iters"] == 5 and math.isfinite(metrics["final_val_loss"])
    checkpoint = torch.load(out_dir / "ckpt.pt", weights_only=True)
    assert checkpoint["step"] == 5 and len(metrics["train_losses"]) == 5
    assert metrics["train_losses"] == checkpoint["train_losses"] and all(map(math.isfinite, metrics["train_losses"]))
    assert set(checkpoint["model"]) == meta_keys(1)
    assert checkpoint["tokenizer"] == tokenizer.to_dict()

    # --sample, as a real process: loads the checkpoint, does not train, prints prompt + greedy completion.
    model = main.Transformer(main.ModelArgs(**checkpoint["model_args"]))
    model.load_state_dict(checkpoint["model"])
    expected = greedy_without_cache(model.eval(), tokenizer, "ROMEO:", 20)
    ckpt_bytes = (out_dir / "ckpt.pt").read_bytes()
    result = subprocess.run(
        [sys.executable, "main.py", "--sample", "--out-dir", str(out_dir), "--prompt", "ROMEO:",
         "--max-new-tokens", "20", "--temperature", "0"],
        cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"ROMEO:{expected}\n"
    assert (out_dir / "ckpt.pt").read_bytes() == ckpt_bytes

    # --resume: --max-iters is the total, so 5 more steps to reach 10.
    main.main([*common, "--resume", "--max-iters", "10"])
    capsys.readouterr()
    resumed = torch.load(out_dir / "ckpt.pt", weights_only=True)
    assert resumed["step"] == 10 and resumed["train_losses"][:5] == checkpoint["train_losses"]
    assert len(resumed["train_losses"]) == 10
    assert pd.read_csv(out_dir / "loss.csv")["step"].tolist() == [0, 5, 10]
