"""LoRA fine-tuning at the size of Llama 3.2 1B, random weights: our chapter 6 against peft on transformers, and
on N processes with the base sharded (FSDP2).

Writes a checkpoint in Meta's layout (params.json, consolidated.00.pth, tokenizer.model; and Hugging Face's, unused
here) with exactly Llama 3.2 1B's
names, shapes and dtype (bfloat16; output.weight stored as the same tensor as tok_embeddings.weight, as in Meta's
file), then measures, each in a fresh Python process:

    memory   ours alone: chapter 5's load_llama, chapter 6's add_lora (rank 8, alpha 16, all seven projections),
             AdamW on the LoRA matrices, a few training steps; the peak resident memory (VmHWM) against the base's
             bfloat16 bytes (goal: at most 1.6x).
    sharded  with --nproc N: the same under torchrun on N CPU processes (gloo), the base sharded as chapter 6 shards
             it (plumbing/sharding.py), each rank training on its own batch of 1 x 128 tokens; every rank's peak
             resident memory against the single process's (goal for N = 2: at most 0.75x; replicated would be 1x).
    speed    ours and peft's LoRA (the same rank, alpha and targets) on transformers' LlamaForCausalLM holding the
             same weights (wq and wk rows in Hugging Face's order, sharing the other tensors with ours), both
             stepped by main.train_step with main.configure_optimizer's AdamW: batch 1 x 128 tokens, bfloat16
             base, float32 LoRA matrices. The two take turns, step by step, so that what else the machine does
             slows both alike; the median step gives tokens/s (goal: ours at least peft's), the best step
             what each reaches when nothing else runs.

Before timing, both models' logits on the same batch are compared: the same weights give the same answer
(to bfloat16's rounding: the two compute RoPE and the norms in different orders).
The tokenizer.model comes from the llama-models package (requirements-test.txt) unless --tokenizer is given.

Run:   python benchmarks/bench_lora.py                  # about 2.5 GB on disk, 3 GB of memory, minutes on a CPU
       python benchmarks/bench_lora.py --nproc 2        # and each of 2 ranks' peak memory beside it
       python benchmarks/bench_lora.py --shape tiny --nproc 2   # a smoke test in seconds
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from llama_1b import SHAPES, measure_in_child, peak_rss, random_checkpoint  # noqa: E402

import main  # noqa: E402
from plumbing import lora_run, runtime  # noqa: E402
from plumbing.llama_files import LLAMA3_ROPE  # noqa: E402
from plumbing.llama_fixtures import parameter_counts  # noqa: E402
from plumbing.validators import positive_int  # noqa: E402

inputs = importlib.import_module("01_input_block")
llama = importlib.import_module("05_llama3_tokenizer_and_weights")
lora = importlib.import_module("06_lora_finetuning")

RANK, ALPHA, SEQ_LEN, LEARNING_RATE = 8, 16.0, 128, 2e-4


class CausalLMLoss(nn.Module):
    """transformers' causal LM behind main.Transformer's training interface: (tokens, targets) -> (logits, loss)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(input_ids=tokens, use_cache=False).logits.float()  # (bsz, seqlen, vocab_size)
        return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def peft_model_of(model: main.Transformer) -> nn.Module:
    """transformers' LlamaForCausalLM holding our model's weights (wq and wk rows permuted back to Hugging Face's
    order, every other tensor shared), with peft's LoRA at RANK and ALPHA on the seven projections."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    args = model.params
    config = LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=args.dim,
        intermediate_size=model.layers[0].feed_forward.w1.out_features, num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads,
        rms_norm_eps=args.norm_eps, max_position_embeddings=131072, tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": args.rope_theta, "factor": args.rope_scaling_factor,
                         **LLAMA3_ROPE})
    state_dict = llama.hf_state_dict(model.state_dict(), args)  # Meta's names and row order -> Hugging Face's
    with torch.device("meta"):
        hf_model = LlamaForCausalLM(config)
    hf_model.load_state_dict(state_dict, strict=True, assign=True)
    hf_model.model.rotary_emb = LlamaRotaryEmbedding(config)  # its frequencies are a buffer outside the state dict
    hf_model.tie_weights()
    targets = [llama.rename(f"layers.0.{block}.{t}.weight", llama.META_NAMES).split(".")[-2]  # "q_proj", ...
               for t, block in lora.TARGETS.items()]
    return get_peft_model(hf_model, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets, lora_dropout=0.0))


def train_config() -> main.TrainConfig:
    return lora.lora_train_config(max_iters=1000, batch_size=1, learning_rate=LEARNING_RATE, eval_iters=1, seed=0)


def batch(vocab_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One window of random BPE ids (no special tokens) opening with <|begin_of_text|>."""
    y = torch.randint(0, vocab_size - 256, (1, SEQ_LEN), generator=torch.Generator().manual_seed(seed))
    return inputs.inputs_for(y, 128000), y


