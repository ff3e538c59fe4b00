"""Chapter 5: Meta's real Llama 3 in the code of chapters 1-4 and main.py, and a conversation with it.

`main.Transformer` has Meta's state-dict names, so Meta's weights load into it with a strict
`load_state_dict`. What the real model adds is its tokenizer, two file layouts, and a chat format.

Tokenizer. Llama 3 reads byte-level BPE tokens (tiktoken), not characters: 128,000 tokens learned by
merging frequent neighbours, starting from the 256 bytes, then 256 special tokens. Every string has an
encoding, and a token carries 3.7 characters of Tiny Shakespeare. `tokenizer.model` lists each token's
bytes and rank; Hugging Face's `tokenizer.json` holds the same ranks as ids, spelled in GPT-2's
byte-level alphabet.

Checkpoints. Meta's layout (params.json, consolidated.00.pth) uses Meta's names. Hugging Face's
(config.json, model*.safetensors) renames every tensor and reorders the rows of wq and wk inside each
head: its RoPE rotates the first half of a head against the second half, Meta's rotates adjacent pairs
(chapter 2). Taken as they are, those rows rotate the wrong coordinates together: the logits are wrong
and nothing fails loudly, so `load_llama` undoes the reordering. params.json does not give the RoPE
scaling factor (chapter 2): 32 for Llama 3.2 1B and 3B, 8 for Llama 3.1, so the loader tells them apart by
shape. Llama 3.2 1B and 3B tie the output layer to the embedding: Meta's file stores `output.weight` as
the same tensor, Hugging Face's leaves it out. Either way the model gets one Parameter, so the 1B model is
1,235,814,400 parameters (2.47 GB in bfloat16), not 1,498,482,688. The file is memory-mapped and its
tensors become the parameters: a weight is copied only to reorder it or to change its dtype.

Chat. An Instruct model reads Meta's `encode_dialog_prompt`: <|begin_of_text|>, then per message
<|start_header_id|>role<|end_header_id|> "\\n\\n" content <|eot_id|>, then the assistant's header; the
answer ends with <|eot_id|>. We follow llama-models' version, content as it is; the older meta-llama/llama3
repository's ChatFormat trims each message, and so does Hugging Face's chat template, which from Llama 3.1
on also always opens with a system turn that starts with dates ("Cutting Knowledge Date: December 2023",
"Today Date: ..."), before your system message if you give one.
A conversation keeps its KV cache across turns: each turn feeds only its new tokens at the running
position (Meta's `forward(tokens, start_pos)`).

Needs: main.py (Transformer, sample_next), and through it chapters 1-4.
Run:   python 05_llama3_tokenizer_and_weights.py               # demo on a tiny random model, no download
       python 05_llama3_tokenizer_and_weights.py --llama-dir DIR --prompt "The capital of France is"
       python 05_llama3_tokenizer_and_weights.py --llama-dir DIR --chat    # one user turn per line of stdin
"""

from __future__ import annotations

import argparse
import base64
import binascii
import importlib
import importlib.util
import json
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import tiktoken
import torch
from safetensors.torch import save_file

from main import ModelArgs, Transformer, sample_next
from plumbing import llama_files
from plumbing.chat import build_parser, print_tokens, read_user_turns
from plumbing.runtime import cpu_matrix_vector_kernel, exit_on_error, pick_device

# ----------------------------------------------------------------------------- Llama 3's tokenizer

# Text is first cut into words, numbers of up to three digits, runs of punctuation and whitespace
# (contractions in any case: "'S" as "'s"); BPE then merges bytes only inside each piece.
LLAMA3_PAT_STR = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# The 256 special tokens follow the BPE tokens, in Meta's order: <|begin_of_text|> is 128000.
LLAMA3_NAMED_SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", "<|image|>",
]
LLAMA3_SPECIAL_TOKENS = LLAMA3_NAMED_SPECIAL_TOKENS + [
    f"<|reserved_special_token_{i}|>" for i in range(2, 2 + 256 - len(LLAMA3_NAMED_SPECIAL_TOKENS))
]
# Meta's Tokenizer.encode gives tiktoken at most 400,000 characters at a time (tiktoken used to panic on
# longer texts, Meta's comment says), and cuts runs of more than 25,000 spaces or non-spaces (tiktoken issue
# #195: such runs were slow). A cut inside a word changes the ids, so we cut where Meta does: on Tiny
# Shakespeare, character 400,000 splits " we" into " " and "we" (Hugging Face's tokenizer, which does not
# cut, has one token fewer there).
MAX_ENCODE_CHARS, MAX_RUN_CHARS = 400_000, 25_000
LONG_RUN = re.compile(rf"\s{{{MAX_RUN_CHARS + 1},}}|\S{{{MAX_RUN_CHARS + 1},}}")  # \s is str.isspace, as Meta's


