"""Chapter 5: Meta's real Llama 3 in the code of chapters 1-4 and main.py, and a conversation with it.

`main.Transformer` has Meta's state-dict names, so Meta's weights load into it with a strict
`load_state_dict`. What the real model adds is its tokenizer, two file layouts, and a chat format.

Tokenizer. Byte-level BPE (tiktoken), not characters: 128,000 tokens learned by merging frequent neighbours,
starting from the 256 bytes, then 256 special tokens; a token carries 3.7 characters of Tiny Shakespeare.
Meta's `tokenizer.model` lists each token's bytes and rank, and Meta's code names the special tokens; Hugging
Face's `tokenizer.json` holds the same ranks and names the special tokens itself, differently from one release
to the next, so we look up the ones the chat format needs by name in the file.

Checkpoints. Meta's layout (params.json, consolidated.00.pth) uses Meta's names. Hugging Face's (config.json,
model*.safetensors) renames every tensor and reorders the rows of wq and wk inside each head: its RoPE rotates
the first half of a head against the second half, Meta's rotates adjacent pairs (chapter 2). Taken as they are,
those rows rotate the wrong coordinates together: the logits are wrong and nothing fails loudly, so `load_llama`
undoes the reordering. params.json does not give the RoPE scaling factor (32 for Llama 3.2 1B and 3B, 8 for
Llama 3.1), so the loader tells them apart by shape. Llama 3.2 1B and 3B tie the output layer to the embedding;
the model gets one Parameter for both, so the 1B model is 1,235,814,400 parameters (2.47 GB in bfloat16).

Chat. An Instruct model reads Meta's `encode_dialog_prompt`: <|begin_of_text|>, then per message
<|start_header_id|>role<|end_header_id|>, two newlines, content, <|eot_id|>, then the assistant's header; the answer
ends with <|eot_id|>. We follow llama-models: content as it is (meta-llama/llama3 and Hugging Face's template trim
it, and from Llama 3.1 on Hugging Face's opens every dialog with a system turn of dates). A conversation keeps its
KV cache across turns: each turn feeds only its new tokens at the running position (`forward(tokens, start_pos)`).

Needs: main.py (Transformer, sample_next), and through it chapters 1-4.
Run:   python 05_llama3_tokenizer_and_weights.py               # demo on a tiny random model, no download
       python 05_llama3_tokenizer_and_weights.py --llama-dir DIR --prompt "The capital of France is"
       python 05_llama3_tokenizer_and_weights.py --llama-dir DIR --chat    # one user turn per line of stdin
"""

from __future__ import annotations

import argparse
import itertools
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import tiktoken
import torch

from main import ModelArgs, Transformer, sample_next
from plumbing import llama_files, llama_fixtures
from plumbing.chat import build_parser, talk
from plumbing.figures import draw_llama3_weights
from plumbing.runtime import cpu_matrix_vector_kernel, exit_on_error, pick_device

# ----------------------------------------------------------------------------- Llama 3's tokenizer

# Text is first cut into words, numbers of up to three digits, runs of punctuation and whitespace
# (contractions in any case: "'S" as "'s"); BPE then merges bytes only inside each piece.
LLAMA3_PAT_STR = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# The 256 special tokens follow the BPE tokens: <|begin_of_text|> is 128000. tokenizer.model lists only the BPE
# tokens; Meta's code names the special ones, in this order (llama-models', Llama 3.1 on; Llama 3.0's code calls
# 128008 and 128010 reserved, tokens its models never produce, so <|eom_id|> as a stop token changes nothing there).
LLAMA3_NAMED_SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", "<|image|>"]
LLAMA3_SPECIAL_TOKENS = LLAMA3_NAMED_SPECIAL_TOKENS + [f"<|reserved_special_token_{i}|>" for i in range(2, 246)]  # 256
# What the chat format needs, in every release's naming. <|eom_id|> (Llama 3.1 on) and <|finetune_right_pad_id|>
# are used where the tokenizer has them.
REQUIRED_SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                           "<|eot_id|>"]
# Meta's Tokenizer.encode hands tiktoken at most 400,000 characters at a time, and cuts every run of more than
# 25,000 spaces or non-spaces after each 25,000 (tiktoken used to panic on longer texts, or be slow on such runs).
# A cut inside a word changes the ids, so we cut where Meta does: on Tiny Shakespeare, character 400,000 splits
# " we" into " " and "we" (Hugging Face's tokenizer, which does not cut, has one token fewer there).
MAX_ENCODE_CHARS = 400_000
RUN_CUT = re.compile(r"\s{25000}(?=\s)|\S{25000}(?=\S)")  # 25,000 characters of a longer run (\s is str.isspace)


