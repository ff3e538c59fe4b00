"""Chapter 7's command line, kept out of the chapter: its flags and help, the prompts read from a file, and the
answers printed in the prompts' order, each under its number, with the speed.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from plumbing.chat import add_generation_flags
from plumbing.validators import positive_int

DEFAULT_PROMPT = "The capital of France is"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Chapter 7: Llama 3 with many prompts per step, and int8 weights. "
                                "Without --llama-dir: a demo on tiny random models.")
    p.add_argument("--llama-dir", type=Path, default=None, metavar="DIR",
                   help="a Llama 3 checkpoint as chapter 5 loads it (Meta's or Hugging Face's layout), or an int8 "
                        "directory that --save-int8 wrote")
    prompts = p.add_mutually_exclusive_group()
    prompts.add_argument("--prompt", default=None, metavar="TEXT",
                         help=f"text to continue (default: '{DEFAULT_PROMPT}')")
    prompts.add_argument("--prompts", type=Path, default=None, metavar="FILE",
                         help="a text file of prompts, one per line (blank lines skipped); the answers are printed "
                              "in the file's order, each after its number and prompt")
    p.add_argument("--batch-size", type=positive_int, default=8, metavar="N",
                   help="prompts decoded together, one token of each per step (default: %(default)s)")
    p.add_argument("--int8", action="store_true",
                   help="quantize a bfloat16 checkpoint to int8 while loading; the memory then peaks at both copies "
                        "(an int8 directory from --save-int8 does not)")
    p.add_argument("--save-int8", type=Path, default=None, metavar="OUT",
                   help="quantize --llama-dir to int8 and write it to the new directory OUT, which --llama-dir OUT "
                        "then loads; generates nothing")
    add_generation_flags(p)
    p.add_argument("--fig-dir", type=Path, default=Path("out/figures"), metavar="DIR",
                   help="demo: where the figure goes (default: %(default)s)")
    return p


def read_prompts(args: argparse.Namespace) -> list[str]:
    """--prompt, or the non-blank lines of --prompts FILE. Raises OSError or ValueError for an unreadable or
    empty file."""
    if args.prompts is None:
        return [DEFAULT_PROMPT if args.prompt is None else args.prompt]
    try:
        lines = args.prompts.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"--prompts {args.prompts} is not UTF-8 text ({e.reason})") from e
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts {args.prompts} holds no prompt: write one per line")
    return prompts


def check_new_directory(path: Path) -> None:
    """--save-int8 OUT writes a new directory (or fills an empty one): it never mixes its files with others'."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"--save-int8 {path} exists and is not an empty directory; give a new one")


def serve(model, tokenizer, prompts: list[str], args: argparse.Namespace, generate_batch: Callable) -> None:
    """Answer every prompt, --batch-size at a time, printing each batch's answers in order: the prompt's number in
    brackets, the prompt, its continuation. Then the speed, on stderr. generate_batch: chapter 7's."""
    generator = torch.Generator().manual_seed(args.seed)
    n_new, t0 = 0, time.perf_counter()
    for start in range(0, len(prompts), args.batch_size):
        batch = prompts[start : start + args.batch_size]
        answers = generate_batch(model, [tokenizer.encode(text, bos=True) for text in batch], args.max_new_tokens,
                                 tokenizer.stop_ids, args.temperature, args.top_p, generator)
        for i, (text, answer) in enumerate(zip(batch, answers, strict=True), start=start + 1):
            print(f"[{i}] {text}{tokenizer.decode(answer)}", flush=True)
            n_new += len(answer)
    seconds = time.perf_counter() - t0
    print(f"{len(prompts)} prompt{'s' if len(prompts) > 1 else ''}, {n_new} new tokens in {seconds:.1f} s "
          f"({n_new / max(seconds, 1e-9):.1f} tokens/s, batches of up to {args.batch_size})", file=sys.stderr)
