"""Chapter 5: Llama3Tokenizer against Meta's, and load_llama and the command line against transformers.

Every checkpoint here is tiny and random, written by the tests (llama_checkpoints.py): transformers'
LlamaForCausalLM is the reference for the logits and for greedy text.
"""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from llama_checkpoints import (
    hf_config,
    hf_reference,
    permute_meta_to_hf,
    write_byte_tokenizer,
    write_hf_layout,
    write_meta_layout,
)
from transformers import LlamaForCausalLM

import main

llama = importlib.import_module("05_llama3_tokenizer_and_weights")
SEQLEN = 64
SILENT = lambda line: None  # noqa: E731 (load_llama's log)


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


# ----------------------------------------------------------------------------- Llama 3's tokenizer


@pytest.fixture(scope="module")
def llama3_tokenizer() -> llama.Llama3Tokenizer:
    """Meta's real tokenizer.model, as the llama-models package ships it (requirements-test.txt)."""
    path = llama.packaged_llama3_tokenizer()
    assert path is not None, "install requirements-test.txt: llama-models ships Meta's tokenizer.model"
    return llama.Llama3Tokenizer(path)


def test_llama3_encode_matches_metas_ids(llama3_tokenizer):
    ids = llama3_tokenizer.encode("This is a test sentence.", bos=True, eos=True)
    assert ids == [128000, 2028, 374, 264, 1296, 11914, 13, 128001]
    assert llama3_tokenizer.decode(ids) == "<|begin_of_text|>This is a test sentence.<|end_of_text|>"
    assert llama3_tokenizer.vocab_size == 128256


def test_llama3_decode_round_trips_any_text(llama3_tokenizer):
    text = "ROMEO:\n  But soft! 1234567 naïve — 東京 🙂\t\r\n end"
    assert llama3_tokenizer.decode(llama3_tokenizer.encode(text)) == text


def test_llama3_special_tokens_are_numbered_as_metas(llama3_tokenizer):
    tok = llama3_tokenizer
    named = {"<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "<|finetune_right_pad_id|>": 128004,
             "<|start_header_id|>": 128006, "<|end_header_id|>": 128007, "<|eom_id|>": 128008, "<|eot_id|>": 128009,
             "<|python_tag|>": 128010, "<|image|>": 128011, "<|reserved_special_token_2|>": 128012,
             "<|reserved_special_token_245|>": 128255}
    assert {name: tok.special_tokens[name] for name in named} == named
    assert len(tok.special_tokens) == 256
    assert (tok.bos_id, tok.eos_id) == (128000, 128001)
    assert tok.stop_ids == {128001, 128008, 128009}


def test_llama3_special_tokens_equal_those_of_metas_tokenizer(llama3_tokenizer):
    from llama_models.llama3.tokenizer import Tokenizer

    metas = Tokenizer(llama.packaged_llama3_tokenizer())
    assert llama3_tokenizer.special_tokens == metas.special_tokens
    text = "Meta's tokenizer and ours: 12345 tokens, naïve   spaces\n\n\tand <|eot_id|> as text."
    assert llama3_tokenizer.encode(text, bos=True) == metas.encode(text, bos=True, eos=False)


def test_llama3_chat_turn_matches_metas_ids(llama3_tokenizer):
    """The ids of Meta's own tests (llama-models, llama3/tests/api/test_tokenizer.py): one user message,
    then the assistant header that a dialog prompt ends with."""
    user_turn = [128006, 882, 128007, 271, 2028, 374, 264, 1296, 11914, 13, 128009]
    assistant_header = [128006, 78191, 128007, 271]
    assert llama3_tokenizer.encode_chat("This is a test sentence.") == [128000, *user_turn, *assistant_header]


def test_llama3_special_token_names_in_text_are_ordinary_text(llama3_tokenizer):
    """A prompt cannot forge a chat turn: "<|eot_id|>" typed as text is not the token 128009."""
    ids = llama3_tokenizer.encode("hi<|eot_id|>")
    assert all(i < 128000 for i in ids)
    assert llama3_tokenizer.decode(ids) == "hi<|eot_id|>"


