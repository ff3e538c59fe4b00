"""Tiny random Llama 3 checkpoints in Meta's and Hugging Face's layouts, for the tests of chapters 5 and 6.

transformers' LlamaForCausalLM is the reference: its weights are written as Hugging Face writes them, or under
Meta's names with wq and wk in Meta's row order (the way Meta's weights relate to Hugging Face's).
"""

from __future__ import annotations

import base64
import importlib
import json
import shutil
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

llama = importlib.import_module("05_llama3_tokenizer_and_weights")
blocks = importlib.import_module("04_feedforward_and_transformer_block")


def write_byte_tokenizer(path: Path) -> None:
    """A tokenizer.model with the 256 single bytes only: vocab_size 256 + 256 special tokens = 512."""
    path.write_text("".join(f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(256)))


def hf_config(vocab_size: int = 512, n_heads: int = 4, n_kv_heads: int = 2, factor: float | None = 32.0,
              tied: bool = True, rope_theta: float = 500000.0, **overrides) -> LlamaConfig:
    """A tiny Llama 3 in transformers' terms: dim 64, 2 layers; `factor` None for no RoPE scaling."""
    rope = {"rope_type": "default", "rope_theta": rope_theta}
    if factor is not None:
        rope = {"rope_type": "llama3", "rope_theta": rope_theta, "factor": factor, "low_freq_factor": 1.0,
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


def meta_state_dict(model: LlamaForCausalLM, output: str = "shared") -> dict[str, torch.Tensor]:
    """The reference's weights under Meta's names, wq and wk in Meta's order (undoing the permutation
    by its index: this does not use unpermute_hf). A tied model's output.weight is, by `output`:
    "shared" the embedding tensor itself (Meta's 1B and 3B files), "copy" an equal copy, "absent" left out."""
    config = model.config
    out = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        meta_name = llama.rename(name, llama.HF_NAMES)
        if meta_name.endswith(("attention.wq.weight", "attention.wk.weight")):
            heads = config.num_attention_heads if "wq" in meta_name else config.num_key_value_heads
            order = permute_meta_to_hf(torch.arange(tensor.shape[0]).view(-1, 1), heads).view(-1)
            tensor = tensor[torch.argsort(order)]
        out[meta_name] = tensor.clone().contiguous()
    if config.tie_word_embeddings and output != "absent":
        embedding = out["tok_embeddings.weight"]
        out["output.weight"] = embedding if output == "shared" else embedding.clone()
    return out


def write_meta_layout(path: Path, model: LlamaForCausalLM, tokenizer: Path, output: str = "shared",
                      dtype: torch.dtype | None = None) -> Path:
    """Meta's layout of the reference, its tensors in `dtype` (default: the reference's); `output` as in
    meta_state_dict."""
    config = model.config
    path.mkdir(parents=True)
    params = {"dim": config.hidden_size, "n_layers": config.num_hidden_layers, "n_heads": config.num_attention_heads,
              "n_kv_heads": config.num_key_value_heads, "vocab_size": config.vocab_size, "multiple_of": 16,
              "ffn_dim_multiplier": None, "norm_eps": config.rms_norm_eps,
              "rope_theta": config.rope_parameters["rope_theta"],
              "use_scaled_rope": config.rope_parameters["rope_type"] == "llama3"}
    assert blocks.ffn_hidden_dim(4 * config.hidden_size, 16, None) == config.intermediate_size
    (path / "params.json").write_text(json.dumps(params))
    state_dict = meta_state_dict(model, output)
    converted = {id(t): t.to(dtype or t.dtype) for t in state_dict.values()}  # a shared tensor stays shared
    torch.save({name: converted[id(t)] for name, t in state_dict.items()}, path / "consolidated.00.pth")
    shutil.copy(tokenizer, path / "tokenizer.model")
    return path


def write_hf_layout(path: Path, model: LlamaForCausalLM, tokenizer: Path, sharded: bool = False,
                    tokenizer_in_original: bool = False, dtype: torch.dtype | None = None) -> Path:
    """Hugging Face's layout of the reference (save_pretrained), its tensors in `dtype` (default: the reference's)."""
    if dtype is not None and dtype != model.dtype:  # a converted copy: the reference stays as it is
        copy = LlamaForCausalLM(model.config).to(dtype)
        copy.load_state_dict(model.state_dict())
        model = copy
    model.save_pretrained(path, max_shard_size="100KB" if sharded else "10GB")
    (path / "original").mkdir()
    shutil.copy(tokenizer, path / ("original" if tokenizer_in_original else ".") / "tokenizer.model")
    return path


# The special tokens' names in Hugging Face's tokenizer.json files, which differ from llama-models' (chapter 5's
# LLAMA3_SPECIAL_TOKENS): in Llama 3.1 and 3.2, 128005 and 128011 are reserved tokens and the numbering of the
# reserved ones runs on from there; Llama 3.0 has no <|eom_id|>, <|python_tag|> or <|finetune_right_pad_id|>.
HF_SPECIAL_TOKENS = {
    "3.1": ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
            "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", *(f"<|reserved_special_token_{i}|>" for i in range(3, 248))],
    "3.0": ["<|begin_of_text|>", "<|end_of_text|>", *(f"<|reserved_special_token_{i}|>" for i in range(4)),
            "<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>",
            *(f"<|reserved_special_token_{i}|>" for i in range(5, 251))],
}


def write_tokenizer_json(tokenizer_model: Path, path: Path, special_tokens: list[str] | None = None) -> Path:
    """Hugging Face's tokenizer.json for Meta's tokenizer.model, as transformers' converter writes it, with these
    special tokens (default: llama-models' names)."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    converter = TikTokenConverter(vocab_file=str(tokenizer_model), pattern=llama.LLAMA3_PAT_STR,
                                  extra_special_tokens=special_tokens or llama.LLAMA3_SPECIAL_TOKENS)
    converter.converted().save(str(path))
    return path


def write_meta_shape(path: Path, params: dict, tokenizer: Path) -> Path:
    """Meta's layout of a model of these params.json whose every tensor is one number repeated (stride 0), with
    output.weight the embedding tensor itself: the real shapes of a large model in a file of a few kilobytes."""
    with torch.device("meta"):
        shapes = llama.Transformer(llama.ModelArgs(**params)).state_dict()
    state_dict = {name: torch.full((1,) * len(t.shape), 0.01, dtype=torch.bfloat16).expand(t.shape)
                  for name, t in shapes.items() if name != "output.weight"}
    state_dict["output.weight"] = state_dict["tok_embeddings.weight"]
    path.mkdir(parents=True)
    torch.save(state_dict, path / "consolidated.00.pth")
    (path / "params.json").write_text(json.dumps(params))
    shutil.copy(tokenizer, path / "tokenizer.model")
    return path
