"""Serving a checkpoint shaped like Llama 3.2 1B on the CPU (chapter 7): int8 weights against bfloat16, one prompt
and batches of prompts, side by side in one run.

Writes random bfloat16 weights with exactly Llama 3.2 1B's names and shapes (benchmarks/llama_1b.py, Meta's
layout), quantizes them once with the chapter's own command line (`--save-int8`, which also gives the memory of
quantizing while loading), then measures, each in a fresh Python process, taking turns so that whatever else loads
the machine hits all alike:

    decode      generate_batch on B copies of a 6-token prompt, greedy, --new-tokens steps, for bfloat16 (chapter
                5's load_llama) and int8 (the saved directory) at B = 1, 4 and 16: new tokens per second of all
                rows together, counted after the first step; the process's peak RSS
    command     `python 07_batching_and_int8.py --llama-dir DIR --prompt ...` on the bfloat16 directory, on the int8
                directory, and with --int8 on the bfloat16 one: the peak RSS of the command a reader runs
    bandwidth   how fast the machine reads memory (bench_llama.py's reads: the sum of 2 GB, bfloat16 F.linear)
    agreement   the logits of 256 positions of text (Tiny Shakespeare if data/ has it, else this docstring),
                bfloat16 against int8: cosine similarity per position and the share with the same top token

Every new token reads every weight once, so bandwidth / weight bytes bounds the tokens per second at batch 1:
2.47 GB per token in bfloat16, 1.24 GB in int8. A batch reads the weights once for all its rows, until the
arithmetic, not the memory, is what takes the time: how soon depends on the CPU's instructions for bfloat16
(AVX-512 BF16, AMX) and int8, so the benchmark prints the CPU's flags. Each measure is reported as its best run
and its median over --rounds. With --char-ckpt, it also measures main.py's character model, quantized: its loss
over the whole val split (main.evaluate_split) against float32.

The text is gibberish (random weights); the speed and memory are those of the real model.
tokenizer.model comes from the llama-models package (requirements-test.txt) unless --tokenizer is given.

Run:   python benchmarks/bench_serving.py                    # about 8 GB on disk, 3 GB of memory, minutes
       python benchmarks/bench_serving.py --shape tiny       # a smoke test in seconds
       python benchmarks/bench_serving.py --char-ckpt out/ckpt.pt --data data/tinyshakespeare.txt
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
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench_llama import cpu_name, measure_bandwidth  # noqa: E402
from llama_1b import SHAPES, measure_in_child, peak_rss, random_checkpoint  # noqa: E402

import main  # noqa: E402
from plumbing.validators import positive_int  # noqa: E402

llama = importlib.import_module("05_llama3_tokenizer_and_weights")
serving = importlib.import_module("07_batching_and_int8")

PROMPT = [128000, 791, 6864, 315, 9822, 374]  # <|begin_of_text|>The capital of France is
BATCH_SIZES = [1, 4, 16]
CPU_FLAGS = ["avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_bf16", "amx_int8"]


def load(path: Path, weights: str, max_seq_len: int) -> main.Transformer:
    """The bfloat16 checkpoint (path/meta) or its int8 directory (path/int8)."""
    if weights == "int8":
        return serving.load_int8(path / "int8", max_seq_len, log=lambda line: None)[0]
    return llama.load_llama(path / "meta", max_seq_len, torch.bfloat16, log=lambda line: None)[0]


def measure_decode(path: Path, weights: str, batch: int, n: int) -> dict:
    t0 = time.perf_counter()
    model = load(path, weights, len(PROMPT) + n)
    load_s = time.perf_counter() - t0
    steps = []
    model.register_forward_hook(lambda *args: steps.append(time.perf_counter()))
    serving.generate_batch(model, [PROMPT] * batch, n, set(), temperature=0)
    assert len(steps) == n, f"{len(steps)} steps, not {n}"
    return {"tokens_per_s": batch * (n - 1) / (steps[-1] - steps[0]), "first_step_s": steps[0] - t0 - load_s,
            "load_s": load_s, "peak_rss_gb": peak_rss() / 1e9, "weights_gb": serving.model_bytes(model) / 1e9}


def measure_command(path: Path, weights: str, n: int) -> dict:
    """The chapter's command line, in this process, on the bfloat16 directory, the int8 one, or --int8."""
    directory = path / ("int8" if weights == "int8" else "meta")
    flags = ["--llama-dir", str(directory), "--prompt", "The capital of France is", "--max-new-tokens", str(n),
             "--seq-len", "256", *(["--int8"] if weights == "int8-on-the-fly" else [])]
    serving.main(flags)
    return {"peak_rss_gb": peak_rss() / 1e9}