def test_llama3_tokenizer_refuses_a_file_that_is_not_bpe_ranks(tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_text('{"not": "a tiktoken file"}\n')
    with pytest.raises(ValueError, match="not a tiktoken BPE file"):
        llama.Llama3Tokenizer(bad)


# ----------------------------------------------------------------------------- logits against transformers


@pytest.mark.parametrize("case", list(CASES))
def test_logits_equal_transformers(checkpoints, case):
    path, reference = checkpoints[case]
    tokens = random_tokens(reference.config.vocab_size)
    model, tokenizer = llama.load_llama(path, max_seq_len=SEQLEN, dtype=torch.float32, log=SILENT)
    assert tokenizer.vocab_size == model.params.vocab_size == 512
    with torch.no_grad():
        expected = reference(tokens).logits
        logits, _ = model(tokens)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


def test_the_tiny_checkpoints_tell_the_rope_variants_apart(checkpoints):
    """The equality above means something: a wrong RoPE factor, or no unpermuting, moves the logits by far more."""
    path, reference = checkpoints["hf_factor32_tied_gqa"]
    tokens = random_tokens(512)
    model, _ = llama.load_llama(path, max_seq_len=SEQLEN, log=SILENT)
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
        model, _ = llama.load_llama(checkpoints[case][0], max_seq_len=SEQLEN, log=SILENT)
        assert (model.output.weight is model.tok_embeddings.weight) == tied, case


def test_rope_scaling_settings_come_from_the_checkpoint(checkpoints):
    expected = {"hf_factor32_tied_gqa": (True, 32.0), "hf_factor8_untied_sharded": (True, 8.0),
                "meta_scaled_untied_gqa": (True, 8.0), "meta_unscaled_tied": (False, 8.0)}
    for case, (scaled, factor) in expected.items():
        model, _ = llama.load_llama(checkpoints[case][0], max_seq_len=SEQLEN, log=SILENT)
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
    model, _ = llama.load_llama(legacy, max_seq_len=SEQLEN, dtype=torch.float32, log=SILENT)
    tokens = random_tokens(512)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens)[0], reference(tokens).logits, atol=1e-4, rtol=0)


def test_meta_rope_factor_is_32_for_the_llama_32_small_shapes_only():
    """params.json does not carry the factor: the loader infers it from (dim, n_layers)."""
    shapes = {(2048, 16): 32.0, (3072, 28): 32.0, (4096, 32): 8.0, (8192, 80): 8.0, (2048, 28): 8.0, (64, 2): 8.0}
    for (dim, n_layers), factor in shapes.items():
        assert llama.meta_rope_scaling_factor(main.ModelArgs(dim=dim, n_layers=n_layers)) == factor


def test_bfloat16_logits_stay_close_to_float32(checkpoints):
    path, _ = checkpoints["meta_scaled_untied_gqa"]
    tokens = random_tokens(512)
    fp32, _ = llama.load_llama(path, max_seq_len=SEQLEN, dtype=torch.float32, log=SILENT)
    bf16, _ = llama.load_llama(path, max_seq_len=SEQLEN, dtype=torch.bfloat16, log=SILENT)
    assert bf16.tok_embeddings.weight.dtype == torch.bfloat16 and bf16.freqs_cis.dtype == torch.complex64
    with torch.no_grad():
        a, b = fp32(tokens)[0], bf16(tokens)[0]
    assert F.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.999
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9


def test_hf_permutation_round_trips():
    w = torch.randn(4 * 16, 64)
    for n_heads in (1, 4):
        torch.testing.assert_close(llama.unpermute_hf(permute_meta_to_hf(w, n_heads), n_heads), w, rtol=0, atol=0)
        torch.testing.assert_close(permute_meta_to_hf(llama.unpermute_hf(w, n_heads), n_heads), w, rtol=0, atol=0)
    assert not torch.equal(llama.unpermute_hf(w, 4), w)


