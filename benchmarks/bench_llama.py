"""Loading and decoding a checkpoint shaped like Llama 3.2 1B, with random weights.

Writes a checkpoint in Meta's layout (params.json, consolidated.00.pth, tokenizer.model) whose tensors
have exactly Llama 3.2 1B's names, shapes and dtype (bfloat16; 1,235,814,400 parameters, 2.47 GB; no
output.weight, since the output is tied to the embedding), then, in a fresh Python process, so that
the peak memory is the loader's alone:

    load       load_llama (chapter 5): its time. The weights are memory-mapped, so they are read from disk
               as the first token uses them.
    memory     the peak resident memory (RSS) after decoding, when every weight has been read,
               against the weights' size: loading must not hold them twice, so the ratio stays close to 1.
    decode     greedy tokens after a short prompt, one forward pass each through the KV cache:
               time to the first token and tokens per second after it. Every token reads all the
               weights, so memory bandwidth sets the speed on a CPU.

The text is gibberish (random weights); the speed and memory are those of the real model.
tokenizer.model comes from the llama-models package (requirements-test.txt) unless --tokenizer is given.

Run:   python benchmarks/bench_llama.py                  # about 2.5 GB on disk and in memory, minutes
       python benchmarks/bench_llama.py --shape tiny     # a smoke test in seconds
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import main  # noqa: E402
from plumbing.validators import positive_int  # noqa: E402

llama = importlib.import_module("05_llama3_tokenizer_and_weights")

# params.json of Llama 3.2 1B, and a tiny model with the same vocabulary for a smoke test.
SHAPES = {
    "1b": {"dim": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256, "multiple_of": 256,
           "ffn_dim_multiplier": 1.5, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True},
    "tiny": {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 128256, "multiple_of": 16,
             "ffn_dim_multiplier": None, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True},
}
PROMPT = "The capital of France is"


def write_checkpoint(path: Path, params: dict, tokenizer: Path) -> int:
    """Random bfloat16 weights with Meta's names and shapes (the model's own state dict, output left out)."""
    with torch.device("meta"):
        shapes = main.Transformer(main.ModelArgs(**params)).state_dict()
    generator = torch.Generator().manual_seed(0)
    state_dict = {name: (torch.randn(t.shape, generator=generator) * 0.02).to(torch.bfloat16)
                  for name, t in shapes.items() if name != "output.weight"}
    torch.save(state_dict, path / "consolidated.00.pth")
    (path / "params.json").write_text(json.dumps(params))
    (path / "tokenizer.model").write_bytes(tokenizer.read_bytes())
    return sum(t.numel() for t in state_dict.values())


def peak_rss() -> int:
    """This process's peak resident memory in bytes (Linux: VmHWM, which, unlike getrusage's ru_maxrss,
    does not inherit the parent's peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status (this benchmark measures memory on Linux only)")


def measure(path: Path, new_tokens: int, dtype: str | None) -> dict:
    """Load and decode in this process; called in a fresh one."""
    rss_before = peak_rss()  # torch and main imported
    t0 = time.perf_counter()
    model, tokenizer = llama.load_llama(path, max_seq_len=256, dtype=getattr(torch, dtype) if dtype else None,
                                       device="cpu", log=lambda line: None)
    load_s = time.perf_counter() - t0
    rss_after_load = peak_rss()  # small with mmap: pages are read from disk when first used
    weights_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    tokens = tokenizer.encode(PROMPT, bos=True)
    t0 = time.perf_counter()
    stream = main.generate_tokens(model, tokens, new_tokens, stop_ids=set(), temperature=0)
    next(stream)
    first_token_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    rest = sum(1 for _ in stream)
    decode_s = time.perf_counter() - t1
    peak = peak_rss()  # every weight has now been read
    return {"params": sum(p.numel() for p in model.parameters()), "weights_gb": weights_bytes / 1e9,
            "dtype": str(model.tok_embeddings.weight.dtype).removeprefix("torch."), "load_s": load_s,
            "rss_gb_before_load": rss_before / 1e9, "peak_rss_gb_after_load": rss_after_load / 1e9,
            "peak_rss_gb": peak / 1e9, "peak_rss_over_weights": peak / weights_bytes,
            "model_rss_over_weights": (peak - rss_before) / weights_bytes,
            "prompt_tokens": len(tokens), "time_to_first_token_s": first_token_s, "decode_tokens": rest,
            "decode_tokens_per_s": rest / decode_s, "threads": torch.get_num_threads()}


def main_cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b", help="1b: Llama 3.2 1B (default); tiny: smoke")
    parser.add_argument("--new-tokens", type=positive_int, default=16,
                        help="greedy tokens to decode (default: %(default)s)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="the weights' dtype after loading (default: the checkpoint's, bfloat16)")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="Meta's tokenizer.model (default: the copy in the llama-models package)")
    parser.add_argument("--measure", type=Path, default=None, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.measure is not None:
        print(json.dumps(measure(args.measure, args.new_tokens, args.dtype)))
        return
    tokenizer = args.tokenizer or llama.packaged_llama3_tokenizer()
    if tokenizer is None or not tokenizer.is_file():
        sys.exit("error: no tokenizer.model: pip install -r requirements-test.txt, or pass --tokenizer PATH")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        n_params = write_checkpoint(Path(tmp), SHAPES[args.shape], tokenizer)
        print(f"wrote a random {args.shape} checkpoint: {n_params:,} parameters in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        command = [sys.executable, __file__, "--measure", tmp, "--new-tokens", str(args.new_tokens)]
        command += ["--dtype", args.dtype] if args.dtype else []
        child = subprocess.run(command, capture_output=True, text=True)
        if child.returncode != 0:
            sys.exit(f"error: the measuring process failed:\n{child.stderr}")
    result = {"shape": args.shape, **json.loads(child.stdout.strip().splitlines()[-1])}
    print(f"load {result['load_s']:.1f} s; peak RSS {result['peak_rss_gb']:.2f} GB = "
          f"{result['peak_rss_over_weights']:.2f}x the weights ({result['weights_gb']:.2f} GB {result['dtype']}; "
          f"{result['model_rss_over_weights']:.2f}x without the {result['rss_gb_before_load']:.2f} GB before loading); "
          f"first token {result['time_to_first_token_s']:.2f} s, then {result['decode_tokens_per_s']:.1f} tokens/s")
    print(json.dumps(result))


if __name__ == "__main__":
    main_cli()
