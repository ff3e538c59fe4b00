"""Chapter 6: LoRA, fine-tuning Meta's Llama 3 (or your character model) on your own text.

Full fine-tuning trains every weight. With AdamW in float32 each parameter costs 16 bytes (the weight, its
gradient and two moments): about 20 GB for Llama 3.2 1B, before a single activation. LoRA (Low-Rank Adaptation,
Hu et al. 2021) freezes the model and learns, beside each chosen matrix W, a small update of rank r:

    y = W x + (alpha / r) B A x        W (out, in) frozen;  A (r, in), B (out, r) trained;  r << in, out

B A has the shape of W but only r * (in + out) numbers. Rank 8 on all seven projections of Llama 3.2 1B (wq wk wv
wo in attention, w1 w2 w3 in the feed-forward network) trains 5.6M parameters, 0.46% of the model, while the
frozen weights stay in bfloat16 (2.47 GB).

- A starts random (Kaiming-uniform, as nn.Linear's weight) and B at zero, as in peft: at step 0, B A = 0 and the
  model is the base model, bit for bit. B's gradient is not zero (it is A x times the output's gradient), so B
  moves at the first step and A follows.
- alpha / r scales the update, so that a learning rate found at one rank still fits at another.
- After training, merge_lora folds the update into the weight, W <- W + (alpha / r) B A: the model is the base
  architecture again, with Meta's state-dict keys and no extra cost per token.
- Only A and B train, with AdamW: main.py's Muon rule would take them (2-D matrices under `layers.`), but Muon is
  for whole hidden matrices. They stay in float32, as in peft, whatever the base's dtype (AdamW's small steps
  would vanish in bfloat16's 8-bit mantissa); the forward pass casts them to the base's dtype, as autocast would.
- Inside our model wq and wk rows are in Meta's order. Hugging Face permutes them (chapter 5), so an adapter
  exported for transformers' LlamaForCausalLM permutes B's rows of wq and wk the same way.

Past one device (torchrun, N processes), the frozen base is sharded (FSDP2): each rank keeps 1/N of the rows of every
weight, and a projection's weight is gathered from all ranks just before it is used, then freed. A and B are
sharded with their projection; their gradients are averaged over the ranks, each of which reads its own batches.
Llama 3.1 70B's weights alone are 141 GB in bfloat16, more than any GPU holds; on 8 GPUs each keeps 17.6 GB of them
(docs/cluster.md). The loop below is the same for one process and for N; plumbing/sharding.py shards.

The demo needs no download: it trains a tiny LLaMA 3 on the code of chapters 1-4, freezes it, and teaches it this
chapter's code through LoRA, printing what must hold (the base's logits at step 0, the val loss falling, merged
logits equal to unmerged) and drawing the memory of a real 1B fine-tune beside its loss.

Needs: main.py (Transformer, training, generation), 05_llama3_tokenizer_and_weights.py (load_llama); the flags
       and file checks are plumbing/lora_cli.py's, the run's settings, loading and saving plumbing/lora_run.py's.
Run:   python 06_lora_finetuning.py                                  # the demo: seconds, no download
       python 06_lora_finetuning.py --llama-dir Llama-3.2-1B/original --data my_text.txt
       python 06_lora_finetuning.py --llama-dir Llama-3.2-1B/original --sample --prompt "To be"
       python 06_lora_finetuning.py --llama-dir Llama-3.2-1B --export-peft out/lora/peft
       python 06_lora_finetuning.py --ckpt out/ckpt.pt --data my_text.txt   # main.py's character model
       torchrun --nproc_per_node=2 06_lora_finetuning.py --llama-dir Llama-3.2-1B/original --data my_text.txt
       python 06_lora_finetuning.py --help                                   # every flag
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import time
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from main import TrainConfig, Transformer, configure_optimizer, estimate_loss, generate, learning_rates, train_step
from plumbing import figures, llama_fixtures, lora_cli, lora_run
from plumbing.runtime import Progress, StopSignals, all_ranks_max, exit_on_error, pick_device, training_process
from plumbing.validators import check_prompt

inputs = importlib.import_module("01_input_block")
llama = importlib.import_module("05_llama3_tokenizer_and_weights")

# Meta's names of the seven projections in a block, and the submodule of TransformerBlock that holds each.
TARGETS = {"wq": "attention", "wk": "attention", "wv": "attention", "wo": "attention",
           "w1": "feed_forward", "w2": "feed_forward", "w3": "feed_forward"}
DEFAULT_LLAMA_SEQ_LEN = 256  # --seq-len for Meta's model: training windows and the sampling context
DEFAULT_MAX_ITERS = 200


# ----------------------------------------------------------------------------- LoRA


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update: y = W x + (alpha / r) B A x.

    The frozen weight keeps its attribute name, `weight`, so its state-dict key stays Meta's
    (`layers.0.attention.wq.weight`); A and B sit beside it as `...wq.lora_A` and `...wq.lora_B`.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.weight = base.weight.requires_grad_(False)  # the same tensor: wrapping copies nothing
        # float32 whatever the base's dtype: AdamW's small steps would vanish in bfloat16. On the base's device, or
        # the CPU for a base on the meta device (sharded next, plumbing/sharding.py): A starts as in one process.
        like = {"device": "cpu" if base.weight.is_meta else base.weight.device, "dtype": torch.float32}
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **like))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **like))  # (out, r), zero: B A = 0 at first
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own init, as peft does

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in_features) -> (..., out_features), in x's dtype."""
        # The float32 matrices are used in x's dtype, as autocast would: casting A and B costs r * (in + out)
        # numbers, casting x or the output would cost far more.
        lora_A, lora_B = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        update = F.linear(F.linear(x, lora_A) * self.scale, lora_B)  # (..., r) scaled, then (..., out)
        return F.linear(x, self.weight) + update  # (..., out): W x + (alpha / r) B A x


