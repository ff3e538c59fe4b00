"""Decoding a checkpoint shaped like Llama 3.2 1B on the CPU: ours against transformers, and against the bound
that memory bandwidth sets.

Writes random weights with exactly Llama 3.2 1B's names, shapes and dtype, as Meta ships them (params.json,
consolidated.00.pth in bfloat16: 1,235,814,400 parameters, 2.47 GB, output.weight the same tensor as
tok_embeddings.weight), and the same weights as Hugging Face's conversion makes them (model.safetensors,
config.json). Then, each in a fresh Python process, taking turns so that whatever else loads the machine
hits both alike:

    ours        load_llama and Conversation.generate (chapter 5), greedy
    theirs      transformers' LlamaForCausalLM.from_pretrained and .generate, greedy
    bandwidth   how fast the machine reads memory: the sum of a 2 GB tensor, and bfloat16 F.linear of one
                vector by 16 matrices of 8192 x 2048 with each kernel for one token (oneDNN's, which
                transformers uses, and PyTorch's own, which ours uses); each the best of several

Every new token reads every weight once, so bandwidth / weight bytes is the most tokens per second any
implementation can decode; the bandwidth is the fastest of those reads. Both decode the same 6-token
prompt for --new-tokens tokens (stop tokens ignored) with --threads threads; tokens/s counts the tokens
after the first. Peak RSS is the process's high-water mark (Linux VmHWM), after decoding, when every
weight has been read. Each measure is reported as its best run and its median over --rounds: where other
jobs share the machine, the best run is the nearest to what a quiet machine gives.

The text is gibberish (random weights); the speed and memory are those of the real model.
tokenizer.model comes from the llama-models package (requirements-test.txt) unless --tokenizer is given.

Run:   python benchmarks/bench_llama.py                   # about 5 GB on disk, 3 GB of memory, minutes
       python benchmarks/bench_llama.py --shape tiny      # a smoke test in seconds
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from llama_1b import SHAPES, measure_in_child, peak_rss, random_checkpoint  # noqa: E402

from plumbing.validators import positive_int  # noqa: E402

llama = importlib.import_module("05_llama3_tokenizer_and_weights")

PROMPT = [128000, 791, 6864, 315, 9822, 374]  # <|begin_of_text|>The capital of France is


def timed_decode(tokens, n: int) -> dict:
    """Time to the first token, and tokens per second after it, of an iterator of n tokens."""
    t0 = time.perf_counter()
    times = [time.perf_counter() for _ in tokens]
    assert len(times) == n, f"decoded {len(times)} tokens, not {n}"
    return {"first_token_s": times[0] - t0, "tokens_per_s": (n - 1) / (times[-1] - times[0])}


def measure_ours(path: Path, n: int, dtype: torch.dtype) -> dict:
    rss_before = peak_rss()
    t0 = time.perf_counter()
    model, tokenizer = llama.load_llama(path / "meta", max_seq_len=len(PROMPT) + n, dtype=dtype, log=lambda line: None)
    load_s = time.perf_counter() - t0
    tokenizer.stop_ids = set()  # decode exactly n tokens
    conversation = llama.Conversation(model, tokenizer, temperature=0)
    result = timed_decode(conversation.generate(PROMPT, n), n)
    weights = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}
    return {**result, "load_s": load_s, "rss_before_gb": rss_before / 1e9, "peak_rss_gb": peak_rss() / 1e9,
            "params": sum(p.numel() for p in model.parameters()), "weights_gb": sum(weights.values()) / 1e9}


def measure_theirs(path: Path, n: int, dtype: torch.dtype) -> dict:
    from transformers import LlamaForCausalLM

    class Clock:  # transformers' streamer interface: put() receives the prompt, then each new token
        def __init__(self):
            self.times = []

        def put(self, value: torch.Tensor) -> None:
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    rss_before = peak_rss()
    t0 = time.perf_counter()
    model = LlamaForCausalLM.from_pretrained(path / "hf", dtype=dtype).eval()
    load_s = time.perf_counter() - t0
    clock = Clock()
    t0 = time.perf_counter()
    with torch.no_grad():
        model.generate(torch.tensor([PROMPT]), do_sample=False, max_new_tokens=n, min_new_tokens=n, streamer=clock,
                       pad_token_id=0)
    times = clock.times[1:]
    assert len(times) == n, f"decoded {len(times)} tokens, not {n}"
    return {"first_token_s": times[0] - t0, "tokens_per_s": (n - 1) / (times[-1] - times[0]), "load_s": load_s,
            "rss_before_gb": rss_before / 1e9, "peak_rss_gb": peak_rss() / 1e9}


def measure_bandwidth() -> dict:
    x = torch.ones(2**29, dtype=torch.float32)  # 2 GB: far beyond any cache
    read = min(_seconds(lambda: x.sum()) for _ in range(7))
    matrices = [torch.randn(8192, 2048).to(torch.bfloat16) for _ in range(16)]  # 537 MB, like 16 of 1B's w1
    v = torch.randn(1, 1, 2048).to(torch.bfloat16)
    linear = {}
    for kernel, enabled in (("onednn", True), ("pytorch", False)):  # the kernels of one-token steps
        torch.backends.mkldnn.enabled = enabled
        linear[kernel] = min(_seconds(lambda: [torch.nn.functional.linear(v, w) for w in matrices]) for _ in range(5))
    nbytes = sum(w.numel() * 2 for w in matrices)
    return {"sum_gb_per_s": x.numel() * 4 / read / 1e9,
            **{f"{kernel}_linear_gb_per_s": nbytes / t / 1e9 for kernel, t in linear.items()}}


def _seconds(f) -> float:
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def child(what: str, path: Path, args: argparse.Namespace) -> dict:
    """Run one measurement in a fresh Python process with --threads threads."""
    command = [__file__, "--measure", what, "--dir", str(path), "--new-tokens", str(args.new_tokens),
               "--threads", str(args.threads), "--dtype", args.dtype]
    return measure_in_child(command, what, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b", help="1b: Llama 3.2 1B (default); tiny: smoke")
    parser.add_argument("--new-tokens", type=positive_int, default=32, help="greedy tokens per run (default: 32)")
    parser.add_argument("--rounds", type=positive_int, default=3,
                        help="runs of each, taking turns (default: %(default)s)")
    parser.add_argument("--threads", type=positive_int, default=2, help="torch threads (default: %(default)s)")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                        help="the weights' dtype once loaded; the file is bfloat16 (default: %(default)s)")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="Meta's tokenizer.model (default: the copy in the llama-models package)")
    parser.add_argument("--dir", type=Path, default=None,
                        help="write the checkpoints here, or reuse those already there (default: a temporary folder)")
    parser.add_argument("--measure", choices=["ours", "theirs", "bandwidth"], help=argparse.SUPPRESS)  # a child
    args = parser.parse_args()
    if args.measure:
        torch.set_num_threads(args.threads)
        dtype = getattr(torch, args.dtype)
        measure = {"ours": lambda: measure_ours(args.dir, args.new_tokens, dtype),
                   "theirs": lambda: measure_theirs(args.dir, args.new_tokens, dtype), "bandwidth": measure_bandwidth}
        print(json.dumps(measure[args.measure]()))
        return

    with tempfile.TemporaryDirectory() as tmp:
        path = args.dir or Path(tmp)
        random_checkpoint(path, args.shape, args.tokenizer)
        runs = {"ours": [], "theirs": [], "bandwidth": []}
        for i in range(args.rounds):
            for what in ("ours", "theirs", "bandwidth"):
                runs[what].append(child(what, path, args))
            last = {what: done[-1] for what, done in runs.items()}
            print(f"round {i + 1}: ours {last['ours']['tokens_per_s']:.2f} tokens/s, transformers "
                  f"{last['theirs']['tokens_per_s']:.2f}, sum of 2 GB {last['bandwidth']['sum_gb_per_s']:.1f} GB/s",
                  flush=True)
    report(runs, args)


def report(runs: dict[str, list[dict]], args: argparse.Namespace) -> None:
    """Each measure's best run and median. On a machine that others share, the best run is the nearest to
    what a quiet machine gives."""
    def stat(what: str, key: str, best=max) -> dict:
        values = [r[key] for r in runs[what]]
        return {"best": best(values), "median": statistics.median(values), "runs": values}

    names = {"ours": "ours", "theirs": "transformers"}
    weights_gb = runs["ours"][0]["weights_gb"]
    reads = {key.removesuffix("_gb_per_s"): stat("bandwidth", key)["best"] for key in runs["bandwidth"][0]}
    bandwidth = max(reads.values())  # every one of them reads all its bytes: the fastest is nearest the truth
    result = {
        "shape": args.shape, "dtype": args.dtype, "threads": args.threads, "new_tokens": args.new_tokens,
        "rounds": args.rounds, "cpu": cpu_name(), "params": runs["ours"][0]["params"], "weights_gb": weights_gb,
        "tokens_per_s": {names[w]: stat(w, "tokens_per_s") for w in names},
        "read_gb_per_s": reads, "bandwidth_gb_per_s": bandwidth, "bound_tokens_per_s": bandwidth / weights_gb,
        "first_token_s": {names[w]: stat(w, "first_token_s", min)["best"] for w in names},
        "load_s": {names[w]: stat(w, "load_s", min)["best"] for w in names},
        "peak_rss_gb": {names[w]: stat(w, "peak_rss_gb")["best"] for w in names},
        "rss_before_load_gb": runs["ours"][0]["rss_before_gb"],
    }
    ours_best = result["tokens_per_s"]["ours"]["best"]
    print(f"{result['params']:,} parameters, {weights_gb:.2f} GB in {args.dtype}; {args.threads} threads on "
          f"{result['cpu']}")
    for name, speed in result["tokens_per_s"].items():
        print(f"  {name:12s} {speed['best']:5.2f} tokens/s at best, {speed['median']:5.2f} median "
              f"(runs: {', '.join(f'{v:.2f}' for v in speed['runs'])})")
    print(f"  bound        {result['bound_tokens_per_s']:5.2f} tokens/s = {bandwidth:.1f} GB/s / {weights_gb:.2f} GB "
          f"per token; ours at best {ours_best / result['bound_tokens_per_s']:.0%} of it")
    print(f"  reads (GB/s, best): sum of 2 GB {reads['sum']:.1f}; bfloat16 F.linear of a vector: PyTorch's kernel "
          f"{reads['pytorch_linear']:.1f} (ours), oneDNN's {reads['onednn_linear']:.1f} (transformers)")
    rss = result["peak_rss_gb"]
    print(f"  peak RSS: ours {rss['ours']:.2f} GB = {rss['ours'] / weights_gb:.2f}x the weights "
          f"({result['rss_before_load_gb']:.2f} GB before loading), transformers {rss['transformers']:.2f} GB")
    print(json.dumps(result))


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    main()
