"""Chapter 7: serving Llama 3 on a laptop: many prompts at once, and int8 weights.

Chapter 5 decodes one sequence at a time. Each new token multiplies every weight matrix by one vector, so all of
the model, 2.47 GB for Llama 3.2 1B in bfloat16, comes from memory for every token: the memory's bandwidth, not the
arithmetic, sets the speed (at most bandwidth / weight bytes tokens per second; docs/llama3.md). Servers beat that
bound two ways, and this chapter builds both.

Batching. One step multiplies the weights by the next token of B sequences at once: the weights are read once for
B tokens. Meta's `generate` (llama-models) puts prompts of different lengths in one right-padded batch, every row
from position 0. The first step feeds the positions that every row has (the shortest prompt); each later step
feeds one more position and samples the next, and a row whose prompt goes on there keeps its own prompt token
(P prompt, g generated, . pad; three new tokens each):

    padded:    P P P P P P . . .        answered:    P P P P P P g g g
               P P . . . . . . .                     P P g g g . . . .
               P P P P . . . . .                     P P P P g g g . .

A position is fed only once every row holds a real token there, so no pad is ever in the KV cache and nothing
attends to one: each row's answer is the one it gets alone (the tests check it token for token). The cache holds
2 (keys and values) x n_layers x B x context x n_kv_heads x head_dim numbers: 64 MiB per row of 2,048 positions
for Llama 3.2 1B in bfloat16. `generate_batch` sizes it for each batch, and a row that reaches its stop token
leaves the batch with its rows of the cache.

int8 weights. Weight-only quantization stores each matrix W (out, in) as int8 with one scale per output row:

    s_i = max_j |W_ij| / 127      q_ij = round(W_ij / s_i) in [-127, 127]      |W_ij - q_ij s_i| <= s_i / 2

- Per row, because output i is one dot product: y_i = s_i * sum_j q_ij x_j, so the scale costs one multiply per
  output; and each row's step is set by its own largest weight, not by the largest of the matrix.
- The activations stay in bfloat16: the only error is the rounding of each weight, at most half a step.
- A token reads half the bytes: 1.24 GB for Llama 3.2 1B. Its output layer is tied to the embedding: one int8
  matrix serves both (a looked-up row is dequantized), as one Parameter did.
- Quantize once, load many times (as gpt-fast and llama.cpp do). A bfloat16 file is memory-mapped, and the pages
  that quantizing reads stay resident, so quantizing while loading peaks at both copies. `--save-int8` writes the
  int8 weights once (safetensors: tensors only, no pickled code), and `--llama-dir` maps them as they are.

Needs: main.py (Transformer, sample_next), 05_llama3_tokenizer_and_weights.py (load_llama); the flags and the
       printing of answers are plumbing/serving.py's.
Run:   python 07_batching_and_int8.py                              # the demo: seconds, no download
       python 07_batching_and_int8.py --llama-dir Llama-3.2-1B/original --save-int8 Llama-3.2-1B-int8
       python 07_batching_and_int8.py --llama-dir Llama-3.2-1B-int8 --prompts prompts.txt --batch-size 4
       python 07_batching_and_int8.py --help                       # every flag
"""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from main import ModelArgs, Transformer, generate_tokens, sample_next
from plumbing import llama_files, llama_fixtures, serving
from plumbing.figures import draw_serving
from plumbing.runtime import cpu_batch_kernels, exit_on_error, pick_device
from plumbing.validators import check_sampling

llama = importlib.import_module("05_llama3_tokenizer_and_weights")

# ----------------------------------------------------------------------------- many prompts in one batch


@contextmanager
def batch_kv_cache(model: Transformer, batch_size: int, seq_len: int) -> Iterator[list[nn.Module]]:
    """Every layer's KV cache sized for one batch, batch_size rows of seq_len positions, whatever the model was
    built for. Attention (chapter 3) allocates it at the batch's first forward pass; it is freed when the batch
    ends. Yields the layers' Attention modules."""
    attentions = [layer.attention for layer in model.layers]
    sizes = [(a.max_batch_size, a.max_seq_len) for a in attentions]
    for a in attentions:
        a.max_batch_size, a.max_seq_len, a.cache_k, a.cache_v = batch_size, seq_len, None, None
    try:
        yield attentions
    finally:
        for a, (rows, positions) in zip(attentions, sizes, strict=True):
            a.max_batch_size, a.max_seq_len, a.cache_k, a.cache_v = rows, positions, None, None


