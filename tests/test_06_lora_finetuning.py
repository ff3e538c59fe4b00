"""Chapter 6: LoRA's maths, its adapters on disk, peft's reading of our export, and the command line.

Every base here is tiny and written by the tests: a character model in main.py's checkpoint format, and a
Llama 3 in Hugging Face's layout whose transformers reference (LlamaForCausalLM) peft adapts.
"""

from __future__ import annotations

import importlib
import json
import signal
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli_error
from llama_checkpoints import hf_config, hf_reference, write_byte_tokenizer, write_hf_layout
from safetensors import safe_open

import main
from plumbing import lora_cli

inputs = importlib.import_module("01_input_block")
llama = importlib.import_module("05_llama3_tokenizer_and_weights")
lora = importlib.import_module("06_lora_finetuning")
SILENT = lambda line: None  # noqa: E731 (load_llama's log)


def tiny_model(seed: int = 0, vocab_size: int = 40, **overrides) -> main.Transformer:
    torch.manual_seed(seed)
    settings = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab_size, multiple_of=16, max_seq_len=32)
    return main.Transformer(main.ModelArgs(**{**settings, **overrides}))


def random_tokens(vocab_size: int = 40, seqlen: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, seqlen), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def randomize_lora(model: torch.nn.Module, seed: int = 1) -> None:
    """Give every B a random value, as training would: with B = 0 every adapter is invisible."""
    generator = torch.Generator().manual_seed(seed)
    for module in lora.lora_modules(model).values():
        module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=generator) * 0.1)


def write_char_checkpoint(path: Path, text: str, seed: int = 0, train_steps: int = 40, **overrides) -> Path:
    """A checkpoint in main.py's format: a tiny character model, its weights briefly trained on `text`
    (a random model's logits are too flat for a fine-tune to show)."""
    tokenizer = inputs.CharTokenizer.from_text(text)
    model = tiny_model(seed, tokenizer.vocab_size, **overrides)
    cfg = main.TrainConfig(batch_size=8, max_iters=train_steps, warmup_iters=5)  # main.py's recipe
    optimizers = main.configure_optimizer(model, cfg, "cpu")
    data = np.array(tokenizer.encode(text), dtype=np.int64)
    generator = torch.Generator().manual_seed(seed)
    for step in range(train_steps):
        lora.train_one_step(model, optimizers, data, cfg, model.params.max_seq_len, tokenizer.bos_id, generator,
                            "cpu", step)
    torch.save({"model": model.state_dict(), "model_args": asdict(model.params), "tokenizer": tokenizer.to_dict(),
                "step": train_steps}, path)
    return path


@pytest.fixture(scope="module")
def char_ckpt(tmp_path_factory, tiny_text) -> Path:
    return write_char_checkpoint(tmp_path_factory.mktemp("char") / "ckpt.pt", tiny_text)


HF_SEED = 3


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory) -> Path:
    """A tiny Llama 3 (GQA, tied output, RoPE factor 32) in Hugging Face's layout; hf_reference(hf_config(), HF_SEED)
    is its transformers model (built again by each test, since peft changes the model it adapts)."""
    root = tmp_path_factory.mktemp("llama")
    write_byte_tokenizer(root / "tokenizer.model")
    return write_hf_layout(root / "hf", hf_reference(hf_config(), HF_SEED), root / "tokenizer.model")


def run_cli(*argv) -> None:
    lora.main([str(a) for a in argv])


# ----------------------------------------------------------------------------- LoRA's maths


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_starts_as_the_base_bit_for_bit(dtype):
    model = tiny_model().to(dtype)
    tokens = random_tokens()
    with torch.no_grad():
        base = model(tokens)[0]
        lora.add_lora(model, rank=4, alpha=8.0)
        adapted = model(tokens)[0]
    assert torch.equal(adapted, base)
    modules = lora.lora_modules(model)
    assert len(modules) == 2 * 7
    for module in modules.values():
        assert module.weight.dtype == dtype and module.lora_A.dtype == module.lora_B.dtype == torch.float32
        assert not module.lora_B.any() and module.lora_A.std() > 0.05  # B zero, A random: peft's start
        bound = 1 / module.in_features**0.5  # Kaiming-uniform with a = sqrt(5), as nn.Linear's weight
        assert module.lora_A.abs().max() <= bound and module.lora_A.abs().max() > 0.9 * bound


