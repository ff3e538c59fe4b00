"""Chapter 5: Meta's real Llama 3 in the code of chapters 1-4 and main.py.

Everything a learner built so far runs Meta's own weights: `main.Transformer` has Meta's state-dict
names, so a checkpoint loads with a strict `load_state_dict`. What the real model adds is its
tokenizer and two file layouts.

Tokenizer. Real LLaMA 3 does not read characters: `Llama3Tokenizer` is its byte-level BPE (tiktoken),
which starts from the 256 bytes and merges frequent neighbours into 128,000 tokens, then adds 256
special tokens. Every string has an encoding (no unknown characters), and a token carries more text:
Tiny Shakespeare's 1,115,394 characters are 301,768 Llama 3 tokens, 3.7 characters per token. The
price is a large vocabulary: in Llama 3.2 1B the embedding matrix alone (shared with the output layer)
is 128,256 x 2,048 numbers, a fifth of the model.

Checkpoints. Meta's layout (params.json, consolidated.00.pth, tokenizer.model) uses Meta's names.
Hugging Face's (config.json, model*.safetensors) renames every tensor and permutes the rows of wq and
wk inside each head: its Llama rotates the first half of a head against the second half instead of
adjacent pairs (chapter 2), so Meta's rows (0, 1), (2, 3), ... become rows (0, head_dim/2),
(1, head_dim/2 + 1), ... Both compute the same scores, but a loader that takes Hugging Face's wq and wk
as they are, with Meta's pairing, rotates the wrong coordinates together: the logits are wrong, and
nothing fails loudly. `load_llama` reads both layouts into Meta's names and undoes the permutation.

Needs: main.py (Transformer, generate_tokens), and through it chapters 1-4.
Run:   python 05_llama3_tokenizer_and_weights.py --llama-dir DIR --prompt "The capital of France is"
"""

from __future__ import annotations

import argparse
import base64
import binascii
import importlib
import importlib.util
import json
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import tiktoken
import torch
from tqdm import tqdm

from main import ModelArgs, Transformer, generate_tokens
from plumbing.runtime import pick_device
from plumbing.validators import context_length, non_negative_int, seed_type, temperature_type, top_p_type

inputs = importlib.import_module("01_input_block")


# Llama 3's pre-tokenizer: text is first cut into words, numbers of up to three digits, runs of
# punctuation and whitespace; BPE then merges bytes only inside each piece.
LLAMA3_PAT_STR = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# The 256 special tokens come after the BPE tokens, in Meta's order: <|begin_of_text|> is 128000.
LLAMA3_NAMED_SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", "<|image|>",
]
LLAMA3_SPECIAL_TOKENS = LLAMA3_NAMED_SPECIAL_TOKENS + [
    f"<|reserved_special_token_{i}|>" for i in range(2, 2 + 256 - len(LLAMA3_NAMED_SPECIAL_TOKENS))
]


def load_bpe_ranks(path: Path) -> dict[bytes, int]:
    """Read Meta's tokenizer.model: one token per line, its bytes in base64, then its rank.

    A lower rank is a merge learned earlier, so BPE applies it first.

    Raises:
        FileNotFoundError: no file at path.
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


class Llama3Tokenizer:
    """Llama 3's byte-level BPE (tiktoken), with the interface of `CharTokenizer`.

    Text that spells a special token, such as "<|eot_id|>", is encoded as ordinary text, as
    Meta's tokenizer does by default: a prompt cannot forge a turn of the chat format.
    """

    def __init__(self, model_path: str | Path):
        ranks = load_bpe_ranks(Path(model_path))
        self.special_tokens = {token: len(ranks) + i for i, token in enumerate(LLAMA3_SPECIAL_TOKENS)}
        self.model = tiktoken.Encoding(name=Path(model_path).name, pat_str=LLAMA3_PAT_STR, mergeable_ranks=ranks,
                                       special_tokens=self.special_tokens)
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.start_header_id = self.special_tokens["<|start_header_id|>"]
        self.end_header_id = self.special_tokens["<|end_header_id|>"]
        self.eot_id = self.special_tokens["<|eot_id|>"]  # end of turn
        self.eom_id = self.special_tokens["<|eom_id|>"]  # end of message (the model waits for a tool's answer)
        self.stop_ids = {self.eos_id, self.eot_id, self.eom_id}

    @property
    def vocab_size(self) -> int:
        return self.model.n_vocab

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Text to token ids, optionally wrapped in <|begin_of_text|> ... <|end_of_text|>."""
        ids = self.model.encode(text, allowed_special=set(), disallowed_special=())
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids: list[int]) -> str:
        """Token ids to text; special tokens come out as their names."""
        return self.model.decode(ids)

    def encode_chat(self, user_message: str) -> list[int]:
        """One user turn in Llama 3's chat format, ending where the assistant's answer begins:

        <|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n{message}<|eot_id|>
        <|start_header_id|>assistant<|end_header_id|>\\n\\n
        """
        def header(role: str) -> list[int]:
            return [self.start_header_id, *self.encode(role), self.end_header_id, *self.encode("\n\n")]

        return [self.bos_id, *header("user"), *self.encode(user_message.strip()), self.eot_id, *header("assistant")]