def measure_memory(path: Path, steps: int) -> dict:
    """Ours alone: load, add LoRA, train `steps` steps; called in a fresh process. Under torchrun, one rank of N
    (the base sharded, each rank on its own batches): rank 0 returns every rank's peak, the others None."""
    rss_before = peak_rss()  # Python, torch, main and the chapters imported
    rank, world_size, _ = runtime.setup_distributed("cpu")
    model, _, _ = lora_run.load_base(argparse.Namespace(llama_dir=path, ckpt=None, dtype=None), SEQ_LEN, SEQ_LEN,
                                     "cpu", adapt=lambda base: lora.add_lora(base, RANK, ALPHA), rank=rank,
                                     world_size=world_size)
    optimizers = main.configure_optimizer(model, train_config(), "cpu")
    for step in range(steps):
        main.train_step(model, optimizers, [batch(model.params.vocab_size, step * world_size + rank)], [LEARNING_RATE],
                        1.0, nullcontext())
    peaks = runtime.gather_from_ranks(peak_rss())
    base_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    runtime.teardown_distributed()
    if world_size > 1:
        return {"ranks": world_size, "rank_peak_rss_gb": [peak / 1e9 for peak in peaks]} if rank == 0 else None
    return {"base_weights_gb": base_bytes / 1e9, "rss_gb_before_load": rss_before / 1e9, "peak_rss_gb": peaks[0] / 1e9,
            "peak_rss_over_base": peaks[0] / base_bytes, "model_rss_over_base": (peaks[0] - rss_before) / base_bytes,
            "memory_steps": steps}


def measure_speed(path: Path, steps: int) -> dict:
    """Ours and peft's, one step each in turn, after a first untimed step; called in a fresh process."""
    ours, _ = llama.load_llama(path, max_seq_len=SEQ_LEN, log=lambda line: None)
    theirs = CausalLMLoss(peft_model_of(ours))  # before add_lora: it takes our base weights
    lora.add_lora(ours, RANK, ALPHA)
    vocab_size = ours.params.vocab_size
    with torch.no_grad():
        x, _ = batch(vocab_size, seed=10**6)
        ours_logits, theirs_logits = ours(x)[0], theirs.model(input_ids=x, use_cache=False).logits.float()
    logits_diff = (ours_logits - theirs_logits).abs().max().item()
    cosine = F.cosine_similarity(ours_logits.double().flatten(), theirs_logits.double().flatten(), dim=0).item()

    models = {"ours": ours, "peft": theirs}
    optimizers = {name: main.configure_optimizer(m, train_config(), "cpu") for name, m in models.items()}
    assert lora.count_parameters(ours)[0] == sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    times: dict[str, list[float]] = {"ours": [], "peft": []}
    for step in range(steps + 1):  # step 0 warms up, untimed
        order = ["ours", "peft"] if step % 2 == 0 else ["peft", "ours"]
        for name in order:
            t0 = time.perf_counter()
            main.train_step(models[name], optimizers[name], [batch(vocab_size, step)], [LEARNING_RATE], 1.0,
                            nullcontext())
            if step:
                times[name].append(time.perf_counter() - t0)
    median = {name: statistics.median(t) for name, t in times.items()}
    return {"ours_tokens_per_s": SEQ_LEN / median["ours"], "peft_tokens_per_s": SEQ_LEN / median["peft"],
            "ours_over_peft": median["peft"] / median["ours"], "ours_best_tokens_per_s": SEQ_LEN / min(times["ours"]),
            "peft_best_tokens_per_s": SEQ_LEN / min(times["peft"]),
            "ours_step_s": times["ours"], "peft_step_s": times["peft"], "logits_max_abs_diff": logits_diff,
            "logits_cosine": cosine, "logits_max_abs": ours_logits.abs().max().item(),
            "trainable_params": lora.count_parameters(ours)[0], "threads": torch.get_num_threads()}