def test_trainable_parameters_are_the_lora_matrices_only():
    base_total = lora.count_parameters(tiny_model())[1]
    model = lora.add_lora(tiny_model(), rank=4, alpha=8.0, targets=["wq", "wv"])
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names == [f"layers.{i}.attention.{w}.lora_{m}" for i in range(2) for w in ("wq", "wv") for m in "AB"]
    # wq: 32 -> 4 heads x 8; wv: 32 -> 2 KV heads x 8 = 16
    n_lora = 2 * 4 * ((32 + 32) + (32 + 16))
    assert lora.count_parameters(model) == (n_lora, base_total + n_lora)

    everything = lora.add_lora(tiny_model(), rank=2, alpha=2.0)
    hidden = everything.layers[0].feed_forward.w1.out_features
    per_layer = 2 * ((32 + 32) * 2 + (32 + 16) * 2 + (32 + hidden) * 3)  # wq wo, wk wv, w1 w2 w3
    assert lora.count_parameters(everything)[0] == 2 * per_layer

    assert lora.llama_32_1b_counts(rank=8) == (1_235_814_400, 5_636_096)  # peft's count for this model and config


def test_trainable_count_equals_peft_on_the_same_model(hf_llama):
    from peft import LoraConfig, get_peft_model

    model, _ = llama.load_llama(hf_llama, max_seq_len=32, log=SILENT)
    lora.add_lora(model, rank=4, alpha=8.0, targets=["wq", "wk", "w2"])
    reference = hf_reference(hf_config(), HF_SEED)
    peft_model = get_peft_model(reference, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj",
                                                                                         "down_proj"]))
    assert lora.count_parameters(model) == peft_model.get_nb_trainable_parameters()


def test_gradients_reach_A_and_B_only():
    model = lora.add_lora(tiny_model(), rank=4, alpha=8.0)
    tokens = random_tokens()
    model(tokens, tokens)[1].backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {n for n in lora.lora_state_dict(model)}
    for module in lora.lora_modules(model).values():
        assert module.lora_B.grad.abs().sum() > 0  # (A x)^T times the output's gradient
        assert not module.lora_A.grad.any()  # B^T times the output's gradient, and B = 0
    randomize_lora(model)
    model.zero_grad()
    model(tokens, tokens)[1].backward()
    assert all(m.lora_A.grad.abs().sum() > 0 for m in lora.lora_modules(model).values())


def test_merged_logits_equal_unmerged_and_keys_are_metas_again():
    model = lora.add_lora(tiny_model(), rank=4, alpha=8.0, targets=["wq", "wk", "w2"])
    randomize_lora(model)
    tokens = random_tokens()
    base_keys = tiny_model().state_dict().keys()
    assert model.state_dict().keys() - base_keys == set(lora.lora_state_dict(model))
    with torch.no_grad():
        unmerged = model(tokens)[0]
        lora.merge_lora(model)
        merged = model(tokens)[0]
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
    assert not lora.lora_modules(model) and model.state_dict().keys() == base_keys
    fresh = tiny_model(seed=5)
    fresh.load_state_dict(model.state_dict())  # strict: the merged model is a plain Transformer
    with torch.no_grad():
        assert torch.equal(fresh(tokens)[0], merged)
        assert (merged - lora.add_lora(tiny_model(), 4, 8.0)(tokens)[0]).abs().max() > 1e-2  # B A did something


def test_adapter_round_trip_holds_only_the_lora_tensors(tmp_path):
    model = lora.add_lora(tiny_model(), rank=4, alpha=8.0, targets=["wq", "w3"])
    randomize_lora(model)
    tokens = random_tokens()
    torch.save({"lora": lora.lora_state_dict(model), "lora_config": {"rank": 4, "alpha": 8.0, "targets": ["wq", "w3"]},
                "train_config": {}, "seq_len": 32, "step": 0}, tmp_path / "adapter.pt")
    adapter = lora_cli.load_adapter(tmp_path / "adapter.pt")
    assert sorted(adapter["lora"]) == sorted(f"layers.{i}.{block}.lora_{m}" for i in range(2)
                                             for block in ("attention.wq", "feed_forward.w3") for m in "AB")
    fresh = tiny_model()  # the same base
    lora.apply_adapter(fresh, adapter, "adapter.pt")
    with torch.no_grad():
        assert torch.equal(fresh(tokens)[0], model(tokens)[0])


# ----------------------------------------------------------------------------- the command line


