"""main.py's command line: every flag, its checks and its help text, and how the flags go on top of a preset or
a resumed checkpoint. Nothing here is about LLaMA."""

from __future__ import annotations

import argparse
from pathlib import Path

from plumbing.validators import (
    context_length,
    dropout_type,
    non_negative_int,
    positive_float,
    positive_int,
    resume_type,
    seed_type,
    temperature_type,
    top_p_type,
)

# The flags that override a ModelArgs field (flag name: field name) or a TrainConfig field (same names).
MODEL_FLAGS = {"dim": "dim", "n_layers": "n_layers", "n_heads": "n_heads", "n_kv_heads": "n_kv_heads",
               "seq_len": "max_seq_len", "dropout": "dropout"}
TRAIN_FLAGS = ("batch_size", "max_iters", "learning_rate", "min_lr", "warmup_iters", "lr_decay_iters", "grad_accum",
               "eval_interval", "eval_iters", "seed", "optimizer", "muon_lr", "schedule", "cooldown_frac")


def build_parser(presets: dict, default_prompt: str) -> argparse.ArgumentParser:
    """main.py's flags. presets: {name: (ModelArgs, TrainConfig)}, whose values --help shows as defaults."""

    def preset_defaults(field: str) -> str:
        """What each preset uses for a ModelArgs or TrainConfig field: ' (cpu: 64, gpu: 384)' for dim."""
        values = [f"{name}: {getattr(m if hasattr(m, field) else t, field)}" for name, (m, t) in presets.items()]
        return f" ({', '.join(values)})"

    p = argparse.ArgumentParser(
        description="Train a LLaMA 3 model on Tiny Shakespeare (character level) and sample from it.")
    io = p.add_argument_group("data, output and hardware")
    io.add_argument("--data", default=None,
                    help="UTF-8 text file to train on (default: data/tinyshakespeare.txt, downloaded if missing)")
    io.add_argument("--out-dir", type=Path, default=Path("out"),
                    help="where ckpt.pt, best.pt, loss.csv, loss.png and metrics.json go (default: %(default)s)")
    io.add_argument("--preset", choices=sorted(presets), default="cpu",
                    help="model and training sizes: 'cpu' learns in minutes on a laptop; "
                         "'gpu' is nanoGPT's 10.7M-parameter Shakespeare size (default: %(default)s)")
    io.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto",
                    help="auto picks cuda, then mps, then cpu (default: %(default)s)")
    io.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                    help="compute dtype (bfloat16 = autocast, float32 master weights); "
                         "default: bfloat16 on a CUDA GPU that supports it, else float32")
    io.add_argument("--compile", action="store_true", help="torch.compile the model (slow start, faster steps)")
    io.add_argument("--resume", nargs="?", const=True, default=False, type=resume_type, metavar="auto",
                    help="continue training from out-dir/ckpt.pt (its model and settings, unless flags override); "
                         "'--resume auto' resumes if that file exists and starts fresh otherwise (for restarts)")
    io.add_argument("--sample", action="store_true", help="load out-dir/ckpt.pt and only generate; no training")
    io.add_argument("--best", action="store_true",
                    help="with --sample: load out-dir/best.pt, the weights of the evaluation with the lowest val "
                         "loss (training writes it beside ckpt.pt, the last weights)")
    io.add_argument("--log-interval", type=positive_int, default=50,
                    help="when the output goes to a file: one line every N steps instead of a progress bar "
                         "(default: %(default)s)")

    m = p.add_argument_group("model (defaults come from --preset)")
    m.add_argument("--dim", type=positive_int, help="embedding width" + preset_defaults("dim"))
    m.add_argument("--n-layers", type=positive_int, help="transformer blocks" + preset_defaults("n_layers"))
    m.add_argument("--n-heads", type=positive_int, help="query heads" + preset_defaults("n_heads"))
    m.add_argument("--n-kv-heads", type=positive_int,
                   help="key/value heads (divides --n-heads; fewer = GQA)" + preset_defaults("n_kv_heads"))
    m.add_argument("--seq-len", type=context_length,
                   help="context length in characters (max_seq_len)" + preset_defaults("max_seq_len"))
    m.add_argument("--dropout", type=dropout_type, help="dropout probability in training" + preset_defaults("dropout"))

    t = p.add_argument_group("training (defaults come from --preset)")
    t.add_argument("--max-iters", type=positive_int,
                   help="total optimizer steps, also after --resume" + preset_defaults("max_iters"))
    t.add_argument("--batch-size", type=positive_int,
                   help="sequences per micro-batch (per process under torchrun)" + preset_defaults("batch_size"))
    t.add_argument("--grad-accum", type=positive_int,
                   help="micro-batches per optimizer step" + preset_defaults("grad_accum"))
    t.add_argument("--optimizer", choices=["adamw", "muon"],
                   help="adamw for everything, or muon for the blocks' matrices and adamw for the embeddings, "
                        "output layer and norms; fixed for a run (not changeable with --resume)"
                        + preset_defaults("optimizer"))
    t.add_argument("--learning-rate", type=positive_float,
                   help="AdamW's peak learning rate" + preset_defaults("learning_rate"))
    t.add_argument("--muon-lr", type=positive_float,
                   help="Muon's peak learning rate (with --optimizer muon)" + preset_defaults("muon_lr"))
    t.add_argument("--min-lr", type=positive_float,
                   help="AdamW's learning rate at the end of the decay (Muon's is scaled by the ratio of the peaks)"
                        + preset_defaults("min_lr"))
    t.add_argument("--schedule", choices=["cosine", "wsd"],
                   help="after the warmup: cosine decay, or wsd (flat, then a linear decay over the last "
                        "--cooldown-frac of the steps)" + preset_defaults("schedule"))
    t.add_argument("--cooldown-frac", type=positive_float,
                   help="with --schedule wsd: the share of the steps spent decaying, in (0, 1]"
                        + preset_defaults("cooldown_frac"))
    t.add_argument("--warmup-iters", type=non_negative_int,
                   help="steps of linear warmup" + preset_defaults("warmup_iters"))
    t.add_argument("--lr-decay-iters", type=positive_int,
                   help="step where the decay ends (default: --max-iters of the first run)")
    t.add_argument("--eval-interval", type=positive_int,
                   help="evaluate and save a checkpoint every N steps" + preset_defaults("eval_interval"))
    t.add_argument("--eval-iters", type=positive_int,
                   help="batches per evaluation estimate" + preset_defaults("eval_iters"))
    t.add_argument("--seed", type=seed_type, help="random seed (same seed, same run on CPU)" + preset_defaults("seed"))

    g = p.add_argument_group("generation")
    g.add_argument("--prompt", default=default_prompt,
                   help="text to continue, after <|begin_of_text|>; '' starts from it alone (default: %(default)s)")
    g.add_argument("--max-new-tokens", type=non_negative_int, default=500,
                   help="characters to generate (default: %(default)s)")
    g.add_argument("--temperature", type=temperature_type, default=0.8,
                   help="sampling temperature; 0 = greedy (always the most likely character) (default: %(default)s)")
    g.add_argument("--top-p", type=top_p_type, default=0.9, help="nucleus sampling: keep the most likely "
                   "characters whose probability adds up to p (1 = keep all) (default: %(default)s)")
    g.add_argument("--plot-attention", action="store_true",
                   help="with --sample: also draw the model's attention to out-dir/figures/main_attention.png")

    return p