def add_lora(model: Transformer, rank: int, alpha: float, targets: Iterable[str] = tuple(TARGETS)
             ) -> Transformer:
    """Freeze every parameter of `model`, then wrap the `targets` projections of every block in LoRALinear.

    Args:
        rank: r, between 1 and the smaller side of every adapted matrix.
        alpha: the update is scaled by alpha / rank.
        targets: Meta's names, e.g. ("wq", "wv"), or all seven (the default).
    Returns:
        the same model, changed in place: only the LoRA matrices require grad.
    Raises:
        ValueError: an unknown target, a rank that does not fit, or a model that already has LoRA.
    """
    targets = lora_cli.check_targets(targets, list(TARGETS))  # in order, once each
    if lora_modules(model):
        raise ValueError("the model already has LoRA layers: start from the base model")
    linears = {f"layers.{i}.{TARGETS[t]}.{t}": getattr(getattr(layer, TARGETS[t]), t)
               for i, layer in enumerate(model.layers) for t in targets}
    name, smallest = min(linears.items(), key=lambda item: min(item[1].weight.shape))
    if not 1 <= rank <= min(smallest.weight.shape):  # beyond that B A is no longer low-rank
        raise ValueError(f"rank {rank} does not fit: it must be between 1 and {min(smallest.weight.shape)}, the "
                         f"smaller side of {name} ({smallest.out_features} x {smallest.in_features})")
    model.requires_grad_(False)
    for name, linear in linears.items():
        parent, attr = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), attr, LoRALinear(linear, rank=rank, alpha=alpha))
    return model


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRALinear of the model by its path, e.g. {"layers.0.attention.wq": ...}."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


@torch.no_grad()
def merge_lora(model: Transformer) -> Transformer:
    """Fold every update into its weight, W <- W + (alpha / r) B A (summed in float32, stored in W's dtype),
    and put plain nn.Linear layers back: the state-dict keys are exactly the base's again.

    Returns:
        the same model, changed in place (still frozen).
    """
    for name, module in lora_modules(model).items():
        module.weight.copy_(module.weight.float() + module.scale * (module.lora_B @ module.lora_A))  # (out, in)
        linear = nn.Linear(module.in_features, module.out_features, bias=False, device="meta")  # no new memory
        linear.weight = module.weight
        parent, attr = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), attr, linear)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the LoRA tensors, keyed as in model.state_dict(): "layers.0.attention.wq.lora_A", "...lora_B"."""
    return {name: t for name, t in model.state_dict().items() if name.endswith((".lora_A", ".lora_B"))}


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, lora: dict[str, torch.Tensor], source: str) -> None:
    """Copy an adapter's tensors into the model's LoRA matrices, strictly (every name, every shape).

    Raises:
        ValueError: the adapter was made for another base (names or shapes differ); `source` names it.
    """
    lora_cli.check_adapter_fits(lora, lora_state_dict(model), source)
    for name, tensor in lora.items():
        model.get_parameter(name).copy_(tensor)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; a tied matrix counts once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# ----------------------------------------------------------------------------- adapters on disk


@dataclass
class LoRAConfig:
    """What add_lora needs; the training settings are TrainConfig's."""

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = tuple(TARGETS)