def measure_save(path: Path) -> dict:
    t0 = time.perf_counter()
    serving.main(["--llama-dir", str(path / "meta"), "--save-int8", str(path / "int8")])
    return {"peak_rss_gb": peak_rss() / 1e9, "seconds": time.perf_counter() - t0}


def text_tokens(tokenizer: llama.Llama3Tokenizer, n: int) -> list[int]:
    text_file = ROOT / "data" / "tinyshakespeare.txt"
    text = text_file.read_text(encoding="utf-8")[:20_000] if text_file.is_file() else __doc__ * 4
    return tokenizer.encode(text, bos=True)[:n]


def measure_agreement(path: Path, n: int) -> dict:
    model, tokenizer = llama.load_llama(path / "meta", n, torch.bfloat16, log=lambda line: None)
    tokens = torch.tensor([text_tokens(tokenizer, n)])
    with torch.no_grad():
        bf16 = model(tokens)[0][0]  # (n, vocab_size) float32
        int8 = serving.quantize_int8(model)(tokens)[0][0]
    cosine = torch.nn.functional.cosine_similarity(bf16, int8, dim=-1)  # (n,)
    return {"positions": len(cosine), "cosine_mean": cosine.mean().item(), "cosine_min": cosine.min().item(),
            "top1_agreement": (bf16.argmax(-1) == int8.argmax(-1)).float().mean().item()}


def measure_char_model(ckpt: Path, data: Path | None) -> dict:
    """main.py's character model over its whole val split, float32 against int8 (computed in float32), and the
    logits of its first 32 val windows."""
    checkpoint = main.load_checkpoint(ckpt)
    tokenizer = main.inputs.CharTokenizer.from_dict(checkpoint["tokenizer"])
    text = main.inputs.load_text(data)
    val = main.inputs.train_val_split(np.array(tokenizer.encode(text), dtype=np.int64))[1]
    model = main.model_from_checkpoint(checkpoint)
    seq_len = model.params.max_seq_len
    windows = main.inputs.inputs_for(torch.from_numpy(val[: 32 * seq_len]).view(32, seq_len), tokenizer.bos_id)

    def val_loss_and_logits() -> tuple[float, torch.Tensor]:
        with torch.no_grad():
            logits = model(windows)[0]  # (32, seq_len, vocab_size)
        return main.evaluate_split(model, val, seq_len, tokenizer.bos_id, 32, "cpu", nullcontext()), logits

    before, float32 = val_loss_and_logits()
    serving.quantize_int8(model)
    t0 = time.perf_counter()
    after, int8 = val_loss_and_logits()
    cosine = torch.nn.functional.cosine_similarity(float32, int8, dim=-1)
    return {"ckpt": str(ckpt), "val_loss_float32": before, "val_loss_int8": after, "change": after - before,
            "int8_eval_s": time.perf_counter() - t0, "cosine_mean": cosine.mean().item(),
            "top1_agreement": (float32.argmax(-1) == int8.argmax(-1)).float().mean().item()}


def child(what: str, path: Path, args: argparse.Namespace, weights: str = "", batch: int = 1) -> dict:
    """One measurement in a fresh Python process with --threads threads."""
    command = [__file__, "--measure", what, "--dir", str(path), "--new-tokens", str(args.new_tokens),
               "--threads", str(args.threads), "--weights", weights or "bf16", "--batch", str(batch)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    return measure_in_child(command, f"{what} {weights} {batch}", env=env)


def cpu_flags() -> list[str]:
    flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), [])
    return [flag for flag in CPU_FLAGS if flag in flags]


