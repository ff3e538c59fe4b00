"""Chapter 5: Llama3Tokenizer against Meta's, load_llama against transformers, and the conversation.

Every checkpoint here is tiny and random, written by the tests (llama_checkpoints.py): transformers'
LlamaForCausalLM is the reference for the logits and for greedy text, llama-models' Tokenizer and
ChatFormat for the token ids.
"""

from __future__ import annotations

import importlib
import io
import json
import random
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import cli_error
from llama_checkpoints import (
    HF_SPECIAL_TOKENS,
    hf_config,
    hf_reference,
    permute_meta_to_hf,
    write_byte_tokenizer,
    write_hf_layout,
    write_meta_layout,
    write_meta_shape,
    write_tokenizer_json,
)
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaForCausalLM

import main
from plumbing.llama_fixtures import LLAMA_32_PARAMS, packaged_llama3_tokenizer

llama = importlib.import_module("05_llama3_tokenizer_and_weights")
precompute_freqs_cis = importlib.import_module("02_normalization_and_rope").precompute_freqs_cis
SEQLEN = 64
SILENT = lambda line: None  # noqa: E731 (load_llama's log)


def random_tokens(vocab_size: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab_size - 256, (2, SEQLEN), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def byte_tokenizer(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.model"
    write_byte_tokenizer(path)
    return path


# name: (config, layout, sharded). Meta's layout writes a tied output.weight as the embedding tensor itself.
CASES = {
    "hf_factor32_tied_gqa": (dict(factor=32.0, tied=True, n_kv_heads=2), "hf", False),
    "hf_factor8_untied_sharded": (dict(factor=8.0, tied=False, n_kv_heads=4), "hf", True),
    "hf_theta10k_untied": (dict(factor=None, tied=False, rope_theta=10000.0), "hf", False),
    "meta_scaled_untied_gqa": (dict(factor=8.0, tied=False, n_kv_heads=1), "meta", False),
    "meta_unscaled_tied": (dict(factor=None, tied=True, n_kv_heads=2), "meta", False),
    "meta_theta10k_tied": (dict(factor=8.0, tied=True, rope_theta=10000.0), "meta", False),
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
def real_tokenizer() -> Path:
    """Meta's real tokenizer.model, as the llama-models package ships it (requirements-test.txt)."""
    path = packaged_llama3_tokenizer()
    assert path is not None, "install requirements-test.txt: llama-models ships Meta's tokenizer.model"
    return path


@pytest.fixture(scope="module")
def llama3_tokenizer(real_tokenizer) -> llama.Llama3Tokenizer:
    return llama.Llama3Tokenizer(real_tokenizer)


@pytest.fixture(scope="module")
def metas_tokenizer(real_tokenizer):
    from llama_models.llama3.tokenizer import Tokenizer

    return Tokenizer(real_tokenizer)


def test_llama3_encode_matches_metas_ids(llama3_tokenizer):
    ids = llama3_tokenizer.encode("This is a test sentence.", bos=True, eos=True)
    assert ids == [128000, 2028, 374, 264, 1296, 11914, 13, 128001]
    assert llama3_tokenizer.decode(ids) == "<|begin_of_text|>This is a test sentence.<|end_of_text|>"
    assert llama3_tokenizer.vocab_size == 128256


def test_llama3_decode_round_trips_any_text(llama3_tokenizer):
    text = "ROMEO:\n  But soft! 1234567 naïve — 東京 🙂\t\r\n end"
    assert llama3_tokenizer.decode(llama3_tokenizer.encode(text)) == text


def test_llama3_special_tokens_equal_metas(llama3_tokenizer, metas_tokenizer):
    tok = llama3_tokenizer
    assert tok.special_tokens == metas_tokenizer.special_tokens
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (128000, 128001, 128004) == (
        metas_tokenizer.bos_id, metas_tokenizer.eos_id, metas_tokenizer.pad_id)
    assert tok.stop_ids == set(metas_tokenizer.stop_tokens) == {128001, 128008, 128009}


def test_llama3_bpe_equals_metas_on_the_whole_shakespeare_corpus(llama3_tokenizer, metas_tokenizer, shakespeare_path):
    """Meta's encode cuts the text every 400,000 characters; at 400,000 the corpus reads "...As |we...", so the
    cut changes the ids there (" we" -> " ", "we"). Ours cuts in the same places."""
    text = shakespeare_path.read_text(encoding="utf-8")
    ours = llama3_tokenizer.encode(text)
    assert ours == metas_tokenizer.encode(text, bos=False, eos=False)
    assert len(ours) == 301769 == len(llama3_tokenizer.model.encode_ordinary(text)) + 1  # uncut: one fewer


def random_unicode(rng: random.Random, n_pieces: int) -> str:
    """Letters of several scripts and cases, digits, punctuation, contractions in any case, whitespace of
    every kind, emoji and special-token names."""
    pieces = ["'s", "'S", "'LL", "'Re", "'ve", "'M", "'d", "'DEAR", " 12345", "\r\n", "\n\n", "\t", "\u3000", "\x1c",
              "  ", "<|eot_id|>", "🙂", "naïve", "Ελλάδα", "東京", "ROMEO", "!?", " —", "x"]
    alphabet = [chr(c) for c in (*range(0x20, 0x7f), *range(0xa0, 0x250), *range(0x391, 0x3ca), *range(0x4e00, 0x4e40))]
    return "".join(rng.choice(pieces) if rng.random() < 0.5 else rng.choice(alphabet) for _ in range(n_pieces))


def test_llama3_bpe_equals_metas_on_random_unicode(llama3_tokenizer, metas_tokenizer):
    rng = random.Random(0)
    texts = [random_unicode(rng, rng.randint(1, 300)) for _ in range(300)]
    # Runs of more than 25,000 non-spaces or spaces, which Meta's encode cuts (\x1c and \u3000 are spaces).
    letters = "".join(rng.choice("abcdefghijklmnopqrstuvwxyzé") for _ in range(80_000))
    long_runs = [letters + " b", " " * 30_000 + letters[:25_001], "\x1c\u3000" * 12_501 + "ab", letters[:25_003]]
    for text in texts + long_runs:
        assert llama3_tokenizer.encode(text) == metas_tokenizer.encode(text, bos=False, eos=False), text[:80]
    assert llama3_tokenizer.encode(letters) != llama3_tokenizer.model.encode_ordinary(letters)  # the cuts matter


def test_llama3_chat_format_equals_metas_encode_dialog_prompt(llama3_tokenizer, metas_tokenizer):
    """Content as it is, leading and trailing spaces included (Hugging Face's template would trim them)."""
    from llama_models.datatypes import RawMessage, StopReason
    from llama_models.llama3.chat_format import ChatFormat

    dialog = [{"role": "system", "content": "  You are a poet.\n"}, {"role": "user", "content": " Who is Romeo? "},
              {"role": "assistant", "content": "A Montague."}, {"role": "user", "content": "And <|eot_id|>?"}]
    metas = ChatFormat(metas_tokenizer).encode_dialog_prompt(
        [RawMessage(role=m["role"], content=m["content"], stop_reason=StopReason.end_of_turn) for m in dialog])
    assert llama3_tokenizer.encode_dialog_prompt(dialog) == metas.tokens
    # Meta's own test (llama-models, llama3/tests/api/test_tokenizer.py): one user message, then the assistant header.
    assert llama3_tokenizer.encode_dialog_prompt([{"role": "user", "content": "This is a test sentence."}]) == [
        128000, 128006, 882, 128007, 271, 2028, 374, 264, 1296, 11914, 13, 128009, 128006, 78191, 128007, 271]


def test_llama3_special_token_names_in_text_are_ordinary_text(llama3_tokenizer):
    """A prompt cannot forge a chat turn: "<|eot_id|>" typed as text is not the token 128009."""
    ids = llama3_tokenizer.encode("hi<|eot_id|>")
    assert all(i < 128000 for i in ids)
    assert llama3_tokenizer.decode(ids) == "hi<|eot_id|>"


@pytest.fixture(scope="module")
def tokenizer_jsons(tmp_path_factory, real_tokenizer) -> dict[str, Path]:
    """tokenizer.json for Meta's tokenizer.model in llama-models' naming and in Hugging Face's for 3.1/3.2 and 3.0."""
    root = tmp_path_factory.mktemp("tokenizer_json")
    namings = {"llama-models": None, **HF_SPECIAL_TOKENS}
    return {name: write_tokenizer_json(real_tokenizer, root / f"{name}.json", special_tokens)
            for name, special_tokens in namings.items()}


@pytest.mark.parametrize("naming", ["llama-models", "3.1", "3.0"])
def test_tokenizer_json_gives_the_ranks_and_the_special_tokens_by_role(llama3_tokenizer, tokenizer_jsons, naming):
    from_json = llama.Llama3Tokenizer(tokenizer_jsons[naming])
    assert from_json.model._mergeable_ranks == llama3_tokenizer.model._mergeable_ranks
    assert (from_json.bos_id, from_json.eos_id, from_json.eot_id) == (128000, 128001, 128009)
    assert from_json.special_tokens["<|start_header_id|>"] == 128006 and from_json.vocab_size == 128256
    if naming == "3.0":  # no <|eom_id|>, no padding token
        assert (from_json.eom_id, from_json.pad_id, from_json.stop_ids) == (None, None, {128001, 128009})
    else:
        assert (from_json.eom_id, from_json.pad_id, from_json.stop_ids) == (128008, 128004, {128001, 128008, 128009})
    assert (from_json.special_tokens == llama3_tokenizer.special_tokens) == (naming == "llama-models")
    text = random_unicode(random.Random(1), 2000)
    assert from_json.encode(text, bos=True) == llama3_tokenizer.encode(text, bos=True)
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who is Romeo?"}]
    assert from_json.encode_dialog_prompt(dialog) == llama3_tokenizer.encode_dialog_prompt(dialog)


def test_tokenizer_files_that_are_not_llama_3s_are_refused(tmp_path, tokenizer_jsons):
    bad = tmp_path / "tokenizer.model"
    bad.write_text('{"not": "a tiktoken file"}\n')
    with pytest.raises(ValueError, match="not a tiktoken BPE file"):
        llama.Llama3Tokenizer(bad)
    data = json.loads(tokenizer_jsons["3.1"].read_text())

    def refused(added_tokens: list[dict]) -> str:
        (tmp_path / "tokenizer.json").write_text(json.dumps({**data, "added_tokens": added_tokens}))
        with pytest.raises(ValueError) as e:
            llama.Llama3Tokenizer(tmp_path / "tokenizer.json")
        return str(e.value)

    added = data["added_tokens"]
    eot_renamed = [{**t, "content": "<|end_of_turn|>"} if t["content"] == "<|eot_id|>" else t for t in added]
    assert "has no <|eot_id|>: Llama 3's chat format needs them" in refused(eot_renamed)
    without_headers = [t for t in added if "header" not in t["content"]]  # and a gap at 128006
    assert "misplaced" in refused(without_headers)
    inside_the_ranks = [{**t, "id": t["id"] - 1} if t["content"] == "<|begin_of_text|>" else t for t in added]
    assert "misplaced: their ids must be 128000, 128001, ..., one each" in refused(inside_the_ranks)
    twice = [*added[:-1], {**added[-1], "content": "<|eot_id|>"}]  # one name for two ids
    assert "misplaced" in refused(twice)


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
    """The equalities above mean something: a wrong RoPE factor or theta, or no unpermuting, moves the logits
    by far more than their tolerance."""
    path, reference = checkpoints["hf_factor32_tied_gqa"]
    tokens = random_tokens(512)
    model, _ = llama.load_llama(path, max_seq_len=SEQLEN, log=SILENT)
    with torch.no_grad():
        expected = reference(tokens).logits
        errors = {}
        for name, theta, factor in [("factor 8", 500000.0, 8.0), ("theta 10000", 10000.0, 32.0)]:
            model.freqs_cis = precompute_freqs_cis(16, SEQLEN, theta, True, scale_factor=factor)
            errors[name] = (model(tokens)[0] - expected).abs().max()
        model.freqs_cis = precompute_freqs_cis(16, SEQLEN, 500000.0, True, scale_factor=32.0)
        for layer in model.layers:  # Hugging Face's row order put back
            layer.attention.wq.weight.copy_(permute_meta_to_hf(layer.attention.wq.weight, 4))
        errors["permuted"] = (model(tokens)[0] - expected).abs().max()
    assert min(errors.values()) > 1e-2, errors


def test_rope_settings_come_from_the_checkpoint(checkpoints):
    expected = {"hf_factor32_tied_gqa": (True, 32.0, 500000.0), "hf_factor8_untied_sharded": (True, 8.0, 500000.0),
                "hf_theta10k_untied": (False, 8.0, 10000.0), "meta_scaled_untied_gqa": (True, 8.0, 500000.0),
                "meta_unscaled_tied": (False, 8.0, 500000.0), "meta_theta10k_tied": (True, 8.0, 10000.0)}
    for case, settings in expected.items():
        model, _ = llama.load_llama(checkpoints[case][0], max_seq_len=SEQLEN, log=SILENT)
        assert (model.params.use_scaled_rope, model.params.rope_scaling_factor, model.params.rope_theta) == settings


@pytest.mark.parametrize("size", ["1B", "3B"])
def test_meta_layout_of_llama_32_1b_and_3b_gets_factor_32_end_to_end(tmp_path, real_tokenizer, size):
    """params.json as Meta ships it -> load_llama -> the rotations the model applies equal transformers'
    for Llama 3.2 (factor 32). The weights are stride-0 tensors: real shapes, a file of a few kilobytes."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = LLAMA_32_PARAMS[size]
    model, _ = llama.load_llama(write_meta_shape(tmp_path / size, params, real_tokenizer), max_seq_len=SEQLEN,
                                log=SILENT)
    config = hf_config(vocab_size=params["vocab_size"], n_heads=params["n_heads"], n_kv_heads=params["n_kv_heads"],
                       factor=32.0, hidden_size=params["dim"], num_hidden_layers=params["n_layers"])
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")  # (head_dim / 2,)
    angles = torch.outer(torch.arange(SEQLEN).float(), inv_freq.float())  # (SEQLEN, head_dim / 2)
    torch.testing.assert_close(model.freqs_cis, torch.polar(torch.ones_like(angles), angles))
    assert model.params.rope_scaling_factor == 32.0 and model.output.weight is model.tok_embeddings.weight


def test_meta_rope_factor_is_32_for_the_llama_32_small_shapes_only():
    shapes = {(2048, 16): 32.0, (3072, 28): 32.0, (4096, 32): 8.0, (8192, 80): 8.0, (2048, 28): 8.0, (64, 2): 8.0}
    for (dim, n_layers), factor in shapes.items():
        assert llama.meta_rope_scaling_factor(main.ModelArgs(dim=dim, n_layers=n_layers)) == factor


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


# ----------------------------------------------------------------------------- tying, counting, copying


@pytest.mark.parametrize("output", ["shared", "copy", "absent"])
def test_a_tied_output_is_the_embeddings_own_parameter(checkpoints, byte_tokenizer, tmp_path, output):
    """Meta's 1B and 3B files store output.weight as the embedding tensor itself ("shared"); a re-save may store
    an equal copy; Hugging Face's files leave it out. Each loads as one Parameter, counted once."""
    reference = checkpoints["meta_unscaled_tied"][1]
    path = write_meta_layout(tmp_path / output, reference, byte_tokenizer, output=output)
    lines = []
    model, _ = llama.load_llama(path, max_seq_len=SEQLEN, log=lines.append)
    assert model.output.weight is model.tok_embeddings.weight
    n_params = reference.num_parameters()  # transformers counts a tied matrix once
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert f"loaded {n_params:,} parameters (output tied to the embedding): {n_params * 4 / 1e9:.2f} GB" in lines[-1]


def test_an_untied_output_stays_its_own_parameter(checkpoints):
    for case in ("meta_scaled_untied_gqa", "hf_factor8_untied_sharded"):
        path, reference = checkpoints[case]
        model, _ = llama.load_llama(path, max_seq_len=SEQLEN, log=SILENT)
        assert model.output.weight is not model.tok_embeddings.weight
        assert not torch.equal(model.output.weight, model.tok_embeddings.weight)
        assert sum(p.numel() for p in model.parameters()) == reference.num_parameters()


def spy_on_reads(monkeypatch) -> dict[str, torch.Tensor]:
    """The tensors that load_llama reads from the file, as it reads them (before any conversion)."""
    read = {}
    for reader in ("read_meta_checkpoint", "read_hf_checkpoint"):
        real = getattr(llama, reader)

        def spy(*args, real=real):
            model_args, state_dict = real(*args)
            read.update(state_dict)
            return model_args, state_dict

        monkeypatch.setattr(llama, reader, spy)
    return read


@pytest.mark.parametrize("case", ["meta_theta10k_tied", "hf_factor32_tied_gqa"])
def test_loading_in_the_files_dtype_copies_nothing(checkpoints, monkeypatch, case):
    """The memory-mapped tensors become the parameters; only Hugging Face's wq and wk are copied, reordered."""
    read = spy_on_reads(monkeypatch)
    model, _ = llama.load_llama(checkpoints[case][0], max_seq_len=SEQLEN, log=SILENT)
    for name, p in model.state_dict().items():
        reordered = case.startswith("hf") and name.endswith(("wq.weight", "wk.weight"))
        assert (p.data_ptr() == read[name if name in read else "tok_embeddings.weight"].data_ptr()) != reordered, name


class CopiedBytes(TorchDispatchMode):
    """Counts the bytes that copying and converting operations write."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.clone.default, torch.ops.aten.copy_.default):
            self.bytes += out.numel() * out.element_size()
        return out


@pytest.mark.parametrize("case", ["meta_theta10k_tied", "hf_factor32_tied_gqa", "meta_scaled_untied_gqa"])
def test_a_dtype_change_converts_each_tensor_once(checkpoints, case):
    with CopiedBytes() as same_dtype:
        llama.load_llama(checkpoints[case][0], max_seq_len=SEQLEN, dtype=torch.float32, log=SILENT)
    with CopiedBytes() as converted:
        model, _ = llama.load_llama(checkpoints[case][0], max_seq_len=SEQLEN, dtype=torch.bfloat16, log=SILENT)
    with torch.device("meta"), CopiedBytes() as building:  # the model's RoPE table, made on the CPU
        main.Transformer(model.params)
    attention = [m.attention for m in model.layers]
    reordered = sum(a.wq.weight.numel() + a.wk.weight.numel() for a in attention) * 4 if case.startswith("hf") else 0
    assert same_dtype.bytes - building.bytes == reordered  # no copy but Hugging Face's wq and wk
    assert converted.bytes - building.bytes == sum(p.numel() * 2 for p in model.parameters())  # each once, bf16


@pytest.mark.parametrize("layout", ["meta", "hf"])
def test_a_bfloat16_checkpoint_stays_bfloat16(checkpoints, byte_tokenizer, tmp_path, layout, capsys):
    reference = checkpoints["meta_theta10k_tied"][1]
    write = write_meta_layout if layout == "meta" else write_hf_layout
    path = write(tmp_path / layout, reference, byte_tokenizer, dtype=torch.bfloat16)
    model, _ = llama.load_llama(path, max_seq_len=SEQLEN, log=SILENT)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.freqs_cis.dtype == torch.complex64
    llama.main(["--llama-dir", str(path), "--prompt", "Hi", "--max-new-tokens", "1", "--seq-len", "16"])
    assert "GB in bfloat16" in capsys.readouterr().err


def test_bfloat16_logits_stay_close_to_float32(checkpoints):
    path, _ = checkpoints["meta_scaled_untied_gqa"]
    tokens = random_tokens(512)
    fp32, _ = llama.load_llama(path, max_seq_len=SEQLEN, dtype=torch.float32, log=SILENT)
    bf16, _ = llama.load_llama(path, max_seq_len=SEQLEN, dtype=torch.bfloat16, log=SILENT)
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
    assert torch.equal(llama.unpermute_hf(w, 4, torch.bfloat16), llama.unpermute_hf(w, 4).to(torch.bfloat16))


@pytest.mark.parametrize("naming", ["3.1", "3.0"])
def test_a_directory_with_tokenizer_json_only_loads_and_chats_as_with_tokenizer_model(tmp_path, real_tokenizer,
                                                                                      tokenizer_jsons, naming):
    """Many re-uploads of Llama 3.2 ship Hugging Face's tokenizer.json, in Hugging Face's naming, and no
    tokenizer.model: the same weights then load, give transformers' logits, and chat token for token the same."""
    reference = hf_reference(hf_config(vocab_size=128256), seed=3)
    with_model = write_hf_layout(tmp_path / "with_model", reference, real_tokenizer)
    json_only = write_hf_layout(tmp_path / "json_only", reference, real_tokenizer, tokenizer_in_original=True)
    shutil.rmtree(json_only / "original")
    shutil.copy(tokenizer_jsons[naming], json_only / "tokenizer.json")
    chats = []
    for path in (with_model, json_only):
        model, tokenizer = llama.load_llama(path, max_seq_len=SEQLEN, log=SILENT)
        conversation = llama.Conversation(model, tokenizer, system="Be brief.", temperature=0)
        answers = [list(conversation.reply(message, 6)) for message in ("Who is Romeo?", "And Juliet?")]
        chats.append((answers, conversation.tokens))
    assert chats[0] == chats[1] and all(len(answer) >= 1 for answer in chats[1][0])
    assert tokenizer.encode("Hello", bos=True) == [128000, 9906]
    tokens = random_tokens(128256)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens)[0], reference(tokens).logits, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- a conversation


class ScriptedModel(torch.nn.Module):
    """Stands in for the Transformer in generation: its most likely next token is the next of `script`,
    and it records every call as (start_pos, tokens)."""

    def __init__(self, script: list[int], vocab_size: int = 128256, max_seq_len: int = 256):
        super().__init__()
        self.params = main.ModelArgs(vocab_size=vocab_size, max_seq_len=max_seq_len)
        self.tok_embeddings = torch.nn.Embedding(1, 1)
        self.script, self.calls, self.onednn = iter(script), [], []

    def forward(self, tokens: torch.Tensor, start_pos: int | None = None) -> tuple[torch.Tensor, None]:
        self.calls.append((start_pos, tokens[0].tolist()))
        self.onednn.append(torch.backends.mkldnn.enabled)
        logits = torch.zeros(1, tokens.shape[1], self.params.vocab_size)
        logits[0, -1, next(self.script)] = 1.0
        return logits, None


def test_a_conversation_feeds_each_turn_once_and_closes_a_cut_answer(llama3_tokenizer):
    tok = llama3_tokenizer
    a, b, c, d = tok.encode(" one two three four")
    model = ScriptedModel([a, b, c, d, tok.eot_id, a])
    conversation = llama.Conversation(model, tok, system="Be brief.", temperature=0)
    assert list(conversation.reply("Hi", max_new_tokens=3)) == [a, b, c]  # cut short by max_new_tokens
    assert list(conversation.reply("Go on", max_new_tokens=3)) == [d, tok.eot_id]  # stopped by the model
    assert list(conversation.reply("Bye", max_new_tokens=1)) == [a]
    user = lambda text: tok.encode_message("user", text) + tok.encode_header("assistant")  # noqa: E731
    first = [tok.bos_id, *tok.encode_message("system", "Be brief."), *user("Hi")]
    assert [tokens for _, tokens in model.calls] == [
        first, [a], [b],
        [c, tok.eot_id, *user("Go on")], [d],  # the cut answer's last token, then <|eot_id|> to close it
        [tok.eot_id, *user("Bye")],  # the model's own <|eot_id|> closes its answer: none added
    ]
    starts = [start for start, _ in model.calls]
    assert starts == [sum(len(t) for _, t in model.calls[:i]) for i in range(len(model.calls))]  # each token once
    assert conversation.tokens == [t for _, tokens in model.calls for t in tokens] + [a]
    assert conversation.tokens[: len(first) + 3] == tok.encode_dialog_prompt(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]) + [a, b, c]
    # One-token steps run on PyTorch's matrix-vector kernel, longer chunks on oneDNN's; the switch is put back.
    assert model.onednn == [len(tokens) > 1 for _, tokens in model.calls] and torch.backends.mkldnn.enabled


def test_a_full_context_ends_the_conversation_with_an_error(llama3_tokenizer):
    tok = llama3_tokenizer
    model = ScriptedModel([tok.encode("x")[0]] * 100, max_seq_len=20)
    conversation = llama.Conversation(model, tok, temperature=0)
    answer = conversation.reply("Hello", max_new_tokens=100)
    with pytest.raises(llama.ContextFull, match="the context is full"):
        for _ in answer:
            pass
    assert len(model.calls[-1][1]) == 1 and conversation.pos == 20  # the cache filled to its last position


@pytest.fixture(scope="module")
def real_vocab_checkpoints(tmp_path_factory, real_tokenizer) -> dict[str, tuple[Path, LlamaForCausalLM]]:
    """Llama 3's real vocabulary (128,256) on a dim-64 model, in both layouts."""
    root = tmp_path_factory.mktemp("real_vocab")
    hf_model = hf_reference(hf_config(vocab_size=128256, factor=32.0, tied=True), seed=10)
    meta_model = hf_reference(hf_config(vocab_size=128256, factor=8.0, tied=False, n_kv_heads=1), seed=11)
    return {"hf": (write_hf_layout(root / "hf", hf_model, real_tokenizer, tokenizer_in_original=True), hf_model),
            "meta": (write_meta_layout(root / "meta", meta_model, real_tokenizer), meta_model)}


def greedy_transformers(reference: LlamaForCausalLM, tokens: list[int], n_new: int) -> list[int]:
    """transformers' greedy continuation of `tokens`, ending at a stop token (included) as ours does."""
    with torch.no_grad():
        out = reference.generate(torch.tensor([tokens]), do_sample=False, max_new_tokens=n_new, pad_token_id=0)
    return out[0, len(tokens) :].tolist()


@pytest.mark.parametrize("layout", ["hf", "meta"])
def test_cli_greedy_text_equals_transformers_greedy_decoding(real_vocab_checkpoints, llama3_tokenizer, layout, capsys):
    path, reference = real_vocab_checkpoints[layout]
    prompt, n_new = "ROMEO: But soft, what light", 12
    llama.main(["--llama-dir", str(path), "--prompt", prompt, "--temperature", "0",
               "--max-new-tokens", str(n_new), "--dtype", "float32", "--seq-len", "64"])
    out = capsys.readouterr()
    generated = greedy_transformers(reference, llama3_tokenizer.encode(prompt, bos=True), n_new)
    assert len([t for t in generated if t not in llama3_tokenizer.stop_ids]) >= 3
    assert out.out == prompt + llama3_tokenizer.decode([t for t in generated if t < 128000]) + "\n"
    assert "loaded" in out.err and "GB in float32" in out.err


@pytest.fixture
def recorded_conversations(monkeypatch) -> list:
    """Every Conversation the command line makes."""
    made = []

    class Recorded(llama.Conversation):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(llama, "Conversation", Recorded)
    return made


def test_cli_chat_prints_the_answer_on_its_own_line(real_vocab_checkpoints, llama3_tokenizer, recorded_conversations,
                                                    capsys):
    question = "Who wrote Romeo and Juliet?"
    llama.main(["--llama-dir", str(real_vocab_checkpoints["hf"][0]), "--chat", "--prompt", question,
               "--max-new-tokens", "5", "--seq-len", "64"])
    (conversation,) = recorded_conversations
    prompt = llama3_tokenizer.encode_dialog_prompt([{"role": "user", "content": question}])
    answer = conversation.tokens[len(prompt) :]
    assert conversation.tokens[: len(prompt)] == prompt and len(answer) >= 1
    answer_text = llama3_tokenizer.decode([t for t in answer if t not in llama3_tokenizer.stop_ids])
    assert capsys.readouterr().out == f"> {question}\n{answer_text}\n"


def test_a_two_turn_conversation_continues_as_transformers_does(real_vocab_checkpoints, llama3_tokenizer,
                                                                recorded_conversations, monkeypatch, capsys):
    """Turns from stdin; the second answer is transformers' greedy continuation of the same token history."""
    path, reference = real_vocab_checkpoints["meta"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("Who is Romeo?\nAnd Juliet?\n/exit\nnever read\n"))
    llama.main(["--llama-dir", str(path), "--chat", "--system", "You are a poet.", "--temperature", "0",
               "--max-new-tokens", "6", "--dtype", "float32", "--seq-len", "128"])
    (conversation,) = recorded_conversations
    tok, history = llama3_tokenizer, conversation.tokens
    second_turn = tok.encode_message("user", "And Juliet?") + tok.encode_header("assistant")
    start = max(i for i in range(len(history)) if history[i : i + len(second_turn)] == second_turn) + len(second_turn)
    assert history[start:] == greedy_transformers(reference, history[:start], 6)
    opening = tok.encode_dialog_prompt([{"role": "system", "content": "You are a poet."},
                                        {"role": "user", "content": "Who is Romeo?"}])
    assert history[: len(opening)] == opening
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "> Who is Romeo?" and "> And Juliet?" in lines and "never read" not in "".join(lines)


def test_cli_full_context_is_one_error_line(checkpoints, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello there\n" * 10))
    with pytest.raises(SystemExit) as exit_info:
        llama.main(["--llama-dir", str(checkpoints["meta_theta10k_tied"][0]), "--chat", "--max-new-tokens", "8",
                   "--seq-len", "48"])
    assert str(exit_info.value.code) == "error: the context is full (48 tokens, --seq-len): the conversation ends here"
    out = capsys.readouterr()
    assert out.out.endswith("\n") and out.out.count("> Hello there") >= 2 and "Traceback" not in out.err


def biased_load(monkeypatch, probs: dict[int, float]):
    """load_llama whose model's next-token distribution is `probs` ({token: probability}), whatever the input."""
    load_llama = llama.load_llama

    def load(*args, **kwargs):
        model, tokenizer = load_llama(*args, **kwargs)
        model.output = torch.nn.Linear(model.params.dim, model.params.vocab_size, bias=True)
        with torch.no_grad():
            model.output.weight.zero_()
            model.output.bias.fill_(-1e9)
            for token, p in probs.items():
                model.output.bias[token] = torch.tensor(p).log()
        return model, tokenizer

    monkeypatch.setattr(llama, "load_llama", load)


@pytest.mark.parametrize(("temperature", "top_p", "expected"), [
    (1.0, 1.0, {"a": 0.5, "b": 0.3, "c": 0.2}),
    (1.0, 0.6, {"a": 0.5 / 0.8, "b": 0.3 / 0.8}),  # c is outside the nucleus: a and b already hold 0.8 > 0.6
    (1.0, 0.4, {"a": 1.0}),  # a alone crosses 0.4
    (0.5, 1.0, {"a": 0.25 / 0.38, "b": 0.09 / 0.38, "c": 0.04 / 0.38}),  # p ** (1 / T), renormalized
    (0.0, 1.0, {"a": 1.0}),  # greedy
])
def test_cli_sampling_follows_temperature_and_top_p(checkpoints, monkeypatch, capsys, temperature, top_p, expected):
    biased_load(monkeypatch, {ord("a"): 0.5, ord("b"): 0.3, ord("c"): 0.2})  # the byte tokenizer: "a" is 97
    n = 400
    llama.main(["--llama-dir", str(checkpoints["meta_theta10k_tied"][0]), "--prompt", ">", "--seq-len", str(n + 2),
               "--max-new-tokens", str(n), "--temperature", str(temperature), "--top-p", str(top_p)])
    text = capsys.readouterr().out.removeprefix(">").removesuffix("\n")
    assert len(text) == n and set(text) == set(expected)
    for char, p in expected.items():
        assert abs(text.count(char) / n - p) < 0.08, (char, text.count(char) / n, p)


@pytest.mark.parametrize("stop", ["<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"])
def test_cli_stops_at_a_stop_token(checkpoints, monkeypatch, capsys, stop):
    stop_id = 256 + llama.LLAMA3_SPECIAL_TOKENS.index(stop)  # the byte tokenizer's special tokens follow its 256
    biased_load(monkeypatch, {stop_id: 0.6, ord("x"): 0.4})  # "x" is what comes next if the stop is missed
    llama.main(["--llama-dir", str(checkpoints["meta_theta10k_tied"][0]), "--prompt", "Hello",
               "--temperature", "0", "--max-new-tokens", "5", "--seq-len", "16"])
    assert capsys.readouterr().out == "Hello\n"


def test_cli_prints_a_character_split_over_two_tokens_whole(checkpoints, monkeypatch, capsys):
    """"🙂" is four bytes, so four tokens of the byte tokenizer; none may be printed alone (as "\ufffd")."""
    script = iter("🙂".encode())
    monkeypatch.setattr(llama, "sample_next", lambda *args: torch.tensor([[next(script)]]))
    llama.main(["--llama-dir", str(checkpoints["meta_theta10k_tied"][0]), "--prompt", "Hi",
               "--max-new-tokens", "4", "--seq-len", "16"])
    assert capsys.readouterr().out == "Hi🙂\n"


def test_the_demo_runs_without_llama_models(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(llama.llama_fixtures, "packaged_llama3_tokenizer", lambda: None)
    llama.main(["--fig-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "output.weight is tok_embeddings.weight: True" in out
    assert "Hugging Face's layout against Meta's: max |difference| = 0 (should be 0)" in out
    assert "Llama 3.2 1B: 1,235,814,400 parameters" in out
    assert (tmp_path / "05_llama3_weights.png").read_bytes().startswith(b"\x89PNG")


# ----------------------------------------------------------------------------- bad directories and flags


def bad_dir_error(path: Path, capsys, *flags: str) -> str:
    """Run the CLI on `path` and return its one error line."""
    message = cli_error(["--llama-dir", path, "--max-new-tokens", "1", *flags], llama.main)
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
    (path / "params.json").write_text(json.dumps({**params, "vision_chunk_size": 560}))
    assert "unknown keys vision_chunk_size" in bad_dir_error(path, capsys)
    (path / "params.json").write_text("{not json")
    assert "not valid JSON" in bad_dir_error(path, capsys)
    (path / "params.json").write_text(json.dumps(params))
    state_dict = torch.load(path / "consolidated.00.pth", weights_only=True)
    torch.save({k: v for k, v in state_dict.items() if k != "tok_embeddings.weight"}, path / "consolidated.00.pth")
    assert "missing tok_embeddings.weight" in bad_dir_error(path, capsys)

    hf = tmp_path / "hf"
    shutil.copytree(checkpoints["hf_factor32_tied_gqa"][0], hf)
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "intermediate_size": 256}))
    assert "has shape" in bad_dir_error(hf, capsys)
    (hf / "config.json").write_text(json.dumps({**config, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}}))
    assert "'yarn' is not Llama 3's" in bad_dir_error(hf, capsys)
    (hf / "config.json").write_text(json.dumps({**config, "model_type": "mistral"}))
    assert "not 'llama'" in bad_dir_error(hf, capsys)


def test_a_prompt_longer_than_the_context_is_an_error(checkpoints, capsys):
    message = bad_dir_error(checkpoints["meta_scaled_untied_gqa"][0], capsys, "--prompt", "x" * 40, "--seq-len", "32")
    assert "the context is full (32 tokens, --seq-len)" in message


def test_system_needs_chat(checkpoints, capsys):
    with pytest.raises(SystemExit) as exit_info:
        llama.main(["--llama-dir", str(checkpoints["meta_scaled_untied_gqa"][0]), "--system", "Be brief."])
    assert exit_info.value.code == 2 and "error: --system needs --chat" in capsys.readouterr().err


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
    assert "not a readable weights-only PyTorch checkpoint" in bad_dir_error(path, capsys)
    assert not marker.exists()


def test_a_truncated_safetensors_file_is_an_error(checkpoints, tmp_path, capsys):
    path = tmp_path / "hf"
    shutil.copytree(checkpoints["hf_factor32_tied_gqa"][0], path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert "not a readable safetensors file" in bad_dir_error(path, capsys)
