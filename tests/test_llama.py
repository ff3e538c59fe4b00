"""main.load_llama and --llama-dir: Meta's and Hugging Face's checkpoint layouts against transformers.

Every checkpoint here is tiny and random, written by the tests: transformers' LlamaForCausalLM is the
reference for the logits and for greedy text. A Meta-layout checkpoint is made the way Meta's weights
relate to Hugging Face's: the same tensors under Meta's names, with wq and wk in Meta's row order.
"""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

import main

inputs = main.inputs
SEQLEN = 64
SILENT = lambda line: None  # noqa: E731 (load_llama's log)


def write_byte_tokenizer(path: Path) -> None:
    """A tokenizer.model with the 256 single bytes only: vocab_size 256 + 256 special tokens = 512."""
    path.write_text("".join(f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(256)))


def hf_config(vocab_size: int = 512, n_heads: int = 4, n_kv_heads: int = 2, factor: float | None = 32.0,
              tied: bool = True, **overrides) -> LlamaConfig:
    """A tiny Llama 3 in transformers' terms: dim 64, 2 layers, rope_theta 500000, `factor` None for no scaling."""
    rope = {"rope_type": "default", "rope_theta": 500000.0}
    if factor is not None:
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": factor, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    settings = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                    num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, rms_norm_eps=1e-5,
                    max_position_embeddings=131072, rope_parameters=rope, tie_word_embeddings=tied,
                    initializer_range=0.15, bos_token_id=128000, eos_token_id=[128001, 128008, 128009])
    settings.update(overrides)
    return LlamaConfig(**settings)


