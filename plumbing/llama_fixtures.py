"""Made-up Llama 3 checkpoints for chapter 5's demo, the tests and the benchmarks, which cannot download Meta's:
random weights with Meta's names and shapes, written in Meta's layout and in Hugging Face's; Meta's real
tokenizer.model where the llama-models package ships it; a model's parameters counted by part. Chapter 5 teaches
the formats (and writes the Hugging Face state dict, `hf_state_dict`); this only writes files."""

from __future__ import annotations

import base64
import importlib.util
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from main import ModelArgs, Transformer
from plumbing.llama_files import LLAMA3_ROPE

# params.json of Meta's Llama 3.2 1B and 3B.
LLAMA_32_PARAMS = {
    "1B": {"dim": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256, "multiple_of": 256,
           "ffn_dim_multiplier": 1.5, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True},
    "3B": {"dim": 3072, "n_layers": 28, "n_heads": 24, "n_kv_heads": 8, "vocab_size": 128256, "multiple_of": 256,
           "ffn_dim_multiplier": 1.0, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True},
}
# A tiny Llama 3 for chapter 5's demo, with the byte tokenizer's 512 tokens.
TINY_PARAMS = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 512, "multiple_of": 32,
               "ffn_dim_multiplier": None, "norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": True}
# A tokenizer.model of the 256 single bytes only: with the 256 special tokens, vocab_size 512.
BYTE_TOKENIZER = "".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256))


def packaged_llama3_tokenizer() -> Path | None:
    """Meta's tokenizer.model as the llama-models package ships it (a test dependency), else None."""
    spec = importlib.util.find_spec("llama_models")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "llama3" / "tokenizer.model"
    return path if path.is_file() else None


def tied_meta_model(params: dict) -> Transformer:
    """The model of a params.json on the meta device (shapes, no memory), its output tied to the embedding as in
    Llama 3.2 1B and 3B: for counting parameters."""
    with torch.device("meta"):
        model = Transformer(ModelArgs(**params))
    model.output.weight = model.tok_embeddings.weight
    return model


def parameter_counts(params: dict) -> dict[str, int]:
    """A model's parameters by part, with the output tied."""
    model = tied_meta_model(params)
    parts = {"embedding = output": "tok_embeddings", "attention": ".attention.", "feed-forward": ".feed_forward.",
             "norms": "norm"}
    return {part: sum(p.numel() for name, p in model.named_parameters() if key in name) for part, key in parts.items()}


def random_llama(params: dict, std: float, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random weights with Meta's names and shapes for `params` (params.json's keys): matrices of normal
    numbers of this std, norm gains 1, and output.weight the embedding tensor itself, as in Meta's 1B and 3B files."""
    generator = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        shapes = Transformer(ModelArgs(**params)).state_dict()
    weights = {name: (torch.randn(t.shape, generator=generator) * std if t.dim() == 2 else torch.ones(t.shape))
               .to(dtype) for name, t in shapes.items() if name != "output.weight"}
    return {**weights, "output.weight": weights["tok_embeddings.weight"]}


def write_meta_layout(path: Path, weights: dict[str, torch.Tensor], params: dict, tokenizer: str) -> Path:
    """Meta's layout: params.json, consolidated.00.pth, and `tokenizer` (a tokenizer.model's text)."""
    path.mkdir(parents=True)
    (path / "params.json").write_text(json.dumps(params))
    torch.save(weights, path / "consolidated.00.pth")
    (path / "tokenizer.model").write_text(tokenizer)
    return path


def write_hf_layout(path: Path, hf_weights: dict[str, torch.Tensor], params: dict, rope_factor: float,
                    tokenizer: str) -> Path:
    """Hugging Face's layout of a params.json's model: model.safetensors of `hf_weights` (chapter 5's
    hf_state_dict), the config.json that Hugging Face's conversion script writes, and `tokenizer` as
    tokenizer.model. A state dict without lm_head.weight is a tied model."""
    path.mkdir(parents=True)
    save_file(hf_weights, path / "model.safetensors")
    rope = ({"rope_type": "llama3", "rope_theta": params["rope_theta"], "factor": rope_factor, **LLAMA3_ROPE}
            if params["use_scaled_rope"] else {"rope_type": "default", "rope_theta": params["rope_theta"]})
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": params["dim"],
              "num_hidden_layers": params["n_layers"], "num_attention_heads": params["n_heads"],
              "num_key_value_heads": params["n_kv_heads"], "vocab_size": params["vocab_size"],
              "intermediate_size": hf_weights["model.layers.0.mlp.gate_proj.weight"].shape[0],
              "rms_norm_eps": params["norm_eps"], "tie_word_embeddings": "lm_head.weight" not in hf_weights,
              "max_position_embeddings": 131072, "rope_parameters": rope}
    (path / "config.json").write_text(json.dumps(config))
    (path / "tokenizer.model").write_text(tokenizer)
    return path
