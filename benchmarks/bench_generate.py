"""Generation speed: the KV cache against recomputing the whole context for every new token.

Both ways continue the same 64-character prompt by 500 characters, greedily (temperature 0:
always the most likely character), with the same weights:

    cache      main.generate: the prompt runs once and fills the KV cache, then each new token
               is one forward pass of a single position that reads the cached keys and values.
    no cache   each new token runs the model over the whole context again (start_pos=None, no
               cache involved) and keeps only the last position's logits.

Greedy decoding has no randomness, so the two texts must be equal; the script checks it and exits
with an error if they differ. It also prints the time to the first token (the prompt's forward
pass, what a reader waits for before text starts to appear).

The model is out/ckpt.pt when it exists (after `python main.py`), else the default model with its
random initial weights (the speed is the same; the text is gibberish). The script says which.

The long-context case shows how the cache's advantage grows with the context: the GPU preset's
architecture (10.7M parameters), untrained, on the CPU, with the context filled to 1,024 positions:
a prompt of 1,024 - 32 characters, then 32 new tokens, cached against recomputed, greedy, equal text.
Recomputing runs the whole ~1,000-token context for every new token; the cache runs one position.

Run:   python benchmarks/bench_generate.py                 # about a minute on 2 CPU cores
       python benchmarks/bench_generate.py --ckpt none     # always the random-weight model
The last line printed is one JSON object, so figures can be compared over time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root, where main.py lives
import main  # noqa: E402

# 64 characters of Shakespeare; every one is in Tiny Shakespeare's vocabulary.
PROMPT = "ROMEO:\nBut soft, what light through yonder window breaks?\nIt is "
assert len(PROMPT) == 64
NEW_TOKENS = 500
LONG_SEQ_LEN, LONG_NEW_TOKENS = 1024, 32


def load_model(ckpt: str) -> tuple[main.Transformer, main.inputs.CharTokenizer, str]:
    """The trained checkpoint if there is one, else the default model with random weights."""
    path = Path(ckpt)
    if ckpt != "none" and path.is_file():
        checkpoint = main.load_checkpoint(path)
        tokenizer = main.inputs.CharTokenizer.from_dict(checkpoint["tokenizer"])
        model = main.model_from_checkpoint(checkpoint)
        return model, tokenizer, f"trained weights from {path} (step {checkpoint['step']})"
    # The 65 characters of Tiny Shakespeare, so we need neither the corpus nor a download.
    chars = sorted(set("\n !$&',-.3:;?" + "ABCDEFGHIJKLMNOPQRSTUVWXYZ" + "abcdefghijklmnopqrstuvwxyz"))
    tokenizer = main.inputs.CharTokenizer(chars)
    torch.manual_seed(1337)
    model = main.Transformer(main.ModelArgs(vocab_size=tokenizer.vocab_size))
    return model, tokenizer, "the default model with random weights (no checkpoint found)"


@torch.no_grad()
def generate_no_cache(model: main.Transformer, tokens: list[int], max_new_tokens: int, eos_id: int) -> list[int]:
    """Greedy decoding by full recompute: every step runs the model over the whole context.

    The context is the same window main.generate keeps in its cache, so the logits (and the text)
    match: `tokens` opens with <|begin_of_text|>, which stays first; the window after it grows one
    token per step, and when BOS and the window would pass max_seq_len, the window restarts from the
    newest max_seq_len // 2 tokens, the way main.generate refills its cache.
    """
    max_seq_len = model.params.max_seq_len
    bos, everything = tokens[0], list(tokens[1:])  # BOS; prompt + new tokens
    start = 0  # the context is BOS + everything[start:]
    new_tokens: list[int] = []
    while len(new_tokens) < max_new_tokens:
        context = torch.tensor([[bos, *everything[start:]]])  # (1, context_len)
        logits, _ = model(context)  # start_pos=None: no KV cache, all positions recomputed
        token = int(torch.argmax(logits[0, -1]))
        if token == eos_id:
            break
        new_tokens.append(token)
        everything.append(token)
        if 1 + len(everything) - start > max_seq_len:  # main.generate's cache is full: slide the window
            start = len(everything) - max_seq_len // 2
    return new_tokens


def best_time(fn, repeats: int) -> tuple[float, object]:
    """The fastest of `repeats` runs (least disturbed by other programs), and fn's result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def long_context(tokenizer: main.inputs.CharTokenizer) -> dict:
    """The GPU preset's architecture with random weights at context LONG_SEQ_LEN: tokens/s with and without
    the cache, for the same greedy text (exits with an error if the texts differ). One run of each: the
    recompute alone takes tens of seconds, long enough to average out short disturbances. Both times
    include the prompt's forward pass, as in the short case."""
    gpu_model, _ = main.PRESETS["gpu"]  # the GPU preset's differences from ModelArgs' defaults
    torch.manual_seed(1337)
    model = main.Transformer(main.ModelArgs(**{**gpu_model, "vocab_size": tokenizer.vocab_size,
                                               "max_seq_len": LONG_SEQ_LEN, "max_batch_size": 1})).eval()
    prompt = (PROMPT * (LONG_SEQ_LEN // len(PROMPT) + 1))[: LONG_SEQ_LEN - LONG_NEW_TOKENS]
    cache_s, cached_text = best_time(
        lambda: main.generate(model, tokenizer, prompt, LONG_NEW_TOKENS, temperature=0.0), 1)
    nocache_s, nocache_ids = best_time(
        lambda: generate_no_cache(model, tokenizer.encode(prompt, bos=True), LONG_NEW_TOKENS, tokenizer.eos_id), 1)
    if cached_text != tokenizer.decode(nocache_ids):
        sys.exit("error: at long context, the cached and recomputed texts differ")
    n = len(cached_text)
    print(f"long context ({LONG_SEQ_LEN} positions, GPU preset architecture, random weights): "
          f"{n / cache_s:.0f} tokens/s with the cache, {n / nocache_s:.1f} by recompute: "
          f"{nocache_s / cache_s:.1f}x (same text)")
    return {"seq_len": LONG_SEQ_LEN, "cache_tokens_per_s": round(n / cache_s, 1),
            "nocache_tokens_per_s": round(n / nocache_s, 2), "speedup": round(nocache_s / cache_s, 1), "new_tokens": n}


def run() -> None:
    parser = argparse.ArgumentParser(description="Tokens/s of generation with and without the KV cache.")
    parser.add_argument("--ckpt", default="out/ckpt.pt", help="checkpoint to load, or 'none' for random weights")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each way; the fastest counts")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: PyTorch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer, source = load_model(args.ckpt)
    model.eval()
    prompt_ids = tokenizer.encode(PROMPT, bos=True)
    print(f"model: {source}; max_seq_len {model.params.max_seq_len}, {torch.get_num_threads()} threads")
    print(f"prompt: {len(PROMPT)} characters, then {NEW_TOKENS} new tokens, greedy")

    # Time to first token: the prompt's forward pass (filling the cache) and the argmax.
    first_s, _ = best_time(lambda: main.generate(model, tokenizer, PROMPT, 1, temperature=0.0), 5)

    cache_s, cached_text = best_time(
        lambda: main.generate(model, tokenizer, PROMPT, NEW_TOKENS, temperature=0.0), args.repeats)
    nocache_s, nocache_ids = best_time(
        lambda: generate_no_cache(model, prompt_ids, NEW_TOKENS, tokenizer.eos_id), args.repeats)
    nocache_text = tokenizer.decode(nocache_ids)

    n_cached, n_nocache = len(cached_text), len(nocache_text)
    print(f"time to first token:  {1000 * first_s:7.1f} ms")
    print(f"with KV cache:        {n_cached / cache_s:7.0f} tokens/s ({cache_s:.2f} s for {n_cached} tokens)")
    print(f"full recompute:       {n_nocache / nocache_s:7.0f} tokens/s ({nocache_s:.2f} s for {n_nocache} tokens)")
    print(f"speed-up of the cache: {nocache_s / cache_s:.1f}x (same text, so the same number of tokens)")
    print(f"--- text (both ways) ---\n{PROMPT}{cached_text}\n---")
    if cached_text != nocache_text:
        common = next((i for i, (a, b) in enumerate(zip(cached_text, nocache_text, strict=False)) if a != b),
                      min(n_cached, n_nocache))
        sys.exit(f"error: the cached and recomputed texts differ from character {common}")
    print("the cached and recomputed texts are equal")
    long = long_context(tokenizer)
    print(json.dumps({
        "cache_tokens_per_s": round(n_cached / cache_s, 1), "nocache_tokens_per_s": round(n_nocache / nocache_s, 1),
        "first_token_ms": round(1000 * first_s, 2), "speedup": round(nocache_s / cache_s, 2),
        "new_tokens": n_cached, "prompt_chars": len(PROMPT), "threads": torch.get_num_threads(),
        "weights": "trained" if source.startswith("trained") else "random", "long_context": long,
    }))


if __name__ == "__main__":
    run()