def apply_adapter(model: Transformer, adapter: dict, source: str) -> LoRAConfig:
    """add_lora with the adapter's settings, then its tensors. Returns those settings."""
    lora_cfg = LoRAConfig(**adapter["lora_config"])
    add_lora(model, lora_cfg.rank, lora_cfg.alpha, lora_cfg.targets)
    load_lora_state_dict(model, adapter["lora"], source)
    return lora_cfg


def export_peft(model: Transformer, out_dir: Path, base_name: str) -> list[Path]:
    """Write the model's LoRA matrices as peft saves a LoRA adapter of transformers' LlamaForCausalLM:
    adapter_config.json and adapter_model.safetensors, with Hugging Face's names and q/k row order.

    Returns:
        the two paths written.
    """
    from safetensors.torch import save_file

    tensors, targets = {}, set()
    for name, module in lora_modules(model).items():  # "layers.3.attention.wq" -> "model.layers.3.self_attn.q_proj"
        hf_name = llama.rename(f"{name}.weight", llama.META_NAMES).removesuffix(".weight")
        lora_B = module.lora_B.detach()  # (out, r): its rows are W's rows, in Meta's order
        heads = llama.qk_heads(f"{name}.weight", model.params)
        if heads:  # wq, wk
            lora_B = llama.permute_for_hf(lora_B, heads)
        tensors[f"base_model.model.{hf_name}.lora_A.weight"] = module.lora_A.detach().contiguous()
        tensors[f"base_model.model.{hf_name}.lora_B.weight"] = lora_B.contiguous()
        targets.add(hf_name.split(".")[-1])
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
              "r": module.rank, "lora_alpha": module.alpha, "target_modules": sorted(targets), "lora_dropout": 0.0,
              "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True}
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "adapter_config.json", out_dir / "adapter_model.safetensors"]
    paths[0].write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, paths[1], metadata={"format": "pt"})
    return paths


# ----------------------------------------------------------------------------- fine-tuning


