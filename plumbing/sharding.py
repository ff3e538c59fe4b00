"""Chapter 6 on N ranks under torchrun: the frozen base sharded with FSDP2, each rank reading only its own rows of
the checkpoint, and the whole adapter gathered for saving.

FSDP2 (`torch.distributed.fsdp.fully_shard`) turns every parameter of a module into a DTensor sharded on its first
dimension: with c = ceil(rows / N), rank r keeps rows [r c, (r + 1) c) (the last ranks may keep fewer, or none).
Just before a module runs (forward, and again in backward) its weights are all-gathered, and freed after it; the
gradients of its LoRA matrices are reduce-scattered, each rank keeping the mean over all ranks of its own rows.

- `shard_model`: fully_shard on every projection of every TransformerBlock (wq ... w3, each with its LoRA matrices),
  then on the block, then on the root, on a model built on the meta device; then each rank's rows of the
  memory-mapped checkpoint become its shards, as views of the file where nothing changes them (a mapped file's
  pages count in a process's memory once read: a copy would count them twice). A projection at a time, not a whole
  block, is gathered: FSDP holds two or three units in flight (the one running, the one gathered ahead, the
  previous one's gather buffer), and for Llama 3.2 1B on 2 ranks whole blocks cost 0.26 GB more per rank.
- The embedding matrix, a fifth of Llama 3.2 1B and the output layer too when tied, stays outside FSDP, sharded by
  rows: `RowShardedEmbedding` and `RowShardedOutput` broadcast it a few thousand rows at a time, so a rank never holds
  the whole matrix (FSDP would gather it for the whole forward and backward pass, while the activations peak).
- `gathered`, `shard_as`: every DTensor made whole (a collective) for saving, and whole tensors made into this
  rank's shards for --resume.
Every rank must make the same calls in the same order: each one of them contains a collective.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

ROWS_PER_PIECE = 8192  # rows of the embedding broadcast at a time (64 MiB of Llama 3.1 8B's in bfloat16)
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)


def return_freed_buffers_to_the_os() -> None:
    """On a CPU, every step all-gathers each projection into new buffers and frees them. glibc raises its mmap
    threshold to the largest block freed (up to 32 MiB), and keeps freed blocks below it in its heap, where they
    still count in the process's memory: for Llama 3.2 1B on 2 ranks about 0.45 GB per rank. A fixed threshold of
    256 KiB gives every larger buffer back when it is freed. Elsewhere than glibc (macOS, Windows), nothing."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 256 * 1024)
    except (OSError, AttributeError):
        pass


