"""Reading a Llama 3 checkpoint directory for chapter 5, with every check that turns a bad file into one clear error.

- `find_tokenizer`: tokenizer.model (here or in original/), else tokenizer.json.
- `read_params_json`, `map_consolidated_pth`: Meta's layout.
- `read_config_json`, `map_safetensors`: Hugging Face's layout (config.json in params.json's terms; one weights file,
  or the shards its index lists).
- `checked`, `check_names_and_shapes`: the sizes are positive integers, and the weights fit them.
- `read_tokenizer_model`, `read_tokenizer_json` (with `byte_level_alphabet`): the BPE ranks of a tokenizer.model or
  a tokenizer.json, for tiktoken, and the special tokens that a tokenizer.json names.
- `read_json`: any of these JSON files, with one error line for a missing or broken one.
Tensors are memory-mapped: loading reads the file's index, and the bytes come from disk when first used.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable
from pathlib import Path

import torch

# params.json uses ModelArgs' names: these four it must give, the others default as in Meta's ModelArgs
# (n_kv_heads None: one KV head per query head).
META_REQUIRED = {"dim", "n_layers", "n_heads", "vocab_size"}
META_DEFAULTS = {"n_kv_heads": None, "multiple_of": 256, "ffn_dim_multiplier": None, "norm_eps": 1e-5,
                 "rope_theta": 500000.0, "use_scaled_rope": False}
HF_REQUIRED = {"hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
               "rms_norm_eps"}
# Llama 3.1's RoPE scaling (chapter 2): only the factor may differ (8, or 32 for Llama 3.2 1B and 3B).
LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a JSON object")
    return data


def find_tokenizer(path: Path) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory")
    candidates = [path / "tokenizer.model", path / "original" / "tokenizer.model", path / "tokenizer.json"]
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        raise FileNotFoundError(f"{path} has no tokenizer.model (nor original/tokenizer.model, nor tokenizer.json)")
    return found


def read_params_json(path: Path) -> dict:
    """Meta's params.json with the defaults filled in: ModelArgs' keyword arguments."""
    params = read_json(path)
    unknown = sorted(params.keys() - META_REQUIRED - META_DEFAULTS.keys())
    missing = sorted(META_REQUIRED - params.keys())
    if unknown or missing:
        raise ValueError(f"{path}: " + "; ".join(f"{what} {', '.join(keys)}" for what, keys in
                                                 (("unknown keys", unknown), ("lacks", missing)) if keys))
    return {**META_DEFAULTS, **params}


def map_consolidated_pth(path: Path, log: Callable[[str], None]) -> dict[str, torch.Tensor]:
    shards = sorted(path.glob("consolidated.*.pth"))
    if len(shards) > 1:
        raise ValueError(f"{path} holds a checkpoint split over {len(shards)} files (one per GPU of model "
                         f"parallelism), which this loader does not join; download the Hugging Face layout "
                         f"(config.json and model*.safetensors) of the same model instead")
    if not shards:
        raise FileNotFoundError(f"{path} has params.json but no consolidated.00.pth")
    log(f"mapping {shards[0]} ({shards[0].stat().st_size / 1e9:.2f} GB)")
    try:  # weights_only: tensors and plain data only, so a malicious file cannot run code
        state_dict = torch.load(shards[0], map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many types for a bad file; all mean the same here
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{shards[0]} is not a readable weights-only PyTorch checkpoint ({reason})") from e
    if not isinstance(state_dict, dict):
        raise ValueError(f"{shards[0]} does not hold a state dict")
    return state_dict


def read_config_json(path: Path) -> dict:
    """Hugging Face's config.json as ModelArgs' keyword arguments (params.json's names, with the RoPE scaling
    factor), refused when its model is not Meta's Llama 3 architecture."""
    config = read_json(path)
    if config.get("model_type") != "llama":
        raise ValueError(f"{path}: model_type is {config.get('model_type')!r}, not 'llama'")
    missing = sorted(HF_REQUIRED - config.keys())
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}")
    dim, n_heads = config["hidden_size"], config["num_attention_heads"]
    if not all(isinstance(config[k], int) and config[k] > 0 for k in ("hidden_size", "num_attention_heads",
                                                                       "intermediate_size")):
        raise ValueError(f"{path}: hidden_size, num_attention_heads and intermediate_size must be positive integers")
    unsupported = {"hidden_act": config.get("hidden_act", "silu") != "silu",
                   "attention_bias": bool(config.get("attention_bias")), "mlp_bias": bool(config.get("mlp_bias")),
                   "head_dim": config.get("head_dim", dim // n_heads) * n_heads != dim}
    if any(unsupported.values()):
        raise ValueError(f"{path}: this Llama differs from Meta's architecture in "
                         f"{', '.join(k for k, v in unsupported.items() if v)}")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise ValueError(f"{path}: RoPE type {rope_type!r} is not Llama 3's ('llama3' or 'default')")
    differ = [k for k, v in LLAMA3_ROPE.items() if rope_type == "llama3" and rope.get(k, v) != v]
    if differ:
        raise ValueError(f"{path}: RoPE scaling {', '.join(differ)} differ from Llama 3.1's")
    # config.json gives the FFN's hidden size itself, Meta's rule (chapter 4) a start and a rounding. With
    # multiple_of equal to the hidden size, the rule rounds any smaller start up to it: for Llama 3 8B the start
    # int(2 * 4 * 4096 / 3) = 10,922 becomes 14,336. A larger start is scaled down first (ffn_dim_multiplier).
    hidden, start = config["intermediate_size"], int(2 * 4 * dim / 3)
    return {"dim": dim, "n_layers": config["num_hidden_layers"], "n_heads": n_heads,
            "n_kv_heads": config.get("num_key_value_heads") or n_heads, "vocab_size": config["vocab_size"],
            "multiple_of": hidden, "ffn_dim_multiplier": None if start <= hidden else hidden / start,
            "norm_eps": config["rms_norm_eps"], "rope_theta": rope.get("rope_theta", config.get("rope_theta", 10000.0)),
            "use_scaled_rope": rope_type == "llama3", "rope_scaling_factor": rope.get("factor", 8.0)}


def map_safetensors(path: Path, log: Callable[[str], None]) -> dict[str, torch.Tensor]:
    """model.safetensors, or every shard that model.safetensors.index.json lists, under Hugging Face's names."""
    from safetensors import SafetensorError, safe_open

    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} has no weight_map")
        files = sorted(set(weight_map.values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path} has config.json but neither model.safetensors "
                                f"nor model.safetensors.index.json")
    state_dict = {}
    for file in files:
        log(f"mapping {path / file}")
        try:
            with safe_open(path / file, framework="pt") as f:
                state_dict.update({name: f.get_tensor(name) for name in f.keys()})
        except (OSError, SafetensorError) as e:
            raise ValueError(f"{path / file} is not a readable safetensors file ({e})") from e
    return state_dict


def checked(model_args, source: Path):
    """model_args, once its sizes are positive integers (Attention checks that the heads fit the width)."""
    for field in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of"):
        value = getattr(model_args, field)
        if not (isinstance(value, int) and value > 0) and not (field == "n_kv_heads" and value is None):
            raise ValueError(f"{source}: {field} must be a positive integer, got {value!r}")
    return model_args


def check_names_and_shapes(state_dict: dict, expected: dict[str, torch.Tensor], source: Path) -> None:
    """The checkpoint holds exactly the model's tensors, each of its shape; output.weight may be left out
    (the output layer is then the embedding)."""
    expected = {name: t for name, t in expected.items() if name != "output.weight" or name in state_dict}
    missing, unexpected = sorted(expected.keys() - state_dict.keys()), sorted(state_dict.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(f"{source}: the weights do not fit its params.json or config.json: " + "; ".join(
            f"{what} {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
            for what, names in (("missing", missing), ("unexpected", unexpected)) if names))
    for name, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor) or tensor.shape != expected[name].shape:
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"{source}: {name} has shape {shape}, but its params.json or config.json "
                             f"needs {tuple(expected[name].shape)}")


