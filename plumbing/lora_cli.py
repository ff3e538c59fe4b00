"""Chapter 6's command line: every flag and its help, which flags go together, the checks of --targets and of an
adapter file, and how a problem ends (one `error:` line, or the exit status of a signal). Nothing here is LoRA's
maths."""

from __future__ import annotations

import argparse
import importlib
import os
from collections.abc import Iterable
from pathlib import Path

import torch

from plumbing.runtime import Stopped, wait_for_all_ranks
from plumbing.validators import (
    non_negative_int,
    positive_float,
    positive_int,
    resume_type,
    seed_type,
    temperature_type,
    top_p_type,
)

llama = importlib.import_module("05_llama3_tokenizer_and_weights")

ADAPTER_KEYS = {"lora", "lora_config", "train_config", "seq_len", "step"}  # what every adapter.pt holds


def comma_list(s: str) -> list[str]:
    """'wq, wv' -> ['wq', 'wv'] (add_lora checks the names)."""
    return [part.strip() for part in s.split(",") if part.strip()]


def build_parser(targets: list[str], rank: int, alpha: float, max_iters: int, llama_seq_len: int
                 ) -> argparse.ArgumentParser:
    """Chapter 6's flags; the arguments are the chapter's defaults, which --help shows."""
    p = argparse.ArgumentParser(
        description="Chapter 6: LoRA fine-tuning of Meta's Llama 3 (--llama-dir) or of a character model that "
                    "main.py trained (--ckpt). Without either, the chapter's demo runs (seconds, no download). "
                    "Under torchrun a fine-tune runs on N processes, each reading its own batches, the frozen base "
                    "sharded over them (FSDP2).")
    b = p.add_argument_group("the base model (frozen)")
    b.add_argument("--llama-dir", type=Path, default=None, metavar="DIR",
                   help="Meta's Llama 3 in Meta's layout (params.json, consolidated.00.pth, tokenizer.model) or "
                        "Hugging Face's (config.json, model*.safetensors), as chapter 5 loads it")
    b.add_argument("--ckpt", type=Path, default=None, metavar="PATH",
                   help="a character model that main.py trained, e.g. out/ckpt.pt")
    b.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="the frozen base's dtype (default: the checkpoint's: bfloat16 for Meta's files, float32 for "
                        "main.py's); LoRA's matrices are stored in float32 whatever this is")
    b.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto",
                   help="auto picks cuda, then mps, then cpu (default: %(default)s)")

    lo = p.add_argument_group("LoRA")
    lo.add_argument("--rank", type=int, default=rank,
                    help="r, the rank of each update B A: from 1 to the smaller side of the smallest adapted "
                         "matrix (default: %(default)s)")
    lo.add_argument("--alpha", type=positive_float, default=alpha,
                    help="the update is scaled by alpha / rank (default: %(default)s)")
    lo.add_argument("--targets", type=comma_list, default=list(targets), metavar="LIST",
                    help="comma-separated Meta names of the projections to adapt in every block: wq,wk,wv,wo "
                         "(attention), w1,w2,w3 (feed-forward) (default: all seven)")

    t = p.add_argument_group("fine-tuning (writes out-dir/adapter.pt, train_state.pt and metrics.json)")
    t.add_argument("--data", default=None, metavar="FILE",
                   help="UTF-8 text file to fine-tune on (default: data/tinyshakespeare.txt, downloaded if missing); "
                        "its first 90%% trains, its last 10%% gives the val loss before and after")
    t.add_argument("--out-dir", type=Path, default=Path("out/lora"), metavar="DIR",
                   help="where the adapter goes (default: %(default)s)")
    t.add_argument("--max-iters", type=positive_int, default=None,
                   help=f"optimizer steps (default: {max_iters}; with --resume: the run's own)")
    t.add_argument("--batch-size", type=positive_int, default=1,
                   help="windows per micro-batch, and per val batch (default: %(default)s)")
    t.add_argument("--grad-accum", type=positive_int, default=4,
                   help="micro-batches per step: the update of one batch of batch-size x grad-accum windows (x N "
                        "processes under torchrun), with the memory of one micro-batch (default: %(default)s)")
    t.add_argument("--seq-len", type=positive_int, default=None,
                   help=f"tokens per window, each opening with <|begin_of_text|>; with --sample the context "
                        f"(default: {llama_seq_len} for --llama-dir, the context of --ckpt's model)")
    t.add_argument("--learning-rate", type=positive_float, default=2e-4,
                   help="AdamW's peak learning rate, after a warmup of 5%% of the steps and before a cosine decay "
                        "to a tenth (default: %(default)s)")
    t.add_argument("--eval-iters", type=positive_int, default=40,
                   help="val batches for the loss before and after (the same batches both times; default: %(default)s)")
    t.add_argument("--seed", type=seed_type, default=1337,
                   help="seeds A's start, the batches and sampling (default: %(default)s)")
    t.add_argument("--resume", nargs="?", const=True, default=False, type=resume_type, metavar="auto",
                   help="continue the fine-tune saved in out-dir/train_state.pt (after Ctrl-C or SIGTERM) with its "
                        "own settings; only --max-iters may change. '--resume auto' resumes if that file exists and "
                        "starts fresh otherwise (for torchrun's restarts)")
    t.add_argument("--log-interval", type=positive_int, default=10,
                   help="when the output goes to a file: one line every N steps instead of a progress bar "
                        "(default: %(default)s)")

    u = p.add_argument_group("using the adapter in out-dir/adapter.pt (no training)")
    u.add_argument("--sample", action="store_true", help="generate from --prompt with the base plus the adapter")
    u.add_argument("--prompt", default="ROMEO:", help="text to continue (default: %(default)s)")
    u.add_argument("--max-new-tokens", type=non_negative_int, default=200,
                   help="tokens to generate (default: %(default)s)")
    u.add_argument("--temperature", type=temperature_type, default=0.8, help="0 is greedy (default: %(default)s)")
    u.add_argument("--top-p", type=top_p_type, default=0.9, help="nucleus sampling in (0, 1] (default: %(default)s)")
    u.add_argument("--export-peft", type=Path, default=None, metavar="DIR",
                   help="with --llama-dir: write the adapter as peft saves one (adapter_config.json, "
                        "adapter_model.safetensors) for transformers' LlamaForCausalLM of the same base")

    p.add_argument("--fig-dir", type=Path, default=Path("out/figures"), metavar="DIR",
                   help="the demo's figure goes here (default: %(default)s)")
    return p