@torch.no_grad()
def generate_batch(model: Transformer, prompts: list[list[int]], max_new_tokens: int, stop_ids: set[int],
                   temperature: float = 0.6, top_p: float = 0.9,
                   generator: torch.Generator | None = None) -> list[list[int]]:
    """Continue every prompt (a list of token ids) by up to max_new_tokens tokens, all prompts in one batch.

    Meta's `generate` (llama-models): the prompts fill one right-padded (bsz, total_len) tensor, every row from
    position 0. The first forward pass feeds the first min_len positions of every row, all of them prompt; then
    each step feeds one position of every row and samples its next token, which a row whose prompt is longer
    replaces by its own prompt token. Position p is fed only once every row holds a real token there, so no pad
    is ever in the KV cache: nothing attends to it. A row leaves the batch, with its rows of the KV cache, at its
    first stop token or its max_new_tokens-th token.

    Returns:
        for each prompt, its new tokens, up to (not including) the first stop token.
    Raises:
        ValueError: an empty prompt, bad sampling settings, or prompts too long for the model's max_seq_len.
    """
    check_sampling(temperature, top_p, max_new_tokens)
    lengths = torch.tensor([len(p) for p in prompts])
    if not prompts or lengths.min() == 0:
        raise ValueError("generate_batch needs at least one prompt, and a token in each")
    bsz, total_len = len(prompts), int(lengths.max()) + max_new_tokens
    if total_len > model.params.max_seq_len:
        raise ValueError(f"the longest prompt ({int(lengths.max())} tokens) and {max_new_tokens} new tokens do not "
                         f"fit in the context ({model.params.max_seq_len} tokens)")
    if max_new_tokens == 0:
        return [[] for _ in prompts]
    tokens = torch.zeros(bsz, total_len, dtype=torch.long)  # right-padded: the 0s after a prompt are never fed
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = torch.tensor(prompt)
    is_prompt = torch.arange(total_len) < lengths[:, None]  # (bsz, total_len)
    ends = lengths + max_new_tokens  # (bsz,) the position after a row's last token at the latest
    stop = torch.tensor(sorted(stop_ids), dtype=torch.long)
    device = model.norm.weight.device
    rows = torch.arange(bsz)  # the rows still generating, in the order of the KV cache's rows
    with batch_kv_cache(model, bsz, total_len) as attentions:
        prev_pos = 0
        for cur_pos in range(int(lengths.min()), total_len):
            chunk = tokens[rows, prev_pos:cur_pos].to(device)  # (len(rows), cur_pos - prev_pos)
            with cpu_batch_kernels(chunk.numel()):  # the fastest CPU kernels for this many tokens
                logits, _ = model(chunk, start_pos=prev_pos)  # (len(rows), cur_pos - prev_pos, vocab_size)
            next_token = sample_next(logits[:, -1], temperature, top_p, generator).view(-1).cpu()  # (len(rows),)
            next_token = torch.where(is_prompt[rows, cur_pos], tokens[rows, cur_pos], next_token)
            tokens[rows, cur_pos] = next_token
            done = ~is_prompt[rows, cur_pos] & (torch.isin(next_token, stop) | (ends[rows] == cur_pos + 1))
            if done.any():  # finished rows leave the batch: later steps neither compute nor cache them
                rows = rows[~done]
                for a in attentions:
                    a.cache_k, a.cache_v = a.cache_k[~done.to(device)], a.cache_v[~done.to(device)]
                if len(rows) == 0:
                    break
            prev_pos = cur_pos
    answers = []
    for row in range(bsz):
        new = tokens[row, lengths[row] : ends[row]].tolist()
        answers.append(new[: next((i for i, t in enumerate(new) if t in stop_ids), len(new))])
    return answers