def meta_pieces(text: str) -> Iterator[str]:
    """`text` cut where Meta's Tokenizer.encode cuts it before tiktoken sees it."""
    for start in range(0, len(text), MAX_ENCODE_CHARS):
        chunk = text[start : start + MAX_ENCODE_CHARS]
        cuts = [0, *(run.end() for run in RUN_CUT.finditer(chunk)), len(chunk)]
        yield from (chunk[a:b] for a, b in itertools.pairwise(cuts))


class Llama3Tokenizer:
    """Llama 3's byte-level BPE, with the interface of chapter 1's `CharTokenizer`, and Meta's chat format.

    Text that spells a special token, such as "<|eot_id|>", is encoded as ordinary text, as Meta's
    tokenizer does by default: a prompt cannot forge a turn of the chat format.
    """

    def __init__(self, path: str | Path):
        """path: Meta's tokenizer.model, or Hugging Face's tokenizer.json. Raises ValueError for another file."""
        path = Path(path)
        if path.suffix == ".json":  # the same ranks as ids, spelled in GPT-2's alphabet; special tokens by name
            ranks, special_tokens = llama_files.read_tokenizer_json(path)
        else:
            ranks = llama_files.read_tokenizer_model(path)
            special_tokens = {token: len(ranks) + i for i, token in enumerate(LLAMA3_SPECIAL_TOKENS)}
        missing = [token for token in REQUIRED_SPECIAL_TOKENS if token not in special_tokens]
        if missing:
            raise ValueError(f"{path} has no {', '.join(missing)}: Llama 3's chat format needs them")
        self.special_tokens = special_tokens
        self.model = tiktoken.Encoding(name=path.name, pat_str=LLAMA3_PAT_STR, mergeable_ranks=ranks,
                                       special_tokens=special_tokens)
        self.bos_id = special_tokens["<|begin_of_text|>"]
        self.eos_id = special_tokens["<|end_of_text|>"]
        self.eot_id = special_tokens["<|eot_id|>"]  # end of turn
        # Llama 3.1 on: end of message (the model waits for a tool's answer), and Meta's padding token
        self.eom_id = special_tokens.get("<|eom_id|>")
        self.pad_id = special_tokens.get("<|finetune_right_pad_id|>")
        self.stop_ids = {self.eos_id, self.eot_id} | ({self.eom_id} if self.eom_id is not None else set())

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


# ----------------------------------------------------------------------------- Meta's and Hugging Face's files

# (dim, n_layers) of Llama 3.2 1B and 3B. Meta's params.json does not carry the RoPE scaling factor: it is 32 for
# these two shapes and 8 for Llama 3.1 (Meta's reference code hard-codes 8), so the loader tells them apart by shape.
LLAMA_32_SMALL_SHAPES = {(2048, 16), (3072, 28)}
# Hugging Face's names of one layer's weights -> Meta's; then every tensor's, "{}" standing for the layer's number.
HF_LAYER_NAMES = {
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
}
HF_NAMES = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
            "lm_head.weight": "output.weight",
            **{f"model.layers.{{}}.{hf}.weight": f"layers.{{}}.{meta}.weight" for hf, meta in HF_LAYER_NAMES.items()}}
META_NAMES = {meta: hf for hf, meta in HF_NAMES.items()}  # Meta's -> Hugging Face's