def hf_reference(config: LlamaConfig, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def permute_meta_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Hugging Face's conversion of Meta's wq or wk: within each head, adjacent row pairs (2i, 2i+1)
    become rows (i, head_dim/2 + i)."""
    rows, dim = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, dim).transpose(1, 2).reshape(rows, dim)


def meta_state_dict(model: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    """The reference's weights under Meta's names, wq and wk in Meta's order (undoing the permutation
    by its index: this does not use main.unpermute_hf)."""
    config = model.config
    out = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        meta_name = main.hf_to_meta_name(name)
        if meta_name.endswith(("attention.wq.weight", "attention.wk.weight")):
            heads = config.num_attention_heads if "wq" in meta_name else config.num_key_value_heads
            order = permute_meta_to_hf(torch.arange(tensor.shape[0]).view(-1, 1), heads).view(-1)
            tensor = tensor[torch.argsort(order)]
        out[meta_name] = tensor.clone().contiguous()
    return out


def write_meta_layout(path: Path, model: LlamaForCausalLM, tokenizer: Path) -> Path:
    config = model.config
    path.mkdir(parents=True)
    params = {"dim": config.hidden_size, "n_layers": config.num_hidden_layers, "n_heads": config.num_attention_heads,
              "n_kv_heads": config.num_key_value_heads, "vocab_size": config.vocab_size, "multiple_of": 16,
              "ffn_dim_multiplier": None, "norm_eps": config.rms_norm_eps, "rope_theta": 500000.0,
              "use_scaled_rope": config.rope_parameters["rope_type"] == "llama3"}
    assert main.blocks.ffn_hidden_dim(4 * config.hidden_size, 16, None) == config.intermediate_size
    (path / "params.json").write_text(json.dumps(params))
    torch.save(meta_state_dict(model), path / "consolidated.00.pth")
    shutil.copy(tokenizer, path / "tokenizer.model")
    return path


def write_hf_layout(path: Path, model: LlamaForCausalLM, tokenizer: Path, sharded: bool = False,
                    tokenizer_in_original: bool = False) -> Path:
    model.save_pretrained(path, max_shard_size="100KB" if sharded else "10GB")
    (path / "original").mkdir()
    shutil.copy(tokenizer, path / ("original" if tokenizer_in_original else ".") / "tokenizer.model")
    return path


def random_tokens(vocab_size: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab_size - 256, (2, SEQLEN), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def byte_tokenizer(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.model"
    write_byte_tokenizer(path)
    return path


# name: (config, layout, sharded)
CASES = {
    "hf_factor32_tied_gqa": (dict(factor=32.0, tied=True, n_kv_heads=2), "hf", False),
    "hf_factor8_untied_sharded": (dict(factor=8.0, tied=False, n_kv_heads=4), "hf", True),
    "meta_scaled_untied_gqa": (dict(factor=8.0, tied=False, n_kv_heads=1), "meta", False),
    "meta_unscaled_tied": (dict(factor=None, tied=True, n_kv_heads=2), "meta", False),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, byte_tokenizer) -> dict[str, tuple[Path, LlamaForCausalLM]]:
    """Every case of CASES written once, with its transformers reference."""
    root = tmp_path_factory.mktemp("checkpoints")
    out = {}
    for seed, (name, (settings, layout, sharded)) in enumerate(CASES.items()):
        model = hf_reference(hf_config(**settings), seed)
        if layout == "hf":
            path = write_hf_layout(root / name, model, byte_tokenizer, sharded, tokenizer_in_original=sharded)
        else:
            path = write_meta_layout(root / name, model, byte_tokenizer)
        out[name] = (path, model)
    return out


# ----------------------------------------------------------------------------- logits against transformers


@pytest.mark.parametrize("case", list(CASES))
def test_logits_equal_transformers(checkpoints, case):
    path, reference = checkpoints[case]
    tokens = random_tokens(reference.config.vocab_size)
    model, tokenizer = main.load_llama(path, max_seq_len=SEQLEN, dtype=torch.float32, log=SILENT)
    assert tokenizer.vocab_size == model.params.vocab_size == 512
    with torch.no_grad():
        expected = reference(tokens).logits
        logits, _ = model(tokens)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


def test_the_tiny_checkpoints_tell_the_rope_variants_apart(checkpoints):
    """The equality above means something: a wrong RoPE factor, or no unpermuting, moves the logits by far more."""
    path, reference = checkpoints["hf_factor32_tied_gqa"]
    tokens = random_tokens(512)
    model, _ = main.load_llama(path, max_seq_len=SEQLEN, log=SILENT)
    with torch.no_grad():
        expected = reference(tokens).logits
        model.freqs_cis = main.rope.precompute_freqs_cis(16, SEQLEN, 500000.0, True, scale_factor=8.0)
        wrong_factor = model(tokens)[0]
        model.freqs_cis = main.rope.precompute_freqs_cis(16, SEQLEN, 500000.0, True, scale_factor=32.0)
        for layer in model.layers:  # Hugging Face's row order put back
            layer.attention.wq.weight.copy_(permute_meta_to_hf(layer.attention.wq.weight, 4))
        permuted = model(tokens)[0]
    assert (wrong_factor - expected).abs().max() > 1e-2
    assert (permuted - expected).abs().max() > 1e-1


def test_tied_checkpoints_share_one_matrix_and_untied_ones_do_not(checkpoints):
    for case, tied in [("hf_factor32_tied_gqa", True), ("meta_unscaled_tied", True),
                       ("meta_scaled_untied_gqa", False), ("hf_factor8_untied_sharded", False)]:
        model, _ = main.load_llama(checkpoints[case][0], max_seq_len=SEQLEN, log=SILENT)
        assert (model.output.weight is model.tok_embeddings.weight) == tied, case


def test_rope_scaling_settings_come_from_the_checkpoint(checkpoints):
    expected = {"hf_factor32_tied_gqa": (True, 32.0), "hf_factor8_untied_sharded": (True, 8.0),
                "meta_scaled_untied_gqa": (True, 8.0), "meta_unscaled_tied": (False, 8.0)}
    for case, (scaled, factor) in expected.items():
        model, _ = main.load_llama(checkpoints[case][0], max_seq_len=SEQLEN, log=SILENT)
        assert (model.params.use_scaled_rope, model.params.rope_scaling_factor) == (scaled, factor), case


def test_legacy_rope_scaling_config_loads_the_same(checkpoints, tmp_path):
    """config.json written by transformers 4: "rope_scaling" and a top-level "rope_theta"."""
    path, reference = checkpoints["hf_factor32_tied_gqa"]
    legacy = tmp_path / "legacy"
    shutil.copytree(path, legacy)
    config = json.loads((legacy / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = rope
    (legacy / "config.json").write_text(json.dumps(config))
    model, _ = main.load_llama(legacy, max_seq_len=SEQLEN, dtype=torch.float32, log=SILENT)
    tokens = random_tokens(512)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens)[0], reference(tokens).logits, atol=1e-4, rtol=0)


def test_meta_rope_factor_is_32_for_the_llama_32_small_shapes_only():
    """params.json does not carry the factor: the loader infers it from (dim, n_layers)."""
    shapes = {(2048, 16): 32.0, (3072, 28): 32.0, (4096, 32): 8.0, (8192, 80): 8.0, (2048, 28): 8.0, (64, 2): 8.0}
    for (dim, n_layers), factor in shapes.items():
        assert main.meta_rope_scaling_factor(main.ModelArgs(dim=dim, n_layers=n_layers)) == factor


def test_bfloat16_logits_stay_close_to_float32(checkpoints):
    path, _ = checkpoints["meta_scaled_untied_gqa"]
    tokens = random_tokens(512)
    fp32, _ = main.load_llama(path, max_seq_len=SEQLEN, dtype=torch.float32, log=SILENT)
    bf16, _ = main.load_llama(path, max_seq_len=SEQLEN, dtype=torch.bfloat16, log=SILENT)
    assert bf16.tok_embeddings.weight.dtype == torch.bfloat16 and bf16.freqs_cis.dtype == torch.complex64
    with torch.no_grad():
        a, b = fp32(tokens)[0], bf16(tokens)[0]
    assert F.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.999
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9


def test_hf_permutation_round_trips():
    w = torch.randn(4 * 16, 64)
    for n_heads in (1, 4):
        torch.testing.assert_close(main.unpermute_hf(permute_meta_to_hf(w, n_heads), n_heads), w, rtol=0, atol=0)
        torch.testing.assert_close(permute_meta_to_hf(main.unpermute_hf(w, n_heads), n_heads), w, rtol=0, atol=0)
    assert not torch.equal(main.unpermute_hf(w, 4), w)


def test_loading_holds_the_checkpoints_tensors_not_copies(checkpoints):
    """assign=True: the mmap-ed tensors become the parameters (a norm gain is never permuted or cast)."""
    path, _ = checkpoints["meta_scaled_untied_gqa"]
    stored = torch.load(path / "consolidated.00.pth", mmap=True, weights_only=True)
    model, _ = main.load_llama(path, max_seq_len=SEQLEN, log=SILENT)
    assert model.norm.weight.dtype == stored["norm.weight"].dtype
    assert torch.equal(model.norm.weight, stored["norm.weight"])
    assert model.layers[0].feed_forward.w1.weight.device.type == "cpu"
    assert not any(p.is_meta for p in model.parameters())


# ----------------------------------------------------------------------------- the command line, real tokenizer


@pytest.fixture(scope="module")
def real_tokenizer() -> Path:
    path = inputs.packaged_llama3_tokenizer()
    assert path is not None, "install requirements-test.txt: llama-models ships Meta's tokenizer.model"
    return path


@pytest.fixture(scope="module")
def real_vocab_checkpoints(tmp_path_factory, real_tokenizer) -> dict[str, tuple[Path, LlamaForCausalLM]]:
    """Llama 3's real vocabulary (128,256) on a dim-64 model, in both layouts."""
    root = tmp_path_factory.mktemp("real_vocab")
    hf_model = hf_reference(hf_config(vocab_size=128256, factor=32.0, tied=True), seed=10)
    meta_model = hf_reference(hf_config(vocab_size=128256, factor=8.0, tied=False, n_kv_heads=1), seed=11)
    return {"hf": (write_hf_layout(root / "hf", hf_model, real_tokenizer, tokenizer_in_original=True), hf_model),
            "meta": (write_meta_layout(root / "meta", meta_model, real_tokenizer), meta_model)}