def test_fine_tune_lowers_the_val_loss_and_writes_an_adapter(char_ckpt, tiny_corpus, tmp_path, capsys):
    out = tmp_path / "out"
    run_cli("--ckpt", char_ckpt, "--data", tiny_corpus, "--out-dir", out, "--max-iters", 30, "--batch-size", 2,
            "--grad-accum", 4, "--learning-rate", 1e-2, "--eval-iters", 8, "--rank", 4)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["val_loss_after"] < metrics["val_loss_before"] - 0.1, metrics  # 1.35 -> 1.12 here
    assert len(metrics["train_losses"]) == metrics["iters"] == 30
    printed = capsys.readouterr().out
    assert f"val loss before fine-tuning: {metrics['val_loss_before']:.4f}" in printed
    adapter = torch.load(out / "adapter.pt", weights_only=True)
    assert adapter.keys() == {"lora", "lora_config", "train_config", "seq_len", "step", "base"}
    assert all(name.endswith((".lora_A", ".lora_B")) for name in adapter["lora"]) and len(adapter["lora"]) == 28
    optimizers = torch.load(out / "train_state.pt", weights_only=True)["optimizer"]
    assert len(optimizers) == 1 and optimizers[0]["param_groups"][0]["betas"] == (0.9, 0.95)  # AdamW, never Muon

    run_cli("--ckpt", char_ckpt, "--out-dir", out, "--sample", "--prompt", "ROMEO:", "--max-new-tokens", 20)
    assert capsys.readouterr().out.startswith("ROMEO:")


def test_interrupted_fine_tune_saves_and_resume_continues_exactly(char_ckpt, tiny_corpus, tmp_path, monkeypatch):
    flags = ["--ckpt", char_ckpt, "--data", tiny_corpus, "--max-iters", 6, "--batch-size", 2, "--grad-accum", 2,
             "--eval-iters", 1, "--learning-rate", 1e-2]
    run_cli(*flags, "--out-dir", tmp_path / "straight")

    real_step = lora.train_one_step

    def step_then_sigterm(*args):
        loss = real_step(*args)
        if args[-1] == 2:  # the third step
            signal.raise_signal(signal.SIGTERM)
        return loss

    monkeypatch.setattr(lora, "train_one_step", step_then_sigterm)
    with pytest.raises(SystemExit) as exc:
        run_cli(*flags, "--out-dir", tmp_path / "stopped")
    assert exc.value.code == 128 + signal.SIGTERM
    assert torch.load(tmp_path / "stopped" / "adapter.pt", weights_only=True)["step"] == 3
    monkeypatch.setattr(lora, "train_one_step", real_step)
    run_cli(*flags, "--out-dir", tmp_path / "stopped", "--resume")

    straight, resumed = (torch.load(tmp_path / run / "train_state.pt", weights_only=True)
                         for run in ("straight", "stopped"))
    assert resumed["step"] == straight["step"] == 6 and resumed["losses"] == straight["losses"]
    for name, tensor in straight["lora"].items():
        assert torch.equal(resumed["lora"][name], tensor), name


def test_resume_auto_starts_fresh_then_resumes(char_ckpt, tiny_corpus, tmp_path, capsys):
    """What torchrun's restarts run: the same command line, which must resume once there is something to resume."""
    flags = ["--ckpt", char_ckpt, "--data", tiny_corpus, "--out-dir", tmp_path, "--batch-size", 2, "--grad-accum", 1,
             "--eval-iters", 1, "--resume", "auto"]
    run_cli(*flags, "--max-iters", 2)
    assert "resumed" not in capsys.readouterr().out
    run_cli(*flags, "--max-iters", 4)
    assert f"resumed from {tmp_path / 'train_state.pt'} at step 2" in capsys.readouterr().out
    assert torch.load(tmp_path / "adapter.pt", weights_only=True)["step"] == 4


