"""Tensor-parallel layers: weights split across the ranks of one shard group.

QKV and gate/up are column-parallel (each rank holds some output features), O and down are
row-parallel (each rank holds some input features, then an all-reduce), embedding and LM head
are vocab-parallel (the vocabulary padded to a multiple of the ranks). With one rank every
collective is skipped, so the model code is the same.

A rank reads only its own slice of each checkpoint tensor (`narrow` on the lazy tensors of
shard/weights.py), so its host memory holds its share of the model, not the model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from shard import weights
from shard.quantization import Int4Groups, Int4Weight


@dataclass(slots=True, frozen=True)
class TensorParallel:
    """This rank's place in its shard group, and the collectives of the forward pass."""

    rank: int = 0
    world_size: int = 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(x)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=-1)

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's x on every rank (in place)."""
        if self.world_size > 1:
            dist.broadcast(x, src=0)
        return x

    def piece(self, size: int, pieces: int) -> tuple[int, int]:
        """(start, length) of the slice this rank holds of `size` cut into `pieces` equal
        slices; with fewer pieces than ranks, consecutive ranks share one (replication)."""
        length = size // pieces
        return self.rank * pieces // self.world_size * length, length

    def padded(self, size: int) -> int:
        """Per-rank length of `size` padded up to a multiple of the ranks."""
        return -(-size // self.world_size)


class ColumnParallelLinear(nn.Module):
    """y = x W^T with W's rows (output features) split over ranks; no communication.

    output_sizes: the stacked outputs (q, k, v or gate, up); pieces: how many slices each one
    is cut into (the ranks, or fewer for key/value heads shared by several ranks).
    `product`: F.linear's signature (shard.models.ops.Ops.linear)."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool, tp: TensorParallel,
                 pieces: list[int] | None = None, product: Callable = F.linear):
        super().__init__()
        self.tp = tp
        self.product = product
        pieces = pieces or [tp.world_size] * len(output_sizes)
        self.slices = [tp.piece(size, n) for size, n in zip(output_sizes, pieces)]
        self.local_sizes = [length for _, length in self.slices]
        local_out = sum(self.local_sizes)
        self.weight = nn.Parameter(torch.empty(local_out, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(local_out), requires_grad=False) if bias else None
        self.int4: Int4Weight | None = None
        self._int4_parts: dict[int, Int4Groups] = {}

    def load_shard(self, param: nn.Parameter, full, index: int = 0) -> None:
        """Copy this rank's rows of the `index`-th stacked output (q/k/v, gate/up) into `param`."""
        start, size = self.slices[index]
        rows = full.narrow(0, start, size)
        if isinstance(rows, Int4Groups):
            self._int4_parts[index] = rows  # packed by finish_loading, once all parts are in
            return
        param.data.narrow(0, sum(self.local_sizes[:index]), size).copy_(rows)

    def finish_loading(self) -> None:
        """Run on int4 when every stacked part came as int4; else widen the int4 parts."""
        parts, self._int4_parts = self._int4_parts, {}
        if len(parts) == len(self.local_sizes):
            ordered = [parts[i] for i in range(len(parts))]
            self.int4 = Int4Weight(Int4Groups(*(torch.cat(t) for t in zip(
                *((p.q, p.scale, p.zero) for p in ordered)))))
            self.weight = None
            return
        for index, part in parts.items():
            size = self.local_sizes[index]
            self.weight.data.narrow(0, sum(self.local_sizes[:index]), size).copy_(
                part.dequantize())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.int4 is None:
            return self.product(x, self.weight, self.bias)
        y = self.int4.matmul(x)
        return y if self.bias is None else y + self.bias


class RowParallelLinear(nn.Module):
    """y = x W^T with W's columns (input features) split over ranks, then an all-reduce.
    `product`: as ColumnParallelLinear's."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TensorParallel,
                 product: Callable = F.linear):
        super().__init__()
        self.tp = tp
        self.product = product
        self.start, self.local_in = tp.piece(in_features, tp.world_size)
        self.weight = nn.Parameter(torch.empty(out_features, self.local_in), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.int4: Int4Weight | None = None

    def load_shard(self, param: nn.Parameter, full, index: int = 0) -> None:
        if param is self.bias:  # the bias is added once, after the reduction
            param.data.copy_(weights.read(full))
            return
        columns = full.narrow(1, self.start, self.local_in)
        if isinstance(columns, Int4Groups):
            self.int4, self.weight = Int4Weight(columns), None
        else:
            param.data.copy_(columns)

    def finish_loading(self) -> None:
        pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.product(x, self.weight) if self.int4 is None else self.int4.matmul(x)
        y = self.tp.all_reduce(y)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Embedding rows split over ranks (the last rank's padded with zeros when the vocabulary
    does not divide); each rank looks up its own ids, then an all-reduce."""

    def __init__(self, vocab_size: int, dim: int, tp: TensorParallel):
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.local_vocab = tp.padded(vocab_size)
        self.start = tp.rank * self.local_vocab
        # Rows of real tokens on this rank; the rest (padding) stay zero.
        self.real_rows = max(0, min(self.local_vocab, vocab_size - self.start))
        self.weight = nn.Parameter(torch.zeros(self.local_vocab, dim), requires_grad=False)

    def load_shard(self, param: nn.Parameter, full, index: int = 0) -> None:
        if self.real_rows:
            param.data[:self.real_rows].copy_(full.narrow(0, self.start, self.real_rows))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.world_size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.local_vocab)
        y = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.tp.all_reduce(y.masked_fill(outside.unsqueeze(-1), 0))


class ParallelLMHead(VocabParallelEmbedding):
    """Logits for this rank's slice of the vocabulary, gathered into the whole vocabulary (the
    padding's columns dropped). `product`: F.linear's signature and `out=` (ops.linear_into's),
    for its own weight."""

    # A bfloat16 copy of the weight used for the product, when set (next to int4 layers).
    compute_weight: torch.Tensor | None = None

    def __init__(self, vocab_size: int, dim: int, tp: TensorParallel, product: Callable):
        super().__init__(vocab_size, dim, tp)
        self.product = product

    def forward(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """out: where the whole vocabulary's logits go (the decode graphs' shared buffer); one
        rank with its own weight writes them there directly, saving a copy of [rows, vocab]."""
        if out is not None and self.compute_weight is None and self.tp.world_size == 1:
            return self.product(hidden, self.weight, out=out)
        if self.compute_weight is None:
            logits = self.product(hidden, self.weight)
        else:
            logits = F.linear(hidden.to(self.compute_weight.dtype), self.compute_weight)
            logits = logits.to(hidden.dtype)
        logits = self.tp.all_gather_last_dim(logits)
        if logits.shape[-1] != self.vocab_size:
            logits = logits[..., :self.vocab_size]
        return logits if out is None else out.copy_(logits)