@pytest.mark.parametrize("layout", ["hf", "meta"])
def test_cli_greedy_text_equals_transformers_greedy_decoding(real_vocab_checkpoints, real_tokenizer, layout, capsys):
    path, reference = real_vocab_checkpoints[layout]
    prompt, n_new = "ROMEO: But soft, what light", 12
    main.main(["--sample", "--llama-dir", str(path), "--prompt", prompt, "--temperature", "0",
               "--max-new-tokens", str(n_new), "--dtype", "float32", "--seq-len", "64"])
    out = capsys.readouterr()
    tokenizer = inputs.Llama3Tokenizer(real_tokenizer)
    prompt_ids = tokenizer.encode(prompt, bos=True)
    with torch.no_grad():
        generated = reference.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=n_new,
                                       pad_token_id=0)[0, len(prompt_ids):].tolist()
    stops = [i for i, t in enumerate(generated) if t in tokenizer.stop_ids]
    generated = generated[: stops[0]] if stops else generated
    assert len(generated) >= 3
    assert out.out == prompt + tokenizer.decode(generated) + "\n"
    assert "loaded" in out.err and "GB in float32" in out.err


def test_cli_chat_wraps_the_prompt_in_one_user_turn(real_vocab_checkpoints, real_tokenizer, capsys, monkeypatch):
    seen = []
    real = main.generate_tokens
    monkeypatch.setattr(main, "generate_tokens", lambda model, tokens, *a, **k: seen.append(tokens) or real(
        model, tokens, *a, **k))
    main.main(["--sample", "--llama-dir", str(real_vocab_checkpoints["hf"][0]), "--chat", "--prompt",
               "This is a test sentence.", "--max-new-tokens", "2", "--seq-len", "32"])
    assert seen == [inputs.Llama3Tokenizer(real_tokenizer).encode_chat("This is a test sentence.")]
    assert capsys.readouterr().out.startswith("This is a test sentence.")