def packaged_llama3_tokenizer() -> Path | None:
    """Meta's tokenizer.model as the llama-models package ships it (a test dependency), else None."""
    spec = importlib.util.find_spec("llama_models")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "llama3" / "tokenizer.model"
    return path if path.is_file() else None


def demo_llama3_tokenizer(text: str, path: Path | None) -> None:
    """What Llama 3's BPE makes of the corpus, the special tokens, and one chat turn."""
    if path is None:
        print("Llama 3 tokenizer: not shown; pass --llama-tokenizer PATH/tokenizer.model "
              "(or `pip install llama-models`, which ships one)")
        return
    try:
        tokenizer = Llama3Tokenizer(path)
    except (OSError, ValueError) as e:
        sys.exit(f"error: --llama-tokenizer: {e}")
    sample = text[:20]
    ids = tokenizer.encode(sample, bos=True)
    print(f"Llama3Tokenizer ({path}): vocab_size {tokenizer.vocab_size:,}")
    print(f"encode({sample!r}, bos=True) = {ids}")
    print(f"  pieces: {[tokenizer.decode([i]) for i in ids]}")
    n_tokens = len(tokenizer.encode(text))
    print(f"corpus: {len(text):,} characters = {n_tokens:,} BPE tokens "
          f"({len(text) / n_tokens:.2f} characters per token)")
    shown = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
             "<|eot_id|>"]
    print("special tokens: " + ", ".join(f"{name} {tokenizer.special_tokens[name]}" for name in shown))
    chat = tokenizer.encode_chat("Who is Romeo?")
    print(f"chat format of one user turn: {chat}\n  = {tokenizer.decode(chat)!r}")


# ----------------------------------------------------------------------------- Meta's checkpoints

# params.json of Meta's original layout uses ModelArgs' names: these four it must give, the others
# default as in Meta's ModelArgs (n_kv_heads None means one KV head per query head).
META_REQUIRED = {"dim", "n_layers", "n_heads", "vocab_size"}
META_DEFAULTS = {"n_kv_heads": None, "multiple_of": 256, "ffn_dim_multiplier": None, "norm_eps": 1e-5,
                 "rope_theta": 500000.0, "use_scaled_rope": False}
# (dim, n_layers) of Llama 3.2 1B and 3B: their RoPE scaling factor is 32, not the 8 of Llama 3.1.
LLAMA_32_SMALL_SHAPES = {(2048, 16), (3072, 28)}
# Hugging Face's names of one layer's weights -> Meta's.
HF_LAYER_NAMES = {
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
}
HF_NAMES = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
            "lm_head.weight": "output.weight"}


def hf_to_meta_name(name: str) -> str:
    """'model.layers.3.self_attn.q_proj.weight' -> 'layers.3.attention.wq.weight'; unknown names stay as they are."""
    if name in HF_NAMES:
        return HF_NAMES[name]
    parts = name.split(".")
    if len(parts) >= 5 and parts[:2] == ["model", "layers"] and parts[-1] == "weight":
        layer_name = ".".join(parts[3:-1])
        if layer_name in HF_LAYER_NAMES:
            return f"layers.{parts[2]}.{HF_LAYER_NAMES[layer_name]}.weight"
    return name