def meta_pieces(text: str) -> Iterator[str]:
    """`text` in the pieces Meta's Tokenizer.encode gives tiktoken: cut every MAX_ENCODE_CHARS characters,
    then, within each chunk, every MAX_RUN_CHARS characters of a longer run of spaces or of non-spaces."""
    for start in range(0, len(text), MAX_ENCODE_CHARS):
        chunk, cut = text[start : start + MAX_ENCODE_CHARS], 0
        for run in LONG_RUN.finditer(chunk):
            for end in range(run.start() + MAX_RUN_CHARS, run.end(), MAX_RUN_CHARS):
                yield chunk[cut:end]
                cut = end
        yield chunk[cut:]


def load_bpe_ranks(path: Path) -> dict[bytes, int]:
    """Meta's tokenizer.model: one token per line, its bytes in base64, then its rank
    (a lower rank is a merge learned earlier, so BPE applies it first).

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


class Llama3Tokenizer:
    """Llama 3's byte-level BPE, with the interface of chapter 1's `CharTokenizer`, and Meta's chat format.

    Text that spells a special token, such as "<|eot_id|>", is encoded as ordinary text, as Meta's
    tokenizer does by default: a prompt cannot forge a turn of the chat format.
    """

    def __init__(self, path: str | Path):
        """path: Meta's tokenizer.model, or Hugging Face's tokenizer.json."""
        path = Path(path)
        if path.suffix == ".json":  # Hugging Face's: the same ranks as ids, each token's bytes spelled in GPT-2's
            ranks = llama_files.read_tokenizer_json(path, LLAMA3_SPECIAL_TOKENS)  # byte-level alphabet
        else:
            ranks = load_bpe_ranks(path)
        self.special_tokens = {token: len(ranks) + i for i, token in enumerate(LLAMA3_SPECIAL_TOKENS)}
        self.model = tiktoken.Encoding(name=path.name, pat_str=LLAMA3_PAT_STR, mergeable_ranks=ranks,
                                       special_tokens=self.special_tokens)
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.pad_id = self.special_tokens["<|finetune_right_pad_id|>"]  # Meta's, for batches of unequal length
        self.eot_id = self.special_tokens["<|eot_id|>"]  # end of turn
        self.eom_id = self.special_tokens["<|eom_id|>"]  # end of message (the model waits for a tool's answer)
        self.stop_ids = {self.eos_id, self.eot_id, self.eom_id}

    @property
    def vocab_size(self) -> int:
        return self.model.n_vocab

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Text to token ids, optionally between <|begin_of_text|> and <|end_of_text|>."""
        ids = [i for piece in meta_pieces(text) for i in self.model.encode_ordinary(piece)]
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids: list[int]) -> str:
        """Token ids to text; special tokens come out as their names."""
        return self.model.decode(ids)

    def token_bytes(self, token: int) -> bytes:
        """One token's bytes: a character of several bytes may be split over two tokens."""
        return self.model.decode_single_token_bytes(token)

    def encode_header(self, role: str) -> list[int]:
        return [self.special_tokens["<|start_header_id|>"], *self.encode(role),
                self.special_tokens["<|end_header_id|>"], *self.encode("\n\n")]

    def encode_message(self, role: str, content: str) -> list[int]:
        """One message of the chat format, its content as it is (llama-models'; meta-llama/llama3's ChatFormat and
        Hugging Face's template trim it)."""
        return [*self.encode_header(role), *self.encode(content), self.eot_id]

    def encode_dialog_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """Meta's prompt for an answer: BOS, each {"role": ..., "content": ...} message, the assistant's header."""
        return [self.bos_id, *(i for m in messages for i in self.encode_message(m["role"], m["content"])),
                *self.encode_header("assistant")]


def packaged_llama3_tokenizer() -> Path | None:
    """Meta's tokenizer.model as the llama-models package ships it (a test dependency), else None."""
    spec = importlib.util.find_spec("llama_models")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "llama3" / "tokenizer.model"
    return path if path.is_file() else None