def read_tokenizer_model(path: Path) -> dict[bytes, int]:
    """Meta's tokenizer.model: one token per line, its bytes in base64, then its rank (a lower rank is a merge
    learned earlier, so BPE applies it first). It lists the BPE tokens only, not the special tokens.

    Raises:
        ValueError: the file is not in this format.
    """
    ranks = {}
    for n, line in enumerate(Path(path).read_bytes().splitlines(), start=1):
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error) as e:
            raise ValueError(f"{path} is not a tiktoken BPE file (line {n}: {line[:40]!r})") from e
    if sorted(ranks.values()) != list(range(len(ranks))) or len(ranks) < 256:
        raise ValueError(f"{path} is not a tiktoken BPE file (its ranks are not 0 .. n-1, or it lacks the 256 bytes)")
    return ranks


def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's spelling of bytes as printable characters, which tokenizer.json uses: character -> byte.
    The 188 printable bytes stand for themselves, the 68 others for chr(256), chr(257), ... in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(others)}


def read_tokenizer_json(path: Path) -> tuple[dict[bytes, int], dict[str, int]]:
    """The BPE ranks in Hugging Face's tokenizer.json (its ids, each token's bytes spelled back from GPT-2's
    alphabet), and its special tokens by name. Their names differ from release to release (Llama 3.0 has no
    <|eom_id|>; Hugging Face's 3.1 and 3.2 files call 128005 and 128011 reserved), so they are read, not assumed;
    their ids must follow the ranks, one each.

    Raises:
        ValueError: not a byte-level BPE tokenizer.json, or its special tokens' ids are misplaced.
    """
    data = read_json(path)
    vocab, alphabet = data.get("model", {}).get("vocab"), byte_level_alphabet()
    try:
        ranks = {bytes(alphabet[c] for c in token): rank for token, rank in vocab.items()}
    except (AttributeError, KeyError, TypeError) as e:
        raise ValueError(f"{path} holds no byte-level BPE vocabulary ({e!r})") from e
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: its vocabulary's ids are not 0 .. n-1")
    added = [(t.get("content"), t.get("id")) for t in data.get("added_tokens", []) if isinstance(t, dict)]
    special_tokens = dict(added)
    ids = sorted(i for _, i in added if isinstance(i, int))
    if len(special_tokens) != len(added) or ids != list(range(len(ranks), len(ranks) + len(added))):
        raise ValueError(f"{path}: its special tokens are misplaced: their ids must be {len(ranks)}, "
                         f"{len(ranks) + 1}, ..., one each, right after the {len(ranks):,} BPE tokens")
    return ranks, special_tokens