# ----------------------------------------------------------------------------- int8 weights


def quantize_rows(w: torch.Tensor, block: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one scale per row: w ~ q * scale[:, None], q = round(w / scale) in [-127, 127] and
    scale = max |row| / 127, kept in w's dtype. Each weight is off by at most scale / 2, half a step.
    Computed `block` rows at a time, so that a large matrix is never copied whole into float32.
    (out, in) -> q (out, in) int8, scale (out,)"""
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scale = torch.empty(w.shape[0], dtype=w.dtype, device=w.device)
    for start in range(0, w.shape[0], block):
        rows = w[start : start + block].float()  # (block, in)
        s = (rows.abs().amax(dim=1) / 127).to(w.dtype)  # (block,) rounded as it will be stored
        step = s.float().clamp(min=torch.finfo(torch.float32).tiny)[:, None]  # a row of zeros stays 0
        q[start : start + block] = (rows / step).round().clamp(-127, 127)
        scale[start : start + block] = s
    return q, scale


class Int8Linear(nn.Module):
    """nn.Linear (no bias) with an int8 weight and one scale per output row, computed in the input's dtype:

        y_i = sum_j x_j (q_ij * s_i) = s_i * sum_j x_j q_ij

    The scale of output i factors out of its dot product, so the kernel reads the int8 row once and multiplies
    one sum by s_i. PyTorch's `_weight_int8pack_mm` does it: it takes a 2-D input whose rows are 16-byte aligned,
    and reads the weights 8 at a time (in_features must be a multiple of 8; it returns wrong numbers otherwise).
    """

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        if weight.dtype != torch.int8 or weight.shape[1] % 8:
            raise ValueError(f"Int8Linear needs an int8 weight with in_features a multiple of 8, got "
                             f"{weight.dtype} {tuple(weight.shape)}")
        self.register_buffer("weight", weight)  # (out_features, in_features) int8
        self.register_buffer("scale", scale)  # (out_features,) in the model's dtype

    @classmethod
    def quantize(cls, linear: nn.Linear) -> Int8Linear:
        weight, scale = quantize_rows(linear.weight.detach())
        return cls(weight=weight, scale=scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # (rows, in_features): the kernel takes a matrix
        if not x2.is_contiguous() or x2.data_ptr() % 16:  # the kernel would read it wrongly, or crash
            x2 = x2.clone(memory_format=torch.contiguous_format)
        y = torch._weight_int8pack_mm(x2, self.weight, self.scale.to(x.dtype))  # (rows, out_features)
        return y.view(*x.shape[:-1], y.shape[-1])


class Int8Embedding(nn.Module):
    """An embedding lookup from an int8 matrix: each token's row, dequantized (q * scale). For a tied model it
    holds the output layer's own int8 matrix and scales: one matrix serves both, as one Parameter did."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight)  # (vocab_size, dim) int8
        self.register_buffer("scale", scale)  # (vocab_size,)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(tokens, self.weight)  # (bsz, seqlen, dim) int8
        return rows.to(self.scale.dtype) * self.scale[tokens][..., None]  # (bsz, seqlen, dim)


BLOCK_PROJECTIONS = {"attention": ("wq", "wk", "wv", "wo"), "feed_forward": ("w1", "w2", "w3")}


def quantize_int8(model: Transformer) -> Transformer:
    """Replace, in place, the seven projections of every block and the output layer with Int8Linear. A tied
    embedding (Llama 3.2 1B and 3B) becomes an Int8Embedding of the output's int8 matrix; an untied one stays as it
    is (a lookup reads one row per token: it costs memory, not time). The norms stay in their dtype.
    Returns the model."""
    tied = model.output.weight is model.tok_embeddings.weight
    for layer in model.layers:
        for part, names in BLOCK_PROJECTIONS.items():
            module = getattr(layer, part)
            for name in names:
                setattr(module, name, Int8Linear.quantize(getattr(module, name)))
    model.output = Int8Linear.quantize(model.output)
    if tied:
        model.tok_embeddings = Int8Embedding(weight=model.output.weight, scale=model.output.scale)
    return model


# ----------------------------------------------------------------------------- quantize once, load many times

INT8_WEIGHTS = "model_int8.safetensors"


def save_int8(model: Transformer, tokenizer_file: Path, out: Path) -> Path:
    """Write a quantized model to `out`: its tensors in model_int8.safetensors (int8 weights, scales and norms:
    tensors only, no pickled code; a tied output is left out, as Hugging Face leaves out lm_head), params.json in
    Meta's keys, and the tokenizer file. Returns out."""
    out.mkdir(parents=True, exist_ok=True)
    tied = model.tok_embeddings.weight is model.output.weight
    tensors = {name: t.contiguous() for name, t in model.state_dict().items()
               if not (tied and name.startswith("output."))}
    p = model.params
    save_file(tensors, out / INT8_WEIGHTS, metadata={"rope_scaling_factor": str(p.rope_scaling_factor)})
    params = {key: getattr(p, key) for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
                                               "ffn_dim_multiplier", "norm_eps", "rope_theta", "use_scaled_rope")}
    (out / "params.json").write_text(json.dumps(params, indent=2))
    shutil.copy(tokenizer_file, out / tokenizer_file.name)
    return out