# ----------------------------------------------------------------------------- Meta's and Hugging Face's files

# params.json of Meta's Llama 3.2 1B and 3B. Meta's file does not carry the RoPE scaling factor: it is 32
# for these two shapes and 8 for Llama 3.1 (Meta's reference code hard-codes 8), so the loader tells them
# apart by (dim, n_layers).
LLAMA_32_PARAMS = {
    "1B": {"dim": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256, "multiple_of": 256,
           "ffn_dim_multiplier": 1.5, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True},
    "3B": {"dim": 3072, "n_layers": 28, "n_heads": 24, "n_kv_heads": 8, "vocab_size": 128256, "multiple_of": 256,
           "ffn_dim_multiplier": 1.0, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True},
}
LLAMA_32_SMALL_SHAPES = {(p["dim"], p["n_layers"]) for p in LLAMA_32_PARAMS.values()}
# Hugging Face's names of one layer's weights -> Meta's.
HF_LAYER_NAMES = {
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
}
HF_NAMES = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
            "lm_head.weight": "output.weight"}
META_NAMES = {meta: hf for hf, meta in HF_NAMES.items()}  # the inverses, for meta_to_hf_name
META_LAYER_NAMES = {meta: hf for hf, meta in HF_LAYER_NAMES.items()}


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


def meta_to_hf_name(name: str) -> str:
    """The inverse of hf_to_meta_name: 'layers.3.attention.wq.weight' -> 'model.layers.3.self_attn.q_proj.weight'."""
    if name in META_NAMES:
        return META_NAMES[name]
    _, i, *layer_name, _ = name.split(".")  # layers.{i}.attention.wq.weight, layers.{i}.ffn_norm.weight
    return f"model.layers.{i}.{META_LAYER_NAMES['.'.join(layer_name)]}.weight"