def unpermute_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo Hugging Face's row order in wq or wk (chapter 2): within each head, its rows
    (i, head_dim/2 + i) become Meta's adjacent rows (2i, 2i + 1), the pair that RoPE rotates together.

    (n_heads * head_dim, dim) -> (n_heads * head_dim, dim)
    """
    rows, dim = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, dim).transpose(1, 2).reshape(rows, dim)


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a JSON object")
    return data


def check_llama_args(model_args: ModelArgs, source: Path) -> ModelArgs:
    """The sizes must be positive integers (Attention checks that the heads fit); returns model_args."""
    for field in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of"):
        value = getattr(model_args, field)
        if not (isinstance(value, int) and value > 0) and not (field == "n_kv_heads" and value is None):
            raise ValueError(f"{source}: {field} must be a positive integer, got {value!r}")
    return model_args


def meta_rope_scaling_factor(model_args: ModelArgs) -> float:
    """params.json does not carry the RoPE scaling factor: 32 for the shapes of Llama 3.2 1B and 3B,
    8 otherwise (Llama 3.1; Meta's reference code hard-codes 8 for all)."""
    return 32.0 if (model_args.dim, model_args.n_layers) in LLAMA_32_SMALL_SHAPES else 8.0


def read_meta_checkpoint(path: Path, log) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """params.json and consolidated.00.pth (memory-mapped: the tensors are read from disk when used)."""
    params = read_json(path / "params.json")
    unknown = sorted(params.keys() - META_REQUIRED - META_DEFAULTS.keys())
    missing = sorted(META_REQUIRED - params.keys())
    if unknown or missing:
        raise ValueError(f"{path / 'params.json'}: " + "; ".join(
            f"{what} {', '.join(keys)}" for what, keys in (("unknown keys", unknown), ("lacks", missing)) if keys))
    model_args = check_llama_args(ModelArgs(**{**META_DEFAULTS, **params}), path / "params.json")
    if model_args.use_scaled_rope:
        model_args = replace(model_args, rope_scaling_factor=meta_rope_scaling_factor(model_args))
        log(f"RoPE scaling factor {model_args.rope_scaling_factor:g} (params.json does not say; "
            f"{'the shape of Llama 3.2 1B or 3B' if model_args.rope_scaling_factor == 32 else 'as Llama 3.1'})")
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
    return model_args, state_dict


def read_hf_checkpoint(path: Path, log) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """config.json and model.safetensors (or the shards that model.safetensors.index.json lists),
    with the tensors renamed to Meta's names; wq and wk still in Hugging Face's row order."""
    from safetensors import SafetensorError, safe_open

    config = read_json(path / "config.json")
    if config.get("model_type") != "llama":
        raise ValueError(f"{path / 'config.json'}: model_type is {config.get('model_type')!r}, not 'llama'")
    missing = sorted({"hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                      "vocab_size", "rms_norm_eps"} - config.keys())
    if missing:
        raise ValueError(f"{path / 'config.json'} lacks {', '.join(missing)}")
    dim, n_heads = config["hidden_size"], config["num_attention_heads"]
    if not all(isinstance(config[k], int) and config[k] > 0 for k in ("hidden_size", "num_attention_heads",
                                                                       "intermediate_size")):
        raise ValueError(f"{path / 'config.json'}: hidden_size, num_attention_heads and intermediate_size "
                         f"must be positive integers")
    unsupported = {"hidden_act": config.get("hidden_act", "silu") != "silu",
                   "attention_bias": bool(config.get("attention_bias")), "mlp_bias": bool(config.get("mlp_bias")),
                   "head_dim": config.get("head_dim", dim // n_heads) * n_heads != dim}
    if any(unsupported.values()):
        raise ValueError(f"{path / 'config.json'}: this Llama differs from Meta's architecture in "
                         f"{', '.join(k for k, v in unsupported.items() if v)}")
    rope_config = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope_config.get("rope_type", rope_config.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise ValueError(f"{path / 'config.json'}: RoPE type {rope_type!r} is not Llama 3's ('llama3' or 'default')")
    if rope_type == "llama3":
        metas = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        differ = [k for k, v in metas.items() if rope_config.get(k, v) != v]
        if differ:
            raise ValueError(f"{path / 'config.json'}: RoPE scaling {', '.join(differ)} differ from Llama 3.1's")
    # config.json gives the FFN hidden size itself. With multiple_of equal to it, Meta's rule lands on it
    # from any smaller start (chapter 4); ffn_dim_multiplier scales the start down when it is larger.
    hidden, start = config["intermediate_size"], int(2 * 4 * dim / 3)
    model_args = check_llama_args(ModelArgs(
        dim=dim, n_layers=config["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=config.get("num_key_value_heads") or n_heads, vocab_size=config["vocab_size"],
        multiple_of=hidden, ffn_dim_multiplier=None if start <= hidden else hidden / start,
        norm_eps=config["rms_norm_eps"], rope_theta=rope_config.get("rope_theta", config.get("rope_theta", 10000.0)),
        use_scaled_rope=rope_type == "llama3", rope_scaling_factor=rope_config.get("factor", 8.0),
    ), path / "config.json")
    if model_args.use_scaled_rope:
        log(f"RoPE scaling factor {model_args.rope_scaling_factor:g} (config.json)")

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
                for name in f.keys():
                    state_dict[hf_to_meta_name(name)] = f.get_tensor(name)
        except (OSError, SafetensorError) as e:
            raise ValueError(f"{path / file} is not a readable safetensors file ({e})") from e
    return model_args, state_dict


def load_llama(path: str | Path, max_seq_len: int = 2048, dtype: torch.dtype | None = None, device: str = "cpu",
               log: Callable[[str], None] = print) -> tuple[Transformer, Llama3Tokenizer]:
    """Meta's Llama 3 in our `Transformer`, from a directory in Meta's layout or Hugging Face's.

    The weights are loaded once: the model is built on the meta device (shapes, no memory), then
    `load_state_dict(assign=True)` makes the checkpoint's own tensors its parameters.

    Args:
        path: Meta's layout (params.json, consolidated.00.pth, tokenizer.model) or Hugging Face's
            (config.json, model.safetensors or its shards; tokenizer.model here or in original/).
        max_seq_len: the context, which sizes the KV cache (not the model's 131,072 tokens).
        dtype: the weights' dtype; None keeps the checkpoint's.
        log: called with one line per loading step.
    Returns:
        the model in eval mode on `device`, and its tokenizer.
    Raises:
        FileNotFoundError, ValueError: with a message that names the file and what is wrong.
    """
    t0 = time.perf_counter()
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory")
    tokenizer_path = next((p for p in (path / "tokenizer.model", path / "original" / "tokenizer.model")
                           if p.is_file()), None)
    if tokenizer_path is None:
        raise FileNotFoundError(f"{path} has no tokenizer.model (nor original/tokenizer.model)")
    tokenizer = Llama3Tokenizer(tokenizer_path)
    meta_layout = (path / "params.json").is_file()
    if meta_layout:
        model_args, state_dict = read_meta_checkpoint(path, log)
    elif (path / "config.json").is_file():
        model_args, state_dict = read_hf_checkpoint(path, log)
    else:
        raise FileNotFoundError(f"{path} has neither params.json (Meta's layout) nor config.json (Hugging Face's)")
    if model_args.vocab_size != tokenizer.vocab_size:
        raise ValueError(f"{path}: the model's vocab_size {model_args.vocab_size} is not its tokenizer's "
                         f"{tokenizer.vocab_size}")
    model_args = replace(model_args, max_seq_len=max_seq_len, max_batch_size=1)
    tied = "output.weight" not in state_dict  # Llama 3.2 1B and 3B: the output matrix is the embedding

    try:
        with torch.device("meta"):  # shapes only: no memory, no initialization
            model = Transformer(model_args)
    except ValueError as e:  # the heads do not fit the width
        raise ValueError(f"{path}: {e}") from e
    expected = {name: t for name, t in model.state_dict().items() if not (tied and name == "output.weight")}
    missing, unexpected = sorted(expected.keys() - state_dict.keys()), sorted(state_dict.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(f"{path}: the weights do not fit its {'params' if meta_layout else 'config'}.json: "
                         + "; ".join(f"{what} {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
                                     for what, names in (("missing", missing), ("unexpected", unexpected)) if names))
    for name, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor) or tensor.shape != expected[name].shape:
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"{path}: {name} has shape {shape}, but its {'params' if meta_layout else 'config'}.json "
                             f"needs {tuple(expected[name].shape)}")

    dtype = dtype or state_dict["tok_embeddings.weight"].dtype
    for name in tqdm(list(state_dict), desc="loading weights", file=sys.stderr, leave=False):
        tensor = state_dict[name]
        if not meta_layout and name.endswith("attention.wq.weight"):
            tensor = unpermute_hf(tensor, model_args.n_heads)
        elif not meta_layout and name.endswith("attention.wk.weight"):
            tensor = unpermute_hf(tensor, model_args.n_kv_heads or model_args.n_heads)
        state_dict[name] = tensor.to(dtype)
    if tied:
        state_dict["output.weight"] = state_dict["tok_embeddings.weight"]
    model.load_state_dict(state_dict, strict=True, assign=True)
    if tied:
        model.output.weight = model.tok_embeddings.weight  # one Parameter, so .to(device) keeps it shared
    model = model.to(device).eval()
    n_params = sum(p.numel() for p in model.parameters())  # a shared Parameter counts once
    log(f"loaded {n_params:,} parameters{' (output tied to the embedding)' if tied else ''}: "
        f"{n_params * dtype.itemsize / 1e9:.2f} GB in {str(dtype).removeprefix('torch.')}, "
        f"on {device}, in {time.perf_counter() - t0:.1f} s")
    return model, tokenizer


# ----------------------------------------------------------------------------- command line

LLAMA_SEQ_LEN = 2048  # the default context: the KV cache holds this many tokens


def generate_llama(args: argparse.Namespace) -> None:
    """--llama-dir DIR: Meta's Llama 3 continues --prompt (or answers it, --chat), and the text appears as it comes."""
    device = pick_device(args.device)
    model, tokenizer = load_llama(args.llama_dir, args.seq_len, getattr(torch, args.dtype) if args.dtype else None,
                                  device, log=lambda line: print(line, file=sys.stderr))
    tokens = tokenizer.encode_chat(args.prompt) if args.chat else tokenizer.encode(args.prompt, bos=True)
    new_tokens = generate_tokens(model, tokens, args.max_new_tokens, tokenizer.stop_ids, args.temperature,
                                 args.top_p, torch.Generator().manual_seed(args.seed))
    print(args.prompt, end="", flush=True)
    t0 = time.perf_counter()
    ids, shown = [], ""
    for token in new_tokens:
        ids.append(token)
        text = tokenizer.decode(ids)
        if not text.endswith("\ufffd"):  # a character split over two tokens waits for its second half
            print(text[len(shown) :], end="", flush=True)
            shown = text
    print(tokenizer.decode(ids)[len(shown) :])
    seconds = time.perf_counter() - t0
    print(f"{len(tokens)} prompt tokens, {len(ids)} new tokens in {seconds:.1f} s "
          f"({len(ids) / seconds:.1f} tokens/s)", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Chapter 5: Meta's Llama 3 with the code of chapters 1-4 and main.py.")
    p.add_argument("--llama-dir", type=Path, default=None, metavar="DIR",
                   help="a Llama 3 checkpoint: Meta's layout (params.json, consolidated.00.pth) or Hugging Face's "
                        "(config.json, model*.safetensors), plus tokenizer.model. Without it: the tokenizer demo")
    p.add_argument("--prompt", default="The capital of France is",
                   help="text to continue, after <|begin_of_text|> (default: %(default)s)")
    p.add_argument("--chat", action="store_true",
                   help="send --prompt as one user turn in Llama 3's chat format (Instruct models)")
    p.add_argument("--max-new-tokens", type=non_negative_int, default=64,
                   help="BPE tokens to generate at most (default: %(default)s)")
    p.add_argument("--temperature", type=temperature_type, default=0.6,
                   help="sampling temperature; 0 = greedy (default: %(default)s, as in Meta's examples)")
    p.add_argument("--top-p", type=top_p_type, default=0.9,
                   help="nucleus sampling: keep the most likely tokens whose probability adds up to p "
                        "(default: %(default)s)")
    p.add_argument("--seq-len", type=context_length, default=LLAMA_SEQ_LEN,
                   help="the context in tokens, which sizes the KV cache (default: %(default)s)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="the weights' dtype (default: the checkpoint's)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto",
                   help="auto picks cuda, then mps, then cpu (default: %(default)s)")
    p.add_argument("--seed", type=seed_type, default=0, help="random seed for sampling (default: %(default)s)")
    p.add_argument("--llama-tokenizer", type=Path, default=None,
                   help="without --llama-dir: Meta's tokenizer.model for the demo (default: the copy in the "
                        "llama-models package, if it is installed)")
    p.add_argument("--data", default=None, help="without --llama-dir: the text the demo tokenizes "
                   "(default: data/tinyshakespeare.txt)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        if args.llama_dir is None:
            demo_llama3_tokenizer(inputs.load_text(args.data), args.llama_tokenizer or packaged_llama3_tokenizer())
        else:
            generate_llama(args)
    except KeyboardInterrupt:
        sys.exit(130)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