@pytest.mark.parametrize("stop", ["<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"])
def test_cli_stops_at_a_stop_token(real_vocab_checkpoints, capsys, monkeypatch, stop):
    load_llama = main.load_llama

    def load_a_model_that_always_says_stop(*args, **kwargs):
        model, tokenizer = load_llama(*args, **kwargs)
        model.output = torch.nn.Linear(64, 128256, bias=True)
        with torch.no_grad():
            model.output.weight.zero_()
            model.output.bias.zero_()
            model.output.bias[tokenizer.special_tokens[stop]] = 50.0
            model.output.bias[tokenizer.encode("x")[0]] = 49.0  # what comes next if the stop is missed
        return model, tokenizer

    monkeypatch.setattr(main, "load_llama", load_a_model_that_always_says_stop)
    main.main(["--sample", "--llama-dir", str(real_vocab_checkpoints["meta"][0]), "--prompt", "Hello",
               "--temperature", "0", "--max-new-tokens", "5", "--seq-len", "16"])
    assert capsys.readouterr().out == "Hello\n"


def test_cli_streams_a_character_split_over_two_tokens_whole(real_vocab_checkpoints, capsys, monkeypatch):
    """"🙂" is two tokens; the first alone decodes to a replacement character, which must not be printed."""
    tokenizer = inputs.Llama3Tokenizer(inputs.packaged_llama3_tokenizer())
    ids = tokenizer.encode("a🙂b")
    assert tokenizer.decode(ids[:2]).endswith("\ufffd")
    monkeypatch.setattr(main, "generate_tokens", lambda *args, **kwargs: iter(ids))
    main.main(["--sample", "--llama-dir", str(real_vocab_checkpoints["meta"][0]), "--prompt", "Hello",
               "--seq-len", "16"])
    assert capsys.readouterr().out == "Helloa🙂b\n"


# ----------------------------------------------------------------------------- bad directories


def bad_dir_error(path: Path, capsys) -> str:
    """Run the CLI on `path` and return its one error line."""
    with pytest.raises(SystemExit) as exit_info:
        main.main(["--sample", "--llama-dir", str(path), "--max-new-tokens", "1"])
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    assert "Traceback" not in capsys.readouterr().err
    return message


def test_errors_for_missing_files(tmp_path, byte_tokenizer, capsys):
    assert "is not a directory" in bad_dir_error(tmp_path / "nowhere", capsys)
    assert "no tokenizer.model" in bad_dir_error(tmp_path, capsys)
    shutil.copy(byte_tokenizer, tmp_path / "tokenizer.model")
    assert "neither params.json" in bad_dir_error(tmp_path, capsys)
    (tmp_path / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 512}))
    assert "no consolidated.00.pth" in bad_dir_error(tmp_path, capsys)
    (tmp_path / "params.json").unlink()
    (tmp_path / "config.json").write_text(hf_config().to_json_string())
    assert "neither model.safetensors" in bad_dir_error(tmp_path, capsys)