def choose_mode(args: argparse.Namespace) -> str:
    """What the flags ask for: "demo" (no base model), "use" (--sample or --export-peft) or "finetune" (the only
    one that runs under torchrun).

    Raises:
        ValueError: flags that do not go together.
    """
    using = args.sample or args.export_peft is not None
    if args.llama_dir is None and args.ckpt is None:
        given = [flag for flag, on in (("--data", args.data), ("--resume", args.resume), ("--sample", args.sample),
                                       ("--export-peft", args.export_peft)) if on]
        if given:
            raise ValueError(f"{', '.join(given)} needs a base model: --llama-dir DIR or --ckpt PATH")
        mode = "demo"
    elif args.llama_dir is not None and args.ckpt is not None:
        raise ValueError("give one base model: --llama-dir or --ckpt, not both")
    elif using and args.resume:
        raise ValueError("--resume continues a fine-tune; --sample and --export-peft only use its adapter")
    elif args.export_peft is not None and args.llama_dir is None:
        raise ValueError("--export-peft needs --llama-dir: peft adapts transformers' LlamaForCausalLM, "
                         "which main.py's character model is not")
    else:
        mode = "use" if using else "finetune"
    if mode != "finetune" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("under torchrun chapter 6 only fine-tunes (--data); run the demo, --sample and "
                         "--export-peft in one process: python 06_lora_finetuning.py ...")
    return mode


def check_targets(targets: Iterable[str], known: list[str]) -> list[str]:
    """--targets in order, once each, every one among `known` (Meta's names of the projections).

    Raises:
        ValueError: no target, or an unknown one (Hugging Face's name of a projection is shown with Meta's).
    """
    targets = list(dict.fromkeys(targets))
    hf_names = {hf.split(".")[-1]: meta.split(".")[-1] for hf, meta in llama.HF_LAYER_NAMES.items()
                if meta.split(".")[-1] in known}  # "q_proj" -> "wq"
    for target in targets:
        if target not in known:
            hint = f"; {target} is Hugging Face's name for {hf_names[target]}" if target in hf_names else ""
            raise ValueError(f"unknown LoRA target {target!r}: choose among {','.join(known)} (Meta's names{hint})")
    if not targets:
        raise ValueError("no LoRA target: name at least one of " + ",".join(known))
    return targets


def check_adapter_fits(lora: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], source: str) -> None:
    """An adapter's tensors against a model's LoRA tensors: the same names and shapes.

    Raises:
        ValueError: the adapter was made for another base; `source` names the file.
    """
    missing, unexpected = sorted(expected.keys() - lora.keys()), sorted(lora.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(f"{source} does not fit this base model: " + "; ".join(
            f"{what} {', '.join(names[:2])}{' ...' if len(names) > 2 else ''}"
            for what, names in (("it lacks", missing), ("it has no place for", unexpected)) if names))
    for name, tensor in lora.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(f"{source} does not fit this base model: its {name} has shape {tuple(tensor.shape)}, "
                             f"this model needs {tuple(expected[name].shape)}")


def run_to_resume(args: argparse.Namespace) -> dict | None:
    """out-dir/train_state.pt when --resume asks for it (or --resume auto finds it), else None: a new fine-tune."""
    path = args.out_dir / "train_state.pt"
    return load_adapter(path) if args.resume is True or (args.resume == "auto" and path.exists()) else None


def load_adapter(path: Path) -> dict:
    """Read adapter.pt (or train_state.pt): tensors and plain data only (weights_only=True), like every checkpoint
    here.

    Raises:
        FileNotFoundError: no file. ValueError: not an adapter of chapter 6.
    """
    if not path.is_file():
        raise FileNotFoundError(f"no {path.name} in {path.parent}: fine-tune into --out-dir {path.parent} first")
    try:
        adapter = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad file; all mean the same here
        raise ValueError(f"{path} is not a readable adapter ({type(e).__name__}); fine-tune again") from e
    if not isinstance(adapter, dict) or ADAPTER_KEYS - adapter.keys():
        raise ValueError(f"{path} is not an adapter written by 06_lora_finetuning.py")
    return adapter


def interrupted(signum: int, step: int, args: argparse.Namespace, world_size: int, log) -> Stopped:
    """After the save that a signal asked for: say how to continue, wait for every rank (torchrun ends the others
    when one exits: not before rank 0 has said it), and return the Stopped exception to raise."""
    flags = " ".join(f"{flag} {value}" for flag, value in (
        ("--llama-dir", args.llama_dir), ("--ckpt", args.ckpt), ("--dtype", args.dtype), ("--data", args.data))
        if value)
    launcher = "python" if world_size == 1 else "torchrun [the same options]"
    log(f"\ninterrupted at step {step}: adapter saved to {args.out_dir / 'adapter.pt'}.\ncontinue with: "
        f"{launcher} 06_lora_finetuning.py {flags} --resume --out-dir {args.out_dir}")
    wait_for_all_ranks()
    return Stopped(signum)