def test_loading_holds_the_checkpoints_tensors_not_copies(checkpoints):
    """assign=True: the mmap-ed tensors become the parameters (a norm gain is never permuted or cast)."""
    path, _ = checkpoints["meta_scaled_untied_gqa"]
    stored = torch.load(path / "consolidated.00.pth", mmap=True, weights_only=True)
    model, _ = llama.load_llama(path, max_seq_len=SEQLEN, log=SILENT)
    assert model.norm.weight.dtype == stored["norm.weight"].dtype
    assert torch.equal(model.norm.weight, stored["norm.weight"])
    assert model.layers[0].feed_forward.w1.weight.device.type == "cpu"
    assert not any(p.is_meta for p in model.parameters())


# ----------------------------------------------------------------------------- the command line, real tokenizer


@pytest.fixture(scope="module")
def real_tokenizer() -> Path:
    path = llama.packaged_llama3_tokenizer()
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
    llama.main(["--llama-dir", str(path), "--prompt", prompt, "--temperature", "0",
               "--max-new-tokens", str(n_new), "--dtype", "float32", "--seq-len", "64"])
    out = capsys.readouterr()
    tokenizer = llama.Llama3Tokenizer(real_tokenizer)
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
    real = llama.generate_tokens
    monkeypatch.setattr(llama, "generate_tokens", lambda model, tokens, *a, **k: seen.append(tokens) or real(
        model, tokens, *a, **k))
    llama.main(["--llama-dir", str(real_vocab_checkpoints["hf"][0]), "--chat", "--prompt",
               "This is a test sentence.", "--max-new-tokens", "2", "--seq-len", "32"])
    assert seen == [llama.Llama3Tokenizer(real_tokenizer).encode_chat("This is a test sentence.")]
    assert capsys.readouterr().out.startswith("This is a test sentence.")


@pytest.mark.parametrize("stop", ["<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"])
def test_cli_stops_at_a_stop_token(real_vocab_checkpoints, capsys, monkeypatch, stop):
    load_llama = llama.load_llama

    def load_a_model_that_always_says_stop(*args, **kwargs):
        model, tokenizer = load_llama(*args, **kwargs)
        model.output = torch.nn.Linear(64, 128256, bias=True)
        with torch.no_grad():
            model.output.weight.zero_()
            model.output.bias.zero_()
            model.output.bias[tokenizer.special_tokens[stop]] = 50.0
            model.output.bias[tokenizer.encode("x")[0]] = 49.0  # what comes next if the stop is missed
        return model, tokenizer

    monkeypatch.setattr(llama, "load_llama", load_a_model_that_always_says_stop)
    llama.main(["--llama-dir", str(real_vocab_checkpoints["meta"][0]), "--prompt", "Hello",
               "--temperature", "0", "--max-new-tokens", "5", "--seq-len", "16"])
    assert capsys.readouterr().out == "Hello\n"


def test_cli_streams_a_character_split_over_two_tokens_whole(real_vocab_checkpoints, capsys, monkeypatch):
    """"🙂" is two tokens; the first alone decodes to a replacement character, which must not be printed."""
    tokenizer = llama.Llama3Tokenizer(llama.packaged_llama3_tokenizer())
    ids = tokenizer.encode("a🙂b")
    assert tokenizer.decode(ids[:2]).endswith("\ufffd")
    monkeypatch.setattr(llama, "generate_tokens", lambda *args, **kwargs: iter(ids))
    llama.main(["--llama-dir", str(real_vocab_checkpoints["meta"][0]), "--prompt", "Hello",
               "--seq-len", "16"])
    assert capsys.readouterr().out == "Helloa🙂b\n"


# ----------------------------------------------------------------------------- bad directories


def bad_dir_error(path: Path, capsys) -> str:
    """Run the CLI on `path` and return its one error line."""
    with pytest.raises(SystemExit) as exit_info:
        llama.main(["--llama-dir", str(path), "--max-new-tokens", "1"])
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