def test_export_peft_gives_our_logits_in_transformers(hf_llama, tmp_path, capsys):
    from peft import PeftModel

    path, reference = hf_llama, hf_reference(hf_config(), HF_SEED)
    out, export = tmp_path / "out", tmp_path / "peft"
    data = tmp_path / "text.txt"
    data.write_text("Llama learns the rows of its heads. " * 60)
    run_cli("--llama-dir", path, "--data", data, "--out-dir", out, "--max-iters", 5, "--batch-size", 2,
            "--grad-accum", 1, "--seq-len", 32, "--learning-rate", 3e-2, "--eval-iters", 1, "--rank", 4,
            "--targets", "wq,wk,w2")
    run_cli("--llama-dir", path, "--out-dir", out, "--export-peft", export)

    config = json.loads((export / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (4, 16.0, ["down_proj", "k_proj",
                                                                                        "q_proj"])
    with safe_open(export / "adapter_model.safetensors", "pt") as f:
        assert "base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight" in f.keys() and len(f.keys()) == 12

    model, _ = llama.load_llama(path, max_seq_len=32, dtype=torch.float32, log=SILENT)
    lora.apply_adapter(model, lora_cli.load_adapter(out / "adapter.pt"), "adapter.pt")
    peft_model = PeftModel.from_pretrained(reference, export).eval()
    tokens = random_tokens(vocab_size=256)
    with torch.no_grad():
        ours, theirs = model(tokens)[0], peft_model(tokens).logits
        with peft_model.disable_adapter():
            base = peft_model(tokens).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    assert (theirs - base).abs().max() > 1e-2  # the adapter changes the logits: the equality above means something


# ----------------------------------------------------------------------------- bad input: one error line each


def test_bad_lora_settings_are_one_error_line(char_ckpt, tiny_corpus, tmp_path):
    base = ["--ckpt", char_ckpt, "--data", tiny_corpus, "--out-dir", tmp_path, "--max-iters", 1]
    assert "rank 0 does not fit: it must be between 1 and 16" in cli_error([*base, "--rank", 0], lora.main)
    assert "smaller side of layers.0.attention.wk (16 x 32)" in cli_error([*base, "--rank", 17], lora.main)
    message = cli_error([*base, "--targets", "wq,q_proj"], lora.main)
    assert "unknown LoRA target 'q_proj'" in message and "Hugging Face's name for wq" in message
    assert "no LoRA target" in cli_error([*base, "--targets", ","], lora.main)


def test_an_adapter_for_another_base_is_one_error_line(char_ckpt, tiny_corpus, tiny_text, tmp_path):
    out = tmp_path / "out"
    run_cli("--ckpt", char_ckpt, "--data", tiny_corpus, "--out-dir", out, "--max-iters", 1, "--eval-iters", 1)
    wider = write_char_checkpoint(tmp_path / "wider.pt", tiny_text, train_steps=0, dim=64)
    deeper = write_char_checkpoint(tmp_path / "deeper.pt", tiny_text, train_steps=0, n_layers=3)
    assert "does not fit this base model: its layers.0.attention.wq.lora_A has shape (8, 32), this model needs " \
           "(8, 64)" in cli_error(["--ckpt", wider, "--out-dir", out, "--sample"], lora.main)
    assert "it lacks layers.2." in cli_error(["--ckpt", deeper, "--out-dir", out, "--sample"], lora.main)
    empty = ["--ckpt", char_ckpt, "--out-dir", tmp_path / "empty"]
    assert "no adapter.pt in" in cli_error([*empty, "--sample"], lora.main)
    assert "no train_state.pt in" in cli_error([*empty, "--resume"], lora.main)
    assert "--prompt 'Ω': characters not in the vocabulary" in cli_error(["--ckpt", char_ckpt, "--out-dir", out,
                                                                         "--sample", "--prompt", "Ω"], lora.main)


def test_a_file_that_is_no_adapter_is_one_error_line(char_ckpt, tmp_path):
    sample = ["--ckpt", char_ckpt, "--out-dir", tmp_path, "--sample"]
    (tmp_path / "adapter.pt").write_bytes(b"not a torch file")
    assert "adapter.pt is not a readable adapter" in cli_error(sample, lora.main)
    torch.save({"lora": {}, "step": 0}, tmp_path / "adapter.pt")  # readable, but not ours
    assert "adapter.pt is not an adapter written by 06_lora_finetuning.py" in cli_error(sample, lora.main)

def test_bad_data_and_bases_are_one_error_line(char_ckpt, hf_llama, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("ROMEO: But soft, what light " * 5)
    message = cli_error(["--ckpt", char_ckpt, "--data", short, "--out-dir", tmp_path / "o"], lora.main)
    assert "too short for --seq-len 32" in message
    foreign = tmp_path / "foreign.txt"
    foreign.write_text("ROMEO: But soft, what light through yonder window breaks? Ω" * 40)
    assert "characters not in the vocabulary: 'Ω'" in cli_error(["--ckpt", char_ckpt, "--data", foreign,
                                                                 "--out-dir", tmp_path / "o"], lora.main)
    assert "no checkpoint at" in cli_error(["--ckpt", tmp_path / "none.pt", "--data", short], lora.main)
    assert "is not a directory" in cli_error(["--llama-dir", tmp_path / "nowhere", "--data", short], lora.main)
    (tmp_path / "empty_dir").mkdir()
    assert "no tokenizer.model" in cli_error(["--llama-dir", tmp_path / "empty_dir", "--data", short], lora.main)
    message = cli_error(["--ckpt", char_ckpt, "--export-peft", tmp_path / "p"], lora.main)
    assert "--export-peft needs --llama-dir" in message
    assert "needs a base model" in cli_error(["--data", short], lora.main)
    assert "not both" in cli_error(["--ckpt", char_ckpt, "--llama-dir", hf_llama], lora.main)
    assert "--seq-len 64 is longer than the context 32" in cli_error(["--ckpt", char_ckpt, "--seq-len", 64], lora.main)


def test_under_torchrun_only_the_fine_tune_runs(char_ckpt, hf_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it
    for flags in (["--ckpt", char_ckpt, "--out-dir", tmp_path, "--sample"],
                  ["--llama-dir", hf_llama, "--out-dir", tmp_path, "--export-peft", tmp_path / "peft"], []):
        assert "under torchrun chapter 6 only fine-tunes" in cli_error(flags, lora.main)