def main_cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b", help="1b: Llama 3.2 1B (default); tiny: smoke")
    parser.add_argument("--new-tokens", type=positive_int, default=16, help="decode steps per run (default: 16)")
    parser.add_argument("--rounds", type=positive_int, default=3, help="runs of each, taking turns (default: 3)")
    parser.add_argument("--threads", type=positive_int, default=2, help="torch threads (default: %(default)s)")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="Meta's tokenizer.model (default: the copy in the llama-models package)")
    parser.add_argument("--dir", type=Path, default=None,
                        help="write the checkpoints here, or reuse those already there (default: a temporary folder)")
    parser.add_argument("--char-ckpt", type=Path, default=None,
                        help="also main.py's character model (its ckpt.pt), quantized: its val loss against float32")
    parser.add_argument("--data", type=Path, default=None,
                        help="with --char-ckpt: the corpus it was trained on (default: data/tinyshakespeare.txt)")
    parser.add_argument("--measure", choices=["decode", "command", "save", "agreement", "bandwidth"],
                        help=argparse.SUPPRESS)  # a child
    parser.add_argument("--weights", choices=["bf16", "int8", "int8-on-the-fly"], help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=positive_int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        torch.set_num_threads(args.threads)
        measure = {"decode": lambda: measure_decode(args.dir, args.weights, args.batch, args.new_tokens),
                   "command": lambda: measure_command(args.dir, args.weights, args.new_tokens),
                   "save": lambda: measure_save(args.dir), "agreement": lambda: measure_agreement(args.dir, 256),
                   "bandwidth": measure_bandwidth}
        print(json.dumps(measure[args.measure]()))
        return

    with tempfile.TemporaryDirectory() as tmp:
        path = args.dir or Path(tmp)
        random_checkpoint(path, args.shape, args.tokenizer)
        save = child("save", path, args) if not (path / "int8" / serving.INT8_WEIGHTS).is_file() else None
        runs: dict[str, list[dict]] = {}
        for i in range(args.rounds):
            for weights in ("bf16", "int8"):
                for batch in BATCH_SIZES:
                    runs.setdefault(f"decode {weights} {batch}", []).append(child("decode", path, args, weights, batch))
            for weights in ("bf16", "int8", "int8-on-the-fly"):
                runs.setdefault(f"command {weights}", []).append(child("command", path, args, weights))
            runs.setdefault("bandwidth", []).append(child("bandwidth", path, args))
            print(f"round {i + 1}: " + ", ".join(f"{w} batch {b} {runs[f'decode {w} {b}'][-1]['tokens_per_s']:.2f}"
                                                 for w in ("bf16", "int8") for b in BATCH_SIZES) + " tokens/s",
                  flush=True)
        agreement = child("agreement", path, args)
    char = measure_char_model(args.char_ckpt, args.data) if args.char_ckpt else None
    report(runs, save, agreement, char, args)


def report(runs: dict[str, list[dict]], save: dict | None, agreement: dict, char: dict | None,
           args: argparse.Namespace) -> None:
    """Each measure's best run and median, the bounds, and the issue's targets beside what was measured."""
    def best(key: str, field: str = "tokens_per_s", pick=max) -> float:
        return pick(r[field] for r in runs[key])

    def median(key: str, field: str = "tokens_per_s") -> float:
        return statistics.median(r[field] for r in runs[key])

    reads = {key.removesuffix("_gb_per_s"): max(r[key] for r in runs["bandwidth"]) for key in runs["bandwidth"][0]}
    bandwidth = max(reads.values())
    weights_gb = {w: runs[f"decode {w} 1"][0]["weights_gb"] for w in ("bf16", "int8")}
    decode = {w: {b: {"best": best(f"decode {w} {b}"), "median": median(f"decode {w} {b}"),
                      "peak_rss_gb": best(f"decode {w} {b}", "peak_rss_gb")} for b in BATCH_SIZES}
              for w in ("bf16", "int8")}
    command_rss = {w: best(f"command {w}", "peak_rss_gb", min) for w in ("bf16", "int8", "int8-on-the-fly")}
    result = {
        "shape": args.shape, "threads": args.threads, "new_tokens": args.new_tokens, "rounds": args.rounds,
        "cpu": cpu_name(), "cpu_flags": cpu_flags(), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "weights_gb": weights_gb, "read_gb_per_s": reads, "bandwidth_gb_per_s": bandwidth,
        "bound_tokens_per_s": {w: bandwidth / gb for w, gb in weights_gb.items()}, "decode_tokens_per_s": decode,
        "command_peak_rss_gb": command_rss, "save_int8_peak_rss_gb": save and save["peak_rss_gb"],
        "agreement": agreement, "char_model": char,
        "targets": {
            "int8_over_bf16_batch_1": decode["int8"][1]["best"] / decode["bf16"][1]["best"],  # >= 1.5
            "int8_dir_over_bf16_dir_command_rss": command_rss["int8"] / command_rss["bf16"],  # <= 0.6
            "bf16_batch_16_over_batch_1": decode["bf16"][16]["best"] / decode["bf16"][1]["best"],  # >= 5
            "int8_batch_16_over_batch_1": decode["int8"][16]["best"] / decode["int8"][1]["best"],
            "cosine_mean": agreement["cosine_mean"],  # >= 0.999
            "char_val_loss_change": char and char["change"],  # |.| <= 0.01
        },
    }
    print(f"{args.shape}: {weights_gb['bf16']:.2f} GB in bfloat16, {weights_gb['int8']:.2f} GB in int8; "
          f"{args.threads} threads on {result['cpu']} ({result['torch_cpu_capability']}; flags: "
          f"{' '.join(result['cpu_flags'])})")
    for w, name in (("bf16", "bfloat16"), ("int8", "int8")):
        bound = result["bound_tokens_per_s"][w]
        print(f"  {name:8s} tokens/s, all rows (best, median): " + "; ".join(
            f"batch {b} {d['best']:.2f}, {d['median']:.2f}" for b, d in decode[w].items())
            + f". Batch 1 is {decode[w][1]['best'] / bound:.0%} of its bound {bound:.2f} "
              f"({bandwidth:.1f} GB/s / {weights_gb[w]:.2f} GB)")
    targets = result["targets"]
    print(f"  int8 / bfloat16 at batch 1: {targets['int8_over_bf16_batch_1']:.2f}x (target >= 1.5); batch 16 / "
          f"batch 1: bfloat16 {targets['bf16_batch_16_over_batch_1']:.2f}x (target >= 5), int8 "
          f"{targets['int8_batch_16_over_batch_1']:.2f}x")
    print(f"  peak RSS of the command: bfloat16 directory {command_rss['bf16']:.2f} GB, int8 directory "
          f"{command_rss['int8']:.2f} GB ({targets['int8_dir_over_bf16_dir_command_rss']:.2f}x, target <= 0.6), "
          f"--int8 on the fly {command_rss['int8-on-the-fly']:.2f} GB"
          + (f"; --save-int8 {save['peak_rss_gb']:.2f} GB, {save['seconds']:.0f} s" if save else ""))
    print(f"  logits over {agreement['positions']} positions, int8 against bfloat16: cosine "
          f"{agreement['cosine_mean']:.5f} (min {agreement['cosine_min']:.5f}; target >= 0.999), same top token "
          f"{agreement['top1_agreement']:.1%}")
    if char:
        print(f"  main.py's model, whole val split: float32 {char['val_loss_float32']:.4f}, int8 "
              f"{char['val_loss_int8']:.4f} ({char['change']:+.4f} nats; target |change| <= 0.01); logits of 32 val "
              f"windows: cosine {char['cosine_mean']:.5f}, same top character {char['top1_agreement']:.1%}")
    print(json.dumps(result))


if __name__ == "__main__":
    main_cli()