def child(flag: str, path: Path, steps: int, threads: int | None, nproc: int = 1) -> dict:
    """Run this script with `flag` in a fresh process (nproc > 1: torchrun's N processes, gloo) and return the JSON
    object it prints."""
    command = [__file__, flag, str(path), "--steps", str(steps)] + (["--threads", str(threads)] if threads else [])
    if nproc > 1:
        command = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *command]
    return measure_in_child(command, flag)


def main_cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b", help="1b: Llama 3.2 1B (default); tiny: smoke")
    parser.add_argument("--steps", type=positive_int, default=6,
                        help="timed training steps for each of ours and peft's (default: %(default)s)")
    parser.add_argument("--memory-steps", type=positive_int, default=2,
                        help="training steps before reading our peak memory (default: %(default)s)")
    parser.add_argument("--nproc", type=positive_int, default=1,
                        help="also measure each rank's peak memory on this many processes, the base sharded "
                             "(default: %(default)s: not)")
    parser.add_argument("--memory-only", action="store_true",
                        help="skip the speed comparison with peft (on a CPU without bfloat16 instructions a step of "
                             "the 1B takes many minutes)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch threads (default: PyTorch's, one per core); on a machine that other jobs share, "
                             "1 thread is slowed less by them")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="Meta's tokenizer.model (default: the copy in the llama-models package)")
    parser.add_argument("--measure-memory", type=Path, default=None, help=argparse.SUPPRESS)  # a child process
    parser.add_argument("--measure-speed", type=Path, default=None, help=argparse.SUPPRESS)  # a child process
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.measure_memory is not None:
        memory = measure_memory(args.measure_memory, args.steps)
        if memory is not None:  # rank 0, or the one process
            print(json.dumps(memory))
        return
    if args.measure_speed is not None:
        print(json.dumps(measure_speed(args.measure_speed, args.steps)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        random_checkpoint(Path(tmp), args.shape, args.tokenizer)
        memory = child("--measure-memory", Path(tmp) / "meta", args.memory_steps, args.threads)
        print(f"ours: peak RSS {memory['peak_rss_gb']:.2f} GB = {memory['peak_rss_over_base']:.2f}x the base's "
              f"{memory['base_weights_gb']:.2f} GB in bfloat16 ({memory['model_rss_over_base']:.2f}x without the "
              f"{memory['rss_gb_before_load']:.2f} GB before loading)", flush=True)
        if args.nproc > 1:
            sharded = child("--measure-memory", Path(tmp) / "meta", args.memory_steps, args.threads, args.nproc)
            peaks = sharded["rank_peak_rss_gb"]
            memory["rank_peak_over_single"] = max(peaks) / memory["peak_rss_gb"]
            memory["rank_peak_rss_gb"] = peaks
            print(f"ours on {args.nproc} processes, the base sharded: peak RSS per rank "
                  f"{', '.join(f'{peak:.2f}' for peak in peaks)} GB, beside {memory['peak_rss_gb']:.2f} GB in one "
                  f"process: {memory['rank_peak_over_single']:.2f}x it (goal for 2 ranks: at most 0.75x)", flush=True)
        speed = {} if args.memory_only else child("--measure-speed", Path(tmp) / "meta", args.steps, args.threads)
    if speed:
        print(f"logits before training, ours against transformers' (bfloat16): max |diff| "
              f"{speed['logits_max_abs_diff']:.2e} for logits up to {speed['logits_max_abs']:.2f}, "
              f"cosine similarity {speed['logits_cosine']:.5f}")
        print(f"LoRA training, batch 1 x {SEQ_LEN}, rank {RANK} on all seven projections, {speed['threads']} threads, "
              f"median (best) of {args.steps} steps each, taking turns: ours {speed['ours_tokens_per_s']:.1f} "
              f"({speed['ours_best_tokens_per_s']:.1f}) tokens/s, peft {speed['peft_tokens_per_s']:.1f} "
              f"({speed['peft_best_tokens_per_s']:.1f}) tokens/s: ours at {speed['ours_over_peft']:.2f}x peft's speed")
    n_params = sum(parameter_counts(SHAPES[args.shape]).values())  # the tied matrix once
    print(json.dumps({"shape": args.shape, "params": n_params, "rank": RANK, "alpha": ALPHA, "seq_len": SEQ_LEN,
                      **memory, **speed}))


if __name__ == "__main__":
    main_cli()