def merge_flags(args: argparse.Namespace, model_fields: dict, train_fields: dict, resuming: bool) -> tuple[dict, dict]:
    """The ModelArgs and TrainConfig fields of a run: model_fields and train_fields (a preset's differences from
    the defaults, or a resumed checkpoint's settings) with the flags given on top.

    Raises:
        ValueError: with --resume, a model flag or --optimizer that contradicts the checkpoint.
    """
    given_model = {field: getattr(args, flag) for flag, field in MODEL_FLAGS.items() if getattr(args, flag) is not None}
    given_train = {flag: getattr(args, flag) for flag in TRAIN_FLAGS if getattr(args, flag) is not None}
    if resuming:
        differ = {f"--{flag.replace('_', '-')}" for flag, field in MODEL_FLAGS.items()
                  if field in given_model and given_model[field] != model_fields[field]}
        if differ:
            raise ValueError(f"--resume: {', '.join(sorted(differ))} differ from the checkpoint's model; "
                             f"drop them or train a new model in another --out-dir")
        if given_train.get("optimizer", train_fields["optimizer"]) != train_fields["optimizer"]:
            raise ValueError(f"--resume: --optimizer {given_train['optimizer']} differs from the checkpoint's; "
                             f"drop it or train a new model in another --out-dir")
    return {**model_fields, **given_model}, {**train_fields, **given_train}