def load_int8(path: Path, max_seq_len: int = 2048,
              log: Callable[[str], None] = print) -> tuple[Transformer, llama.Llama3Tokenizer]:
    """A directory that save_int8 wrote, as chapter 5's load_llama loads one: the model built on the meta device,
    then the file's memory-mapped tensors made its buffers as they are (nothing converted or copied: the int8
    matrices are read from disk when first used). Names, shapes and dtypes are checked against params.json.
    Raises FileNotFoundError or ValueError, with a message that names the file and what is wrong."""
    tokenizer = llama.Llama3Tokenizer(llama_files.find_tokenizer(path))
    weights, metadata = llama_files.map_safetensors_file(path / INT8_WEIGHTS, log)
    model_args = ModelArgs(**llama_files.read_params_json(path / "params.json"))
    try:
        model_args = replace(llama_files.checked(model_args, path), max_seq_len=max_seq_len, max_batch_size=1,
                             rope_scaling_factor=float(metadata["rope_scaling_factor"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path / INT8_WEIGHTS} was not written by save_int8 ({e})") from e
    if model_args.vocab_size != tokenizer.vocab_size:
        raise ValueError(f"{path}: the model's vocab_size {model_args.vocab_size} is not its tokenizer's "
                         f"{tokenizer.vocab_size}")
    tied = "output.weight" not in weights
    with torch.device("meta"):  # the int8 model's shapes, no memory
        model = Transformer(model_args)
        if tied:
            model.output.weight = model.tok_embeddings.weight
        quantize_int8(model)
    expected = {name: t for name, t in model.state_dict().items() if not (tied and name.startswith("output."))}
    llama_files.check_names_and_shapes(weights, expected, path)
    expected = model.to(weights["norm.weight"].dtype).state_dict()  # the int8 matrices stay int8
    for name, tensor in weights.items():
        if tensor.dtype != expected[name].dtype:
            raise ValueError(f"{path / INT8_WEIGHTS}: {name} is {tensor.dtype}, not {expected[name].dtype}")
    if tied:
        weights.update({f"output.{name}": weights[f"tok_embeddings.{name}"] for name in ("weight", "scale")})
    model.load_state_dict(weights, strict=True, assign=True)  # a buffer takes the tensor itself: still one matrix
    return model.eval(), tokenizer


# ----------------------------------------------------------------------------- the command line and the demo
# You may skip from here: serving ends above. Below, the command line loads a checkpoint and answers prompts, and
# the demo runs on tiny random models (plumbing/serving.py holds the flags, plumbing/figures.py the figure).


def load(args: argparse.Namespace, log: Callable[[str], None]) -> tuple[Transformer, llama.Llama3Tokenizer]:
    """--llama-dir: an int8 directory as it is, or chapter 5's checkpoint, quantized with --int8 or --save-int8."""
    device = pick_device(args.device)
    if (args.llama_dir / INT8_WEIGHTS).is_file():
        if args.dtype or args.save_int8:
            raise ValueError(f"{args.llama_dir} is an int8 directory already: drop --dtype and --save-int8")
        model, tokenizer = load_int8(args.llama_dir, args.seq_len, log)
        return model.to(device), tokenizer
    dtype = getattr(torch, args.dtype) if args.dtype else None
    model, tokenizer = llama.load_llama(args.llama_dir, args.seq_len, dtype, device, log)
    return (quantize_int8(model) if args.int8 or args.save_int8 else model), tokenizer


def demo_batching(model: Transformer) -> None:
    """Four prompts of 1, 5, 17 and 40 tokens in one batch, against each generated alone."""
    texts = ["R", "ROMEO", "But soft, what li", "It is the east, and Juliet is the sun. A"]
    prompts = [list(text.encode()) for text in texts]  # the byte tokenizer: one id per byte
    batched = generate_batch(model, prompts, 24, set(), temperature=0)
    alone = [list(generate_tokens(model, prompt, 24, set(), temperature=0)) for prompt in prompts]
    print(f"generate_batch: 4 prompts of {', '.join(str(len(p)) for p in prompts)} tokens, right-padded in one "
          f"batch, 24 greedy tokens each")
    print(f"  every answer equals its prompt generated alone (main.generate_tokens): {batched == alone} "
          f"(should be True: no pad is ever attended)")
    stop = {batched[2][5]}  # a token that the third answer meets at its sixth step
    cut = generate_batch(model, prompts, 24, stop, temperature=0)
    print(f"  with a stop token, each row stops on its own: answers of {[len(a) for a in cut]} tokens, the others "
          f"unchanged: {all(a == b[: len(a)] for a, b in zip(cut, batched, strict=True))} (should be True)")
    p = llama_fixtures.LLAMA_32_PARAMS["1B"]
    row = 2 * p["n_layers"] * 2048 * p["n_kv_heads"] * (p["dim"] // p["n_heads"]) * 2  # bytes, bfloat16
    print(f"  KV cache of Llama 3.2 1B: 2 x {p['n_layers']} layers x B x 2,048 positions x {p['n_kv_heads']} KV "
          f"heads x {p['dim'] // p['n_heads']} x 2 bytes = B x {row / 2**20:.0f} MiB")


def demo_int8(model: Transformer, tmp: Path, tokenizer_file: Path) -> torch.Tensor:
    """The rounding of every weight, the logits, bytes per token of Llama 3.2 1B, and a save and load.
    Returns every weight's rounding error in steps ((w - q s) / s)."""
    weights = {name: t.clone() for name, t in model.state_dict().items()}
    tokens = torch.tensor([list(b"It is the east, and Juliet is the sun.")])  # (1, 38)
    with torch.no_grad():
        before = model(tokens)[0]
        after = quantize_int8(model)(tokens)[0]  # (1, 38, vocab_size)
    errors = torch.cat([((weights[f"{name}.weight"] - m.weight * m.scale[:, None]) / m.scale[:, None]).flatten()
                        for name, m in model.named_modules() if isinstance(m, Int8Linear)])
    print(f"quantize_int8: {sum(isinstance(m, Int8Linear) for m in model.modules())} matrices to int8, one scale per "
          f"row; the output layer and the embedding share one: {model.output.weight is model.tok_embeddings.weight} "
          f"(should be True)")
    print(f"  largest rounding error: {errors.abs().max():.3f} of a step (should be <= 0.5); logits: largest "
          f"change {(after - before).abs().max():.3f} where the largest |logit| is {before.abs().max():.2f}, "
          f"same top token at {(after.argmax(-1) == before.argmax(-1)).float().mean():.0%} of positions")
    reloaded, _ = load_int8(save_int8(model, tokenizer_file, tmp / "int8"), 64, log=lambda line: None)
    with torch.no_grad():
        print(f"  save_int8, then load_int8: the same logits as quantizing on the fly: "
              f"{torch.equal(reloaded(tokens)[0], after)} (should be True)")
    bf16 = llama_fixtures.tied_meta_model(llama_fixtures.LLAMA_32_PARAMS["1B"]).to(torch.bfloat16)
    sizes = {"bfloat16": model_bytes(bf16), "int8": model_bytes(quantize_int8(bf16))}
    print(f"  Llama 3.2 1B reads {sizes['bfloat16'] / 1e9:.2f} GB per token in bfloat16, {sizes['int8'] / 1e9:.2f} GB "
          f"in int8 (the scales and norms included): {sizes['bfloat16'] / sizes['int8']:.2f}x fewer bytes")
    return errors


def model_bytes(model: nn.Module) -> int:
    """The bytes of a model's parameters and buffers, a shared tensor once."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def tokens_per_s(model: Transformer, batch_sizes: list[int], new_tokens: int = 4) -> dict[int, float]:
    """New tokens per second of generate_batch, all rows together, at each batch size: prompts of one token, so
    that every step feeds one position of each row. One batch first warms up."""
    generate_batch(model, [[1]], 2, set(), temperature=0)
    speeds = {}
    for bsz in batch_sizes:
        t0 = time.perf_counter()
        generate_batch(model, [[1]] * bsz, new_tokens, set(), temperature=0)
        speeds[bsz] = bsz * new_tokens / (time.perf_counter() - t0)
    return speeds


def demo(fig_dir: Path) -> None:
    """No download: batching and int8 on a tiny random Llama 3, then speed against batch size on a wider one."""
    with tempfile.TemporaryDirectory() as tmp:
        weights = llama_fixtures.random_llama(llama_fixtures.TINY_PARAMS, std=0.15)  # float32, output tied
        path = llama_fixtures.write_meta_layout(Path(tmp) / "tiny", weights, llama_fixtures.TINY_PARAMS,
                                                llama_fixtures.BYTE_TOKENIZER)
        model = llama.load_llama(path, 64, log=lambda line: None)[0]
        print("a tiny random Llama 3 (dim 64, 2 layers, vocab 512, float32), its prompts in bytes:")
        demo_batching(model)
        errors = demo_int8(model, Path(tmp), path / "tokenizer.model")
    # Speed needs weights that stream from memory, as a real model's do: one block of Llama 3.2 1B's shape
    # (61M parameters) and an 8,192-token vocabulary, random bfloat16 weights.
    wide = {**llama_fixtures.LLAMA_32_PARAMS["1B"], "n_layers": 1, "vocab_size": 8192}
    model = llama_fixtures.random_tied_model(ModelArgs(**wide, max_seq_len=16), std=0.02, dtype=torch.bfloat16)
    batch_sizes = [1, 2, 4, 8, 16]
    speeds = {"bfloat16": tokens_per_s(model, batch_sizes)}
    speeds["int8"] = tokens_per_s(quantize_int8(model), batch_sizes)
    print(f"one block of Llama 3.2 1B's shape, {model_bytes(model) / 1e6:.0f} MB in int8: new tokens/s at batch "
          f"sizes {batch_sizes}:")
    for name, by_batch in speeds.items():
        print(f"  {name:8s} " + "  ".join(f"{v:7.1f}" for v in by_batch.values()))
    print(f"figure: {draw_serving(speeds, errors, fig_dir)}")
    print("caption: a batch reads the weights once for all its rows, and int8 reads half the bytes; each weight is "
          "off by at most half a step of its row.")


def main(argv: list[str] | None = None) -> None:
    args = serving.build_parser().parse_args(argv)
    with exit_on_error():
        if args.llama_dir is None:
            demo(args.fig_dir)
            return
        prompts = serving.read_prompts(args)
        if args.save_int8:
            serving.check_new_directory(args.save_int8)
        model, tokenizer = load(args, log=lambda line: print(line, file=sys.stderr))
        if args.save_int8:
            save_int8(model, llama_files.find_tokenizer(args.llama_dir), args.save_int8)
            print(f"wrote {args.save_int8}: {model_bytes(model) / 1e9:.2f} GB of int8 weights, scales and norms; "
                  f"load it with --llama-dir {args.save_int8}")
            return
        serving.serve(model, tokenizer, prompts, args, generate_batch)


if __name__ == "__main__":
    main()