def row_range(n_rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """The rows [start, stop) of `rank` in a tensor of n_rows rows sharded on its first dimension."""
    chunk = -(-n_rows // world_size)
    start = min(rank * chunk, n_rows)
    return start, min(start + chunk, n_rows)


def row_pieces(weight: DTensor) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, rows) of `weight`, in order, ROWS_PER_PIECE rows at most: each piece is broadcast by the rank
    that holds it, so a rank holds its own rows and at most one piece of another's. Every rank must go through to
    the end (each piece is a collective)."""
    local, rank, world_size = weight.to_local(), dist.get_rank(), dist.get_world_size()
    for src in range(world_size):
        start, stop = row_range(weight.shape[0], src, world_size)
        for first in range(start, stop, ROWS_PER_PIECE):
            last = min(first + ROWS_PER_PIECE, stop)
            shape = (last - first, *weight.shape[1:])
            rows = local[first - start : last - start] if src == rank else local.new_empty(shape)
            dist.broadcast(rows, src)
            yield first, rows


class RowShardedEmbedding(nn.Module):
    """nn.Embedding (frozen) with its matrix sharded by rows: each token's row comes from the rank that holds it."""

    def __init__(self, weight: nn.Parameter):
        super().__init__()
        self.weight = weight  # DTensor (vocab_size, dim), Shard(0); keeps the key tok_embeddings.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (bsz, seqlen) -> (bsz, seqlen, dim)."""
        h = self.weight.to_local().new_empty((*tokens.shape, self.weight.shape[1]))
        for start, rows in row_pieces(self.weight):
            inside = (tokens >= start) & (tokens < start + len(rows))
            h[inside] = rows[tokens[inside] - start]
        return h


class RowShardedLinear(torch.autograd.Function):
    """x @ W^T for a frozen W sharded by rows: the output's columns come piece by piece (row_pieces), and so, in
    backward, does the gradient of x (the sum over pieces of grad[..., piece's columns] @ piece). W gets none."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: DTensor) -> torch.Tensor:
        ctx.weight = weight
        out = x.new_empty((*x.shape[:-1], weight.shape[0]))  # (..., out_features)
        for start, rows in row_pieces(weight):
            out[..., start : start + len(rows)] = F.linear(x, rows)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad_x = None
        for start, rows in row_pieces(ctx.weight):
            part = grad[..., start : start + len(rows)] @ rows  # (..., dim)
            grad_x = part if grad_x is None else grad_x + part
        return grad_x, None


class RowShardedOutput(nn.Module):
    """The output layer (frozen) with its matrix sharded by rows, the embedding's own when the two are tied."""

    def __init__(self, weight: nn.Parameter):
        super().__init__()
        self.weight = weight  # DTensor (vocab_size, dim), Shard(0); keeps the key output.weight

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h (bsz, seqlen, dim) -> logits (bsz, seqlen, vocab_size)."""
        return RowShardedLinear.apply(h, self.weight)


def shard_model(model: nn.Module, weights: dict[str, torch.Tensor], dtype: torch.dtype | None, device: str,
                row_order: dict[str, torch.Tensor]) -> nn.Module:
    """Shard `model` over the ranks of the process group and give each rank its rows of `weights`.

    Args:
        model: main.Transformer built on the meta device, with LoRA added (its matrices real, the same on every
            rank: FSDP keeps each rank's rows of them).
        weights: every frozen tensor under the model's names, whole (memory-mapped: only this rank's rows are
            read); no output.weight when the output is tied to the embedding.
        dtype: the base's dtype (None: each tensor's own). device: this rank's.
        row_order: for a tensor whose rows the file stores in another order, the file's row of each of ours.
    Returns:
        the model, changed in place: each of its parameters a DTensor holding this rank's rows.
    """
    rank, world_size = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh(torch.device(device).type, (world_size,))
    if mesh.device_type == "cpu":
        return_freed_buffers_to_the_os()

    def shard(name: str) -> nn.Parameter:
        full = weights[name]
        start, stop = row_range(full.shape[0], rank, world_size)
        order = row_order.get(name)
        rows = full[start:stop] if order is None else full.index_select(0, order[start:stop])  # a view, or a copy
        rows = rows.to(device=device, dtype=dtype or full.dtype)  # of this rank's rows only
        local = DTensor.from_local(rows, mesh, [Shard(0)], run_check=False, shape=full.shape, stride=full.stride())
        return nn.Parameter(local, requires_grad=False)

    embedding = shard("tok_embeddings.weight")
    model.tok_embeddings = RowShardedEmbedding(embedding)
    model.output = RowShardedOutput(shard("output.weight") if "output.weight" in weights else embedding)
    for layer in model.layers:
        for projection in (m for m in layer.modules() if getattr(m, "weight", torch.empty(0)).dim() == 2):
            fully_shard(projection, mesh=mesh)  # wq ... w3, LoRA's A and B with their weight
        fully_shard(layer, mesh=mesh)  # what is left of the block: its two norms
    fully_shard(model, mesh=mesh, ignored_params={model.tok_embeddings.weight, model.output.weight})
    state = model.state_dict(keep_vars=True)  # what is still on the meta device gets this rank's rows
    model.load_state_dict({name: shard(name) if t.is_meta else t for name, t in state.items()}, assign=True)
    return model


def gathered(obj):
    """`obj` (a tensor, or dicts and lists of them) with every DTensor made whole, on every rank. A collective:
    every rank must call it on the same structure."""
    if isinstance(obj, DTensor):
        return obj.full_tensor()
    if isinstance(obj, dict):
        return {key: gathered(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(gathered(value) for value in obj)
    return obj


def shard_as(tensor: object, like: torch.Tensor | None) -> object:
    """A whole tensor as this rank's shard of `like` (a parameter) when it has like's shape (the parameter itself,
    AdamW's moments); anything else (a plain parameter's tensor, AdamW's step count) as it is."""
    if isinstance(like, DTensor) and isinstance(tensor, torch.Tensor) and tensor.shape == like.shape:
        return distribute_tensor(tensor, like.device_mesh, like.placements, src_data_rank=None)
    return tensor