def unpermute_hf(w: torch.Tensor, n_heads: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Undo Hugging Face's row order in wq or wk: within each head, its rows (i, head_dim/2 + i) become
    Meta's adjacent rows (2i, 2i + 1), the pair that RoPE rotates together. One copy, in `dtype` if given.

    (n_heads * head_dim, dim) -> (n_heads * head_dim, dim)
    """
    rows, dim = w.shape
    pairs = w.view(n_heads, 2, rows // n_heads // 2, dim).transpose(1, 2)  # (n_heads, head_dim/2, 2, dim), a view
    out = torch.empty(pairs.shape, dtype=dtype or w.dtype, device=w.device)
    return out.copy_(pairs).view(rows, dim)  # reordered (and converted) in one copy


def permute_for_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """What Hugging Face's conversion script does to Meta's wq and wk, or to any matrix whose rows are theirs
    (LoRA's B, chapter 6): within each head, rows (2i, 2i + 1) become rows (i, head_dim/2 + i). unpermute_hf
    undoes it.

    (n_heads * head_dim, cols) -> (n_heads * head_dim, cols)
    """
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def qk_heads(name: str, model_args: ModelArgs) -> int | None:
    """The heads of a weight whose rows Hugging Face reorders, by Meta's name: n_heads for wq, n_kv_heads for wk
    (fewer with GQA), None for every other weight."""
    if name.endswith("attention.wq.weight"):
        return model_args.n_heads
    if name.endswith("attention.wk.weight"):
        return model_args.n_kv_heads or model_args.n_heads
    return None


def meta_rope_scaling_factor(model_args: ModelArgs) -> float:
    """32 for the shapes of Llama 3.2 1B and 3B, else 8 (Llama 3.1): params.json does not say."""
    return 32.0 if (model_args.dim, model_args.n_layers) in LLAMA_32_SMALL_SHAPES else 8.0


def read_meta_checkpoint(path: Path, log: Callable[[str], None]) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """params.json and consolidated.00.pth, memory-mapped: a tensor is read from disk when first used."""
    model_args = ModelArgs(**llama_files.read_params_json(path / "params.json"))
    if model_args.use_scaled_rope:
        model_args = replace(model_args, rope_scaling_factor=meta_rope_scaling_factor(model_args))
        log(f"RoPE scaling factor {model_args.rope_scaling_factor:g} (params.json does not say; "
            f"{'the shape of Llama 3.2 1B or 3B' if model_args.rope_scaling_factor == 32 else 'as Llama 3.1'})")
    return model_args, llama_files.map_consolidated_pth(path, log)


def read_hf_checkpoint(path: Path, log: Callable[[str], None]) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """config.json and model*.safetensors (memory-mapped), renamed to Meta's names; wq and wk still in
    Hugging Face's row order."""
    config = llama_files.read_config_json(path / "config.json")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}  # transformers 5, or 4
    # config.json gives the FFN hidden size itself. With multiple_of equal to it, Meta's rule lands on it
    # from any smaller start (chapter 4); ffn_dim_multiplier scales the start down when it is larger.
    dim, hidden = config["hidden_size"], config["intermediate_size"]
    start = int(2 * 4 * dim / 3)
    model_args = ModelArgs(
        dim=dim, n_layers=config["num_hidden_layers"], n_heads=config["num_attention_heads"],
        n_kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
        vocab_size=config["vocab_size"], multiple_of=hidden,
        ffn_dim_multiplier=None if start <= hidden else hidden / start, norm_eps=config["rms_norm_eps"],
        rope_theta=rope.get("rope_theta", config.get("rope_theta", 10000.0)),
        use_scaled_rope=rope.get("rope_type", rope.get("type")) == "llama3",
        rope_scaling_factor=rope.get("factor", 8.0),
    )
    if model_args.use_scaled_rope:
        log(f"RoPE scaling factor {model_args.rope_scaling_factor:g} (config.json)")
    state_dict = llama_files.map_safetensors(path, log)
    return model_args, {hf_to_meta_name(name): tensor for name, tensor in state_dict.items()}


def same_matrix(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when b is a (the same memory, as in Meta's 1B and 3B files) or an equal copy of it."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return (a.data_ptr(), a.stride()) == (b.data_ptr(), b.stride()) or torch.equal(a, b)


def load_llama(path: str | Path, max_seq_len: int = 2048, dtype: torch.dtype | None = None, device: str = "cpu",
               log: Callable[[str], None] = print) -> tuple[Transformer, Llama3Tokenizer]:
    """Meta's Llama 3 in our `Transformer`, from a directory in Meta's layout or Hugging Face's.

    The model is built on the meta device (shapes, no memory), then `load_state_dict(assign=True)` makes
    the checkpoint's memory-mapped tensors its parameters: no copy, except Hugging Face's wq and wk (their
    rows are reordered) and, when `dtype` differs from the file's, one conversion per tensor.

    Args:
        path: Meta's layout (params.json, consolidated.00.pth, tokenizer.model) or Hugging Face's
            (config.json, model.safetensors or its shards; tokenizer.model here or in original/, or tokenizer.json).
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
    tokenizer = Llama3Tokenizer(llama_files.find_tokenizer(path))
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
    with torch.device("meta"):  # shapes only: no memory, no initialization
        model = Transformer(replace(llama_files.checked(model_args, path), max_seq_len=max_seq_len, max_batch_size=1))
    llama_files.check_names_and_shapes(state_dict, model.state_dict(), path)  # output.weight may be left out
    embedding, output = state_dict["tok_embeddings.weight"], state_dict.pop("output.weight", None)
    tied = output is None or same_matrix(embedding, output)  # Llama 3.2 1B and 3B: output = the embedding
    if not tied:
        state_dict["output.weight"] = output

    dtype = dtype or embedding.dtype
    for name, tensor in state_dict.items():  # each tensor straight to the device, converted on the way
        heads = None if meta_layout else qk_heads(name, model_args)
        if heads:
            state_dict[name] = unpermute_hf(tensor.to(device), heads, dtype)
        else:
            state_dict[name] = tensor.to(device=device, dtype=dtype)  # no copy when it already is
    if tied:
        state_dict["output.weight"] = state_dict["tok_embeddings.weight"]
    model.load_state_dict(state_dict, strict=True, assign=True)
    if tied:
        model.output.weight = model.tok_embeddings.weight  # one Parameter: counted, cast and moved once
    model = model.to(device).eval()
    n_params = sum(p.numel() for p in model.parameters())  # a shared Parameter counts once
    log(f"loaded {n_params:,} parameters{' (output tied to the embedding)' if tied else ''}: "
        f"{n_params * dtype.itemsize / 1e9:.2f} GB in {str(dtype).removeprefix('torch.')}, "
        f"on {device}, in {time.perf_counter() - t0:.1f} s")
    return model, tokenizer


# ----------------------------------------------------------------------------- a conversation


class ContextFull(ValueError):
    """The history no longer fits in the KV cache."""


class Conversation:
    """Generation that goes on where it stopped: `tokens` is the whole history, and the KV cache holds its
    first `pos` tokens. Each step feeds only the tokens the cache lacks, at position `pos` (Meta's
    `forward(tokens, start_pos)`), so every token of a conversation runs through the model once, and the
    history is exactly the tokens generated (no answer is decoded to text and encoded again).
    """

    def __init__(self, model: Transformer, tokenizer: Llama3Tokenizer, system: str | None = None,
                 temperature: float = 0.6, top_p: float = 0.9, seed: int = 0):
        self.model, self.tokenizer, self.system = model, tokenizer, system
        self.temperature, self.top_p = temperature, top_p
        self.generator = torch.Generator().manual_seed(seed)
        self.tokens: list[int] = []
        self.pos = 0

    @torch.no_grad()
    def generate(self, tokens: list[int], max_new_tokens: int) -> Iterator[int]:
        """Append `tokens` to the history, then sample up to max_new_tokens tokens, yielding each; a stop
        token (<|eot_id|>, ...) is yielded and ends the answer. The last token sampled is in the history
        but not yet in the cache: the next call feeds it first.

        Raises:
            ContextFull: the history outgrows max_seq_len.
        """
        self.tokens += tokens
        device = self.model.tok_embeddings.weight.device
        for _ in range(max_new_tokens):
            if len(self.tokens) > self.model.params.max_seq_len:
                raise ContextFull(f"the context is full ({self.model.params.max_seq_len} tokens, --seq-len): "
                                  f"the conversation ends here")
            new = torch.tensor([self.tokens[self.pos :]], device=device)  # (1, seqlen): what the cache lacks
            with cpu_matrix_vector_kernel(new.shape[1]):  # one token: a faster kernel on a CPU
                logits, _ = self.model(new, start_pos=self.pos)  # (1, seqlen, vocab_size)
            self.pos = len(self.tokens)
            token = int(sample_next(logits[:, -1], self.temperature, self.top_p, self.generator))  # main.py's rule
            self.tokens.append(token)
            yield token
            if token in self.tokenizer.stop_ids:
                return

    def reply(self, message: str, max_new_tokens: int) -> Iterator[int]:
        """The user's next turn, then the assistant's answer (Meta's chat format).

        The turn's tokens: <|begin_of_text|> and the system message if the dialog starts here; <|eot_id|>
        if max_new_tokens cut the last answer short; the user's message; the assistant's header.
        """
        tok = self.tokenizer
        if not self.tokens:
            turn = [tok.bos_id, *(tok.encode_message("system", self.system) if self.system is not None else [])]
        else:
            turn = [tok.eot_id] if self.tokens[-1] not in tok.stop_ids else []
        return self.generate(turn + tok.encode_message("user", message) + tok.encode_header("assistant"),
                             max_new_tokens)


def talk(args: argparse.Namespace) -> None:
    """--llama-dir DIR: continue --prompt, or answer it (--chat), or converse on stdin (--chat alone)."""
    device = pick_device(args.device)
    model, tokenizer = load_llama(args.llama_dir, args.seq_len, getattr(torch, args.dtype) if args.dtype else None,
                                  device, log=lambda line: print(line, file=sys.stderr))
    conversation = Conversation(model, tokenizer, args.system, args.temperature, args.top_p, args.seed)
    if args.chat:
        if args.prompt is not None:
            print(f"> {args.prompt}")
        turns = [args.prompt] if args.prompt is not None else read_user_turns()
    else:
        turns = [args.prompt if args.prompt is not None else "The capital of France is"]
    n_new, seconds = 0, 0.0
    for message in turns:
        t0 = time.perf_counter()
        if args.chat:
            n_new += print_tokens(tokenizer, conversation.reply(message, args.max_new_tokens))
        else:
            print(message, end="")
            n_new += print_tokens(tokenizer, conversation.generate(tokenizer.encode(message, bos=True),
                                                                   args.max_new_tokens))
        seconds += time.perf_counter() - t0
    print(f"{n_new} new tokens in {seconds:.1f} s ({n_new / max(seconds, 1e-9):.1f} tokens/s); "
          f"{conversation.pos} tokens in the KV cache", file=sys.stderr)


# ----------------------------------------------------------------------------- the demo: a tiny random Llama 3

TINY_PARAMS = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 512, "multiple_of": 32,
               "ffn_dim_multiplier": None, "norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": True}


def random_llama(params: dict, std: float, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random weights with Meta's names and shapes for `params` (params.json's keys): matrices of normal
    numbers of this std, norm gains 1, and output.weight the embedding tensor itself, as in Meta's 1B and 3B files."""
    generator = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        shapes = Transformer(ModelArgs(**params)).state_dict()
    weights = {name: (torch.randn(t.shape, generator=generator) * std if t.dim() == 2 else torch.ones(t.shape))
               .to(dtype) for name, t in shapes.items() if name != "output.weight"}
    return {**weights, "output.weight": weights["tok_embeddings.weight"]}


def write_both_layouts(root: Path, weights: dict[str, torch.Tensor], params: dict, tokenizer: str) -> tuple[Path, Path]:
    """The same weights in Meta's layout and in what Hugging Face's conversion script makes of it (its names,
    wq and wk rows reordered, no lm_head when tied), each with `tokenizer` as tokenizer.model. Returns both paths."""
    meta, hf = root / "meta", root / "hf"
    for path in (meta, hf):
        path.mkdir(parents=True)
        (path / "tokenizer.model").write_text(tokenizer)
    (meta / "params.json").write_text(json.dumps(params))
    torch.save(weights, meta / "consolidated.00.pth")

    model_args = ModelArgs(**params)
    tied = weights["output.weight"] is weights["tok_embeddings.weight"]
    hf_weights = {}
    for name, w in weights.items():
        if name == "output.weight" and tied:
            continue  # Hugging Face's file leaves a tied lm_head out
        heads = qk_heads(name, model_args)
        hf_weights[meta_to_hf_name(name)] = (permute_for_hf(w, heads) if heads else w).contiguous()
    save_file(hf_weights, hf / "model.safetensors")
    rope = {"rope_type": "llama3", "rope_theta": params["rope_theta"],
            "factor": meta_rope_scaling_factor(model_args), **llama_files.LLAMA3_ROPE}
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": params["dim"],
              "num_hidden_layers": params["n_layers"], "num_attention_heads": params["n_heads"],
              "num_key_value_heads": params["n_kv_heads"], "vocab_size": params["vocab_size"],
              "intermediate_size": weights["layers.0.feed_forward.w1.weight"].shape[0],
              "rms_norm_eps": params["norm_eps"], "tie_word_embeddings": tied, "max_position_embeddings": 131072,
              "rope_parameters": rope if params["use_scaled_rope"] else {"rope_type": "default",
                                                                         "rope_theta": params["rope_theta"]}}
    (hf / "config.json").write_text(json.dumps(config))
    return meta, hf


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


def plot_figure(logits: dict[str, torch.Tensor], counts: dict[str, int], fig_dir: Path) -> Path:
    """Left: the logits of Hugging Face's layout against Meta's, with and without undoing the reordering.
    Right: where Llama 3.2 1B's parameters are."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig_dir.mkdir(parents=True, exist_ok=True)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    meta = logits["meta"].flatten()
    left.scatter(meta, logits["hf_as_stored"].flatten(), s=2, alpha=0.3, color="tab:red",
                 label="Hugging Face's file, wq and wk taken as stored")
    left.scatter(meta, logits["hf"].flatten(), s=2, color="tab:blue", label="Hugging Face's file, unpermute_hf")
    left.set(title="The same random weights in two layouts: logits of a tiny Llama 3",
             xlabel="logit, loaded from Meta's layout", ylabel="logit, loaded from Hugging Face's layout")
    left.legend(markerscale=6)
    total = sum(counts.values())
    bars = right.barh(list(counts), [c / 1e6 for c in counts.values()], color=["tab:green", "tab:blue", "tab:orange",
                                                                                 "tab:gray"])
    right.bar_label(bars, [f"{c / 1e6:,.1f}M ({c / total:.0%})" for c in counts.values()], padding=3)
    right.invert_yaxis()
    right.set_xlim(0, max(counts.values()) / 1e6 * 1.35)
    right.set(title=f"Llama 3.2 1B: {total:,} parameters, output tied\n({2 * total / 1e9:.2f} GB in bfloat16; "
                    f"an untied output would add {counts['embedding = output'] / 1e6:,.0f}M)",
              xlabel="parameters (millions)")
    fig.tight_layout()
    path = fig_dir / "05_llama3_weights.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def demo_tokenizer(path: Path, corpus: Path | None) -> None:
    """Meta's real tokenizer: a line of Shakespeare, a chat prompt, and the corpus in BPE tokens."""
    tokenizer = Llama3Tokenizer(path)
    text = "ROMEO: But soft, what light through yonder window breaks?"
    ids = tokenizer.encode(text, bos=True)
    print(f"Llama3Tokenizer ({path}): vocab_size {tokenizer.vocab_size:,}; {len(text)} characters -> {len(ids)} ids")
    print(f"  {ids}\n  pieces: {[tokenizer.decode([i]) for i in ids]}")
    dialog = tokenizer.encode_dialog_prompt([{"role": "user", "content": "Who is Romeo?"}])
    print(f"encode_dialog_prompt, one user message: {dialog}\n  = {tokenizer.decode(dialog)!r}")
    if corpus is not None and corpus.is_file():
        text = corpus.read_text(encoding="utf-8")
        n_tokens = len(tokenizer.encode(text))
        print(f"{corpus.name}: {len(text):,} characters = {n_tokens:,} tokens ({len(text) / n_tokens:.2f} per token)")


def demo(args: argparse.Namespace) -> None:
    """No download: a tiny random Llama 3 in both layouts, Llama 3.2 1B counted, and the real tokenizer if present."""
    with tempfile.TemporaryDirectory() as tmp:
        byte_tokenizer = "".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256))
        # std 0.15: logits that spread out
        meta_dir, hf_dir = write_both_layouts(Path(tmp), random_llama(TINY_PARAMS, 0.15), TINY_PARAMS, byte_tokenizer)
        quiet = lambda line: None  # noqa: E731
        models = {"meta": load_llama(meta_dir, 64, log=quiet)[0], "hf": load_llama(hf_dir, 64, log=quiet)[0]}
        # What a loader that renames Hugging Face's tensors but keeps their row order would get:
        models["hf_as_stored"] = Transformer(models["meta"].params)
        stored = read_hf_checkpoint(hf_dir, quiet)[1]  # Meta's names, Hugging Face's row order
        models["hf_as_stored"].load_state_dict({**stored, "output.weight": stored["tok_embeddings.weight"]})
    tokens = torch.tensor([list(b"ROMEO: But soft, what light through yonder window")])  # (1, 49), byte ids
    with torch.no_grad():
        logits = {name: model(tokens)[0] for name, model in models.items()}  # (1, 49, 512) each
    meta = models["meta"]
    print("a tiny random Llama 3 (dim 64, 2 layers, vocab 512) written in Meta's layout and Hugging Face's:")
    print(f"  output.weight is tok_embeddings.weight: {meta.output.weight is meta.tok_embeddings.weight} "
          f"(one Parameter, {sum(p.numel() for p in meta.parameters()):,} parameters)")
    print(f"  logits, Hugging Face's layout against Meta's: max |difference| = "
          f"{(logits['hf'] - logits['meta']).abs().max():.1g} (should be 0)")
    print(f"  the same with wq and wk as stored: {(logits['hf_as_stored'] - logits['meta']).abs().max():.2f}")
    counts = parameter_counts(LLAMA_32_PARAMS["1B"])
    total = sum(counts.values())
    print(f"Llama 3.2 1B: {total:,} parameters (should be 1,235,814,400), {2 * total / 1e9:.2f} GB in bfloat16; "
          f"untied it would be {total + counts['embedding = output']:,}")
    tokenizer = args.llama_tokenizer or packaged_llama3_tokenizer()
    if tokenizer is None:
        print("Meta's tokenizer: not shown; pass --llama-tokenizer PATH/tokenizer.model (or pip install llama-models)")
    else:
        demo_tokenizer(tokenizer, args.data)
    print(f"figure: {plot_figure(logits, counts, args.fig_dir)}")
    print("caption: reordered back, Hugging Face's file gives Meta's logits exactly; taken as stored, RoPE rotates "
          "the wrong pairs. Tied, the 1B model's embedding is a fifth of it, and counts once.")


# ----------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.system is not None and not args.chat:
        parser.error("--system needs --chat")
    with exit_on_error():
        demo(args) if args.llama_dir is None else talk(args)


if __name__ == "__main__":
    main()