def rename(name: str, names: dict[str, str]) -> str:
    """A tensor's name in the other layout (names: HF_NAMES or META_NAMES); a name not in it stays as it is.
    rename('model.layers.3.self_attn.q_proj.weight', HF_NAMES) == 'layers.3.attention.wq.weight'."""
    layer = re.search(r"layers\.(\d+)\.", name)
    pattern = name.replace(layer.group(), "layers.{}.", 1) if layer else name
    return names[pattern].format(layer.group(1) if layer else "") if pattern in names else name


def unpermute_hf(w: torch.Tensor, n_heads: int, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """Undo Hugging Face's row order in wq or wk: within each head, its rows (i, head_dim/2 + i) become Meta's
    adjacent rows (2i, 2i + 1), the pair that RoPE rotates together. One copy, into `dtype` on `device` if given.
    (n_heads * head_dim, dim) -> (n_heads * head_dim, dim)"""
    rows, dim = w.shape
    pairs = w.view(n_heads, 2, rows // n_heads // 2, dim).transpose(1, 2)  # (n_heads, head_dim/2, 2, dim), a view
    out = torch.empty(pairs.shape, dtype=dtype or w.dtype, device=device or w.device)
    return out.copy_(pairs).view(rows, dim)  # reordered (and converted, and moved) in one copy


def permute_for_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """What Hugging Face's conversion script does to Meta's wq and wk, or to any matrix whose rows are theirs
    (LoRA's B, chapter 6): within each head, rows (2i, 2i + 1) become rows (i, head_dim/2 + i); unpermute_hf
    undoes it. (n_heads * head_dim, cols) -> (n_heads * head_dim, cols)"""
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


def hf_state_dict(weights: dict[str, torch.Tensor], model_args: ModelArgs) -> dict[str, torch.Tensor]:
    """What Hugging Face's conversion script makes of Meta's weights (the inverse of what load_llama undoes): its
    names, wq's and wk's rows reordered, and no lm_head when the output is tied to the embedding."""
    tied = weights.get("output.weight") is weights["tok_embeddings.weight"]
    hf_weights = {}
    for name, w in weights.items():
        if not (tied and name == "output.weight"):
            heads = qk_heads(name, model_args)
            hf_weights[rename(name, META_NAMES)] = (permute_for_hf(w, heads) if heads else w).contiguous()
    return hf_weights


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
    """config.json (in params.json's terms) and model*.safetensors (memory-mapped), renamed to Meta's names; wq
    and wk still in Hugging Face's row order."""
    model_args = ModelArgs(**llama_files.read_config_json(path / "config.json"))
    if model_args.use_scaled_rope:
        log(f"RoPE scaling factor {model_args.rope_scaling_factor:g} (config.json)")
    state_dict = llama_files.map_safetensors(path, log)
    return model_args, {rename(name, HF_NAMES): tensor for name, tensor in state_dict.items()}


def same_matrix(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when b is a (the same memory, as in Meta's 1B and 3B files) or an equal copy of it."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return (a.data_ptr(), a.stride()) == (b.data_ptr(), b.stride()) or torch.equal(a, b)


def read_llama(path: Path, max_seq_len: int, log: Callable[[str], None]
               ) -> tuple[Transformer, dict[str, torch.Tensor], Llama3Tokenizer, bool]:
    """Meta's Llama 3 before a weight is read: the model on the meta device (shapes, no memory), the file's
    memory-mapped tensors under Meta's names (checked against it; a tied output left out), the tokenizer, and whether
    the layout is Meta's (else Hugging Face's, whose wq and wk are still in its row order)."""
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

    # Llama 3.2 1B and 3B tie the output layer to the embedding: Meta's file holds the same tensor twice, Hugging
    # Face's leaves it out. Then the output is the embedding's own Parameter: counted, cast and moved once.
    output = state_dict.pop("output.weight", None)
    if output is not None and not same_matrix(state_dict["tok_embeddings.weight"], output):
        state_dict["output.weight"] = output
    return model, state_dict, tokenizer, meta_layout


def load_llama(path: str | Path, max_seq_len: int = 2048, dtype: torch.dtype | None = None, device: str = "cpu",
               log: Callable[[str], None] = print) -> tuple[Transformer, Llama3Tokenizer]:
    """Meta's Llama 3 in our `Transformer`, in eval mode on `device`, and its tokenizer, from a directory in Meta's
    layout (params.json, consolidated.00.pth, tokenizer.model) or Hugging Face's (config.json, model*.safetensors,
    tokenizer.model here or in original/, or tokenizer.json). read_llama's memory-mapped tensors become the
    parameters: on a CPU only Hugging Face's wq and wk (reordered) and what `dtype` converts are copied; on a GPU
    each tensor is copied once. max_seq_len sizes the KV cache. Raises FileNotFoundError or ValueError naming a file."""
    t0 = time.perf_counter()
    model, state_dict, tokenizer, meta_layout = read_llama(Path(path), max_seq_len, log)
    tied = "output.weight" not in state_dict
    dtype = dtype or state_dict["tok_embeddings.weight"].dtype
    for name, tensor in state_dict.items():  # each tensor straight to the device, converted on the way
        heads = None if meta_layout else qk_heads(name, model.params)
        if heads:
            state_dict[name] = unpermute_hf(tensor, heads, dtype, device)
        else:
            state_dict[name] = tensor.to(device=device, dtype=dtype)  # no copy when it already is
    if tied:
        state_dict["output.weight"] = state_dict["tok_embeddings.weight"]
    model.load_state_dict(state_dict, strict=True, assign=True)
    if tied:  # assign gave each name a Parameter of its own: one again
        model.output.weight = model.tok_embeddings.weight
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
        """Append `tokens` to the history, then sample up to max_new_tokens tokens, yielding each; a stop token
        (<|eot_id|>, ...) is yielded and ends the answer. The last token sampled is in the history but not yet in
        the cache: the next call feeds it first. Raises ContextFull when the history outgrows max_seq_len."""
        self.tokens += tokens
        device = self.model.tok_embeddings.weight.device
        for _ in range(max_new_tokens):
            if len(self.tokens) > self.model.params.max_seq_len:
                raise ContextFull(f"the context is full ({self.model.params.max_seq_len} tokens, --seq-len): "
                                  f"the conversation ends here")
            new = torch.tensor([self.tokens[self.pos :]], device=device)  # (1, seqlen): what the cache lacks
            # One token multiplies each weight by a vector: on a CPU, oneDNN's kernel reads bfloat16 weights
            # slower than PyTorch's own, so it is switched off for one-token steps (docs/llama3.md, "Speed on a CPU").
            with cpu_matrix_vector_kernel(new.shape[1]):
                logits, _ = self.model(new, start_pos=self.pos)  # (1, seqlen, vocab_size)
            self.pos = len(self.tokens)
            token = int(sample_next(logits[:, -1], self.temperature, self.top_p, self.generator))  # main.py's rule
            self.tokens.append(token)
            yield token
            if token in self.tokenizer.stop_ids:
                return

    def reply(self, message: str, max_new_tokens: int) -> Iterator[int]:
        """The user's next turn, then the assistant's answer (Meta's chat format). The turn's tokens: <|begin_of_text|>
        and the system message if the dialog starts here; <|eot_id|> if max_new_tokens cut the last answer short;
        the user's message; the assistant's header."""
        tok = self.tokenizer
        if not self.tokens:
            turn = [tok.bos_id, *(tok.encode_message("system", self.system) if self.system is not None else [])]
        else:
            turn = [tok.eot_id] if self.tokens[-1] not in tok.stop_ids else []
        return self.generate(turn + tok.encode_message("user", message) + tok.encode_header("assistant"),
                             max_new_tokens)


# ----------------------------------------------------------------------------- the command line and the demo
# You may skip from here: Llama 3 ends above. Below, the command line talks with a checkpoint, and the demo writes a
# tiny random one in both layouts (plumbing/llama_fixtures.py writes the files).


def demo_tokenizer(path: Path, corpus: Path | None) -> None:
    """Meta's real tokenizer: a line of Shakespeare, a chat prompt, and the corpus in BPE tokens."""
    tokenizer = Llama3Tokenizer(path)
    text = "ROMEO: But soft, what light through yonder window breaks?"
    ids = tokenizer.encode(text, bos=True)
    print(f"Llama3Tokenizer ({path}): vocab_size {tokenizer.vocab_size:,}; {len(text)} characters -> {len(ids)} ids")
    print(f"  {ids}\n  pieces: {[tokenizer.decode([i]) for i in ids]}")
    print(f"  decode(encode(text)) == text: {tokenizer.decode(ids[1:]) == text} (should be True)")
    dialog = tokenizer.encode_dialog_prompt([{"role": "user", "content": "Who is Romeo?"}])
    print(f"encode_dialog_prompt, one user message: {dialog}\n  = {tokenizer.decode(dialog)!r}")
    if corpus is not None and corpus.is_file():
        text = corpus.read_text(encoding="utf-8")
        n_tokens = len(tokenizer.encode(text))
        print(f"{corpus.name}: {len(text):,} characters = {n_tokens:,} tokens ({len(text) / n_tokens:.2f} per token; "
              f"Tiny Shakespeare should give 301,769, as Meta's own Tokenizer does)")


def demo(args: argparse.Namespace) -> None:
    """No download: a tiny random Llama 3 in both layouts, Llama 3.2 1B counted, and the real tokenizer if present."""
    params = llama_fixtures.TINY_PARAMS  # dim 64, 2 layers, the byte tokenizer's 512 tokens
    weights = llama_fixtures.random_llama(params, std=0.15)  # std 0.15: logits that spread out
    model_args = ModelArgs(**params)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_model = llama_fixtures.BYTE_TOKENIZER
        meta_dir = llama_fixtures.write_meta_layout(Path(tmp) / "meta", weights, params, tokenizer_model)
        hf_dir = llama_fixtures.write_hf_layout(Path(tmp) / "hf", hf_state_dict(weights, model_args), params,
                                                meta_rope_scaling_factor(model_args), tokenizer_model)
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
          f"(should be True: one Parameter, {sum(p.numel() for p in meta.parameters()):,} parameters)")
    print(f"  logits, Hugging Face's layout against Meta's: max |difference| = "
          f"{(logits['hf'] - logits['meta']).abs().max():.1g} (should be 0)")
    print(f"  the same with wq and wk as stored: {(logits['hf_as_stored'] - logits['meta']).abs().max():.2f}, where "
          f"the largest |logit| is {logits['meta'].abs().max():.2f} (should be of the logits' own size: RoPE "
          f"rotates the wrong pairs, and nothing fails)")
    counts = llama_fixtures.parameter_counts(llama_fixtures.LLAMA_32_PARAMS["1B"])
    total = sum(counts.values())
    print(f"Llama 3.2 1B: {total:,} parameters (should be 1,235,814,400), {2 * total / 1e9:.2f} GB in bfloat16; "
          f"untied it would be {total + counts['embedding = output']:,}")
    tokenizer = args.llama_tokenizer or llama_fixtures.packaged_llama3_tokenizer()
    if tokenizer is None:
        print("Meta's tokenizer: not shown; pass --llama-tokenizer PATH/tokenizer.model (or pip install llama-models)")
    else:
        demo_tokenizer(tokenizer, args.data)
    print(f"figure: {draw_llama3_weights(logits, counts, args.fig_dir)}")
    print("caption: reordered back, Hugging Face's file gives Meta's logits exactly; taken as stored, RoPE rotates "
          "the wrong pairs. Tied, the 1B model's embedding is a fifth of it, and counts once.")


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.system is not None and not args.chat:
        parser.error("--system needs --chat")
    with exit_on_error():
        if args.llama_dir is None:
            return demo(args)
        model, tokenizer = load_llama(args.llama_dir, args.seq_len, getattr(torch, args.dtype) if args.dtype else None,
                                      pick_device(args.device), log=lambda line: print(line, file=sys.stderr))
        talk(Conversation(model, tokenizer, args.system, args.temperature, args.top_p, args.seed), args)


if __name__ == "__main__":
    main()