def test_errors_for_weights_that_do_not_fit(checkpoints, tmp_path, capsys):
    path = tmp_path / "meta"
    shutil.copytree(checkpoints["meta_scaled_untied_gqa"][0], path)
    params = json.loads((path / "params.json").read_text())
    (path / "params.json").write_text(json.dumps({**params, "dim": 128}))
    assert "has shape" in bad_dir_error(path, capsys)
    (path / "params.json").write_text(json.dumps({**params, "vocab_size": 1000}))
    assert "vocab_size 1000 is not its tokenizer's 512" in bad_dir_error(path, capsys)
    (path / "params.json").write_text(json.dumps({**params, "n_heads": 3}))
    assert "n_heads" in bad_dir_error(path, capsys)
    (path / "params.json").write_text(json.dumps({**params, "n_layers": 3}))
    assert "missing layers.2." in bad_dir_error(path, capsys)
    (path / "params.json").write_text(json.dumps({**params, "dim": "64"}))
    assert "dim must be a positive integer" in bad_dir_error(path, capsys)
    (path / "params.json").write_text("{not json")
    assert "not valid JSON" in bad_dir_error(path, capsys)

    hf = tmp_path / "hf"
    shutil.copytree(checkpoints["hf_factor32_tied_gqa"][0], hf)
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "intermediate_size": 256}))
    assert "has shape" in bad_dir_error(hf, capsys)
    (hf / "config.json").write_text(json.dumps({**config, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}}))
    assert "'yarn' is not Llama 3's" in bad_dir_error(hf, capsys)
    (hf / "config.json").write_text(json.dumps({**config, "model_type": "mistral"}))
    assert "not 'llama'" in bad_dir_error(hf, capsys)


def test_a_checkpoint_split_over_several_files_is_refused(checkpoints, tmp_path, capsys):
    path = tmp_path / "sharded"
    shutil.copytree(checkpoints["meta_scaled_untied_gqa"][0], path)
    shutil.copy(path / "consolidated.00.pth", path / "consolidated.01.pth")
    message = bad_dir_error(path, capsys)
    assert "split over 2 files" in message and "Hugging Face layout" in message


class RunsCode:
    """Unpickling this calls exec: a checkpoint that carries it would run code if loaded without weights_only."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def test_a_checkpoint_carrying_pickled_code_is_refused_without_running_it(checkpoints, tmp_path, capsys):
    path = tmp_path / "evil"
    shutil.copytree(checkpoints["meta_scaled_untied_gqa"][0], path)
    marker = tmp_path / "code_ran"
    state_dict = torch.load(path / "consolidated.00.pth", weights_only=True)
    torch.save({**state_dict, "payload": RunsCode(marker)}, path / "consolidated.00.pth")
    message = bad_dir_error(path, capsys)
    assert "not a readable weights-only PyTorch checkpoint" in message
    assert not marker.exists()


def test_a_truncated_safetensors_file_is_an_error(checkpoints, tmp_path, capsys):
    path = tmp_path / "hf"
    shutil.copytree(checkpoints["hf_factor32_tied_gqa"][0], path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert "not a readable safetensors file" in bad_dir_error(path, capsys)


def test_llama_flags_that_do_not_fit_are_refused(checkpoints, capsys):
    path = str(checkpoints["hf_factor32_tied_gqa"][0])
    for argv, expected in [(["--llama-dir", path], "--llama-dir needs --sample"),
                           (["--sample", "--chat"], "--chat needs --llama-dir"),
                           (["--sample", "--llama-dir", path, "--dim", "32"], "--dim cannot go with --llama-dir"),
                           (["--sample", "--llama-dir", path, "--plot-attention"], "--plot-attention cannot go")]:
        with pytest.raises(SystemExit) as exit_info:
            main.main(argv)
        assert expected in str(exit_info.value.code)