def lora_train_config(max_iters: int, batch_size: int, learning_rate: float, eval_iters: int, seed: int,
                      grad_accum: int = 1) -> TrainConfig:
    """TrainConfig for a LoRA run: AdamW (never Muon), no weight decay (transformers' Trainer default), a short
    warmup, then a cosine down to a tenth of the peak at max_iters."""
    return TrainConfig(batch_size=batch_size, grad_accum=grad_accum, max_iters=max_iters, learning_rate=learning_rate,
                       min_lr=learning_rate / 10, warmup_iters=max(1, max_iters // 20), lr_decay_iters=max_iters,
                       weight_decay=0.0, eval_iters=eval_iters, seed=seed, optimizer="adamw", schedule="cosine")


def train_one_step(model: Transformer, optimizers: list[torch.optim.Optimizer], train_data: np.ndarray,
                   cfg: TrainConfig, seq_len: int, bos_id: int, generator: torch.Generator, device: str,
                   step: int) -> float:
    """main.py's train_step on grad_accum fresh micro-batches, at the learning rates of `step`: with LoRA, only
    A and B have gradients, so only they move. Returns the loss."""
    batches = [inputs.get_batch(train_data, cfg.batch_size, seq_len, bos_id, generator, device)
               for _ in range(cfg.grad_accum)]
    lrs = list(learning_rates(step, optimizers, cfg).values())
    return train_step(model, optimizers, batches, lrs, cfg.grad_clip, nullcontext())


def finetune(args: argparse.Namespace, rank: int, world_size: int, device: str, t_start: float) -> None:
    """Fine-tune LoRA on --data (or --resume a fine-tune), writing out-dir/adapter.pt, train_state.pt and
    metrics.json. Under torchrun this is one rank of N: each reads its own batches, and rank 0 reports and writes."""
    run = set_up(args, rank, world_size, device)
    cfg = run.cfg
    progress = Progress(cfg.max_iters, run.step, run.tokens_per_step, args.log_interval, enabled=rank == 0)
    run.model.train()  # the base's dropout, if it has any, as in its own training
    with StopSignals() as stop:
        while run.step < cfg.max_iters:
            # one step: grad_accum micro-batches, then AdamW on A and B at the scheduled learning rate
            t0 = time.perf_counter()
            loss = train_one_step(run.model, run.optimizers, run.train_data, cfg, run.seq_len, run.bos_id,
                                  run.data_gen, run.device, run.step)
            # every rank stops at the same step or none does: on a loss that diverged, or on Ctrl-C / SIGTERM
            signum, bad_loss = all_ranks_max([stop.signum, not math.isfinite(loss)], device)
            if bad_loss:
                raise FloatingPointError(f"the loss became {loss} at step {run.step}: training diverged; "
                                         f"try a lower --learning-rate")
            progress.update(run.step + 1, loss, learning_rates(run.step, run.optimizers, cfg), time.perf_counter() - t0)
            run.step += 1
            run.losses.append(loss)

            # save now and then, and on Ctrl-C or SIGTERM, after which --resume continues
            if run.step % lora_run.SAVE_INTERVAL == 0 or signum:
                lora_run.save(run, lora_state_dict(run.model))
            if signum:
                progress.close()
                raise lora_cli.interrupted(int(signum), run.step, args, world_size, run.log)
        progress.close()
        lora_run.save(run, lora_state_dict(run.model))
    lora_run.finish(run, progress, t_start)


def set_up(args: argparse.Namespace, rank: int, world_size: int, device: str) -> lora_run.FineTune:
    """The frozen base, LoRA on it, AdamW on LoRA's matrices, and the text: new, or as out-dir/train_state.pt left
    them (--resume). Prints what it built and the val loss before."""
    saved = lora_cli.run_to_resume(args)
    cfg = lora_train_config(args.max_iters or DEFAULT_MAX_ITERS, args.batch_size, args.learning_rate,
                            args.eval_iters, args.seed, args.grad_accum)
    lora_cfg, cfg, seq_len = lora_run.run_settings(args, saved, LoRAConfig(args.rank, args.alpha, tuple(args.targets)),
                                                   cfg)  # with --resume, the saved run's

    def adapt(model: Transformer) -> Transformer:
        torch.manual_seed(cfg.seed)  # A's random start: the same in one process and on every rank
        return add_lora(model, lora_cfg.rank, lora_cfg.alpha, lora_cfg.targets)

    # One process: the base, then LoRA on it. N ranks: LoRA on the base's shapes, then both sharded.
    model, tokenizer, seq_len = lora_run.load_base(args, seq_len, DEFAULT_LLAMA_SEQ_LEN, device, adapt, rank,
                                                   world_size)
    train_data, val_data = lora_run.load_data(args.data, tokenizer, seq_len)
    optimizers = configure_optimizer(model, cfg, torch.device(device).type)  # AdamW: lora_train_config's choice
    run = lora_run.FineTune(lora_cfg, cfg, seq_len, model, tokenizer.bos_id, train_data, val_data, optimizers,
                            torch.Generator().manual_seed(cfg.seed + rank),  # each rank's own batches
                            device, rank, world_size, args.out_dir, str(args.llama_dir or args.ckpt),
                            *count_parameters(model))
    if saved is not None:
        lora_run.restore(run, saved, load_lora_state_dict)
    lora_run.report_start(run, resumed=saved is not None)
    return run


# ----------------------------------------------------------------------------- using an adapter


def use_adapter(args: argparse.Namespace) -> None:
    """--sample and --export-peft: the base model plus out-dir/adapter.pt."""
    adapter_path = args.out_dir / "adapter.pt"
    adapter = lora_cli.load_adapter(adapter_path)
    device = pick_device(args.device)
    model, tokenizer, _ = lora_run.load_base(args, args.seq_len or adapter["seq_len"], DEFAULT_LLAMA_SEQ_LEN, device,
                                             adapt=lambda base: apply_adapter(base, adapter, str(adapter_path)))
    if args.export_peft is not None:
        paths = export_peft(model, args.export_peft, str(args.llama_dir))
        print(f"wrote {' and '.join(map(str, paths))}: load them with "
              f"peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(...), {str(args.export_peft)!r})")
    if args.sample:
        check_prompt(tokenizer, args.prompt)
        text = generate(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.top_p,
                        torch.Generator().manual_seed(args.seed))
        print(f"{args.prompt}{text}")


# ----------------------------------------------------------------------------- the demo and its figure

def llama_32_1b_counts(rank: int = 8) -> tuple[int, int]:
    """(all parameters, LoRA parameters at `rank` on all seven projections) of Llama 3.2 1B."""
    model = llama_fixtures.tied_meta_model(llama_fixtures.LLAMA_32_PARAMS["1B"])
    n_total = count_parameters(model)[1]
    return n_total, count_parameters(add_lora(model, rank, 2.0 * rank))[0]


def demo(fig_dir: Path) -> None:
    """A tiny LLaMA 3 trained on chapters 1-4's code learns this chapter's code through LoRA; the invariants shown."""
    torch.manual_seed(0)
    seq_len, generator = 64, torch.Generator().manual_seed(0)
    # the base: a tiny LLaMA 3 trained briefly on chapters 1-4's code; the new text: this chapter's, split 90/10
    model, tokenizer, (train_data, val_data) = lora_run.demo_base(Path(__file__), seq_len, generator)

    # ---- LoRA: the base frozen, B = 0, so nothing changes yet
    tokens = inputs.inputs_for(torch.from_numpy(val_data[:seq_len])[None], tokenizer.bos_id)  # (1, seq_len)
    with torch.no_grad():
        base_logits = model(tokens)[0]  # (1, seq_len, vocab_size)
    add_lora(model, rank=8, alpha=16.0)
    trainable, total = count_parameters(model)
    print(f"add_lora(rank 8, alpha 16, all seven projections): {trainable:,} trainable of {total:,} "
          f"parameters ({trainable / total:.1%})")
    with torch.no_grad():
        diff = (model(tokens)[0] - base_logits).abs().max().item()
    print(f"step 0: logits with LoRA against the base's: max |diff| = {diff} (should be 0.0: B starts at zero)")

    # ---- the fine-tune: AdamW on A and B only
    cfg = lora_train_config(max_iters=120, batch_size=8, learning_rate=1e-2, eval_iters=4, seed=0)
    optimizers = configure_optimizer(model, cfg, "cpu")
    val_log = [(0, estimate_loss(model, val_data, cfg, seq_len, tokenizer.bos_id, "cpu", nullcontext()))]
    losses = []
    for step in range(cfg.max_iters):
        losses.append(train_one_step(model, optimizers, train_data, cfg, seq_len, tokenizer.bos_id, generator, "cpu",
                                     step))
        if (step + 1) % 20 == 0:
            val_loss = estimate_loss(model, val_data, cfg, seq_len, tokenizer.bos_id, "cpu", nullcontext())
            val_log.append((step + 1, val_loss))
    print(f"LoRA fine-tune, {cfg.max_iters} steps: val loss on this chapter {val_log[0][1]:.3f} -> "
          f"{val_log[-1][1]:.3f} (should fall by about half a nat, from about 2.6 to about 2.0)")

    # ---- merging: W + (alpha / r) B A, and Meta's keys again
    with torch.no_grad():
        lora_logits = model(tokens)[0]
        merge_lora(model)
        diff = ((model(tokens)[0] - lora_logits).abs().max() / lora_logits.abs().max()).item()
    same_keys = model.state_dict().keys() == Transformer(model.params).state_dict().keys()
    print(f"merge_lora: merged logits against unmerged: max |diff| / max |logit| = {diff:.0e} (should be under "
          f"1e-5: only float32's rounding differs between (W + s B A) x and W x + s B A x); state-dict keys are "
          f"Meta's again: {same_keys} (should be True)")

    n_total, n_lora = llama_32_1b_counts(rank=8)
    print(f"Llama 3.2 1B, rank 8 on all seven projections: {n_lora:,} trainable parameters, "
          f"{n_lora / n_total:.2%} of {n_total:,}")
    print(f"figure: {figures.draw_lora(n_total, n_lora, losses, val_log, fig_dir)}")
    print("caption: LoRA's frozen bfloat16 base and small float32 matrices need about an eighth of a full "
          "fine-tune's memory; the tiny model learns a new text with only its LoRA matrices trained.")


def main(argv: list[str] | None = None) -> None:
    """`python 06_lora_finetuning.py [flags]`: the demo, a fine-tune, or --sample / --export-peft with an adapter.
    Every problem ends in one line `error: ...`; Ctrl-C and SIGTERM end with the exit status of the signal."""
    t_start = time.perf_counter()
    args = lora_cli.build_parser(list(TARGETS), LoRAConfig.rank, LoRAConfig.alpha, DEFAULT_MAX_ITERS,
                                 DEFAULT_LLAMA_SEQ_LEN).parse_args(argv)
    with exit_on_error():
        mode = lora_cli.choose_mode(args)
        if mode == "demo":
            demo(args.fig_dir)
        elif mode == "use":
            use_adapter(args)
        else:  # under torchrun, one process per rank; rank 0 locks out-dir, refusing a second fine-tune there
            with training_process(args.device, args.out_dir) as (rank, world_size, device):
                finetune(args, rank, world_size, device, t_start)


if __name__ == "__main__":
    main()
