"""CUDA graphs for decode steps: one replay instead of ~15 kernel launches per layer.

A decode-only step of n sequences runs the graph captured for the smallest batch size >= n.
Its inputs are copied into static buffers; rows n.. of the padded batch decode a dummy token
whose K/V land in a scratch block that belongs to no request, with a context of one token.
Graphs need attention metadata of fixed shape: only the flash backend provides it.
"""

from __future__ import annotations

import logging

import torch

from shard.attention import StepLayout
from shard.batch import StepBatch

log = logging.getLogger(__name__)


def parse_batch_sizes(spec: str, max_batch_size: int) -> list[int]:
    """'1,2,4,8' → sizes; '0' or '' → none; 'auto' → 1, 2, 4, 8 then steps of 8..32 up to max."""
    spec = spec.strip()
    if spec in ("", "0", "none"):
        return []
    if spec == "auto":
        sizes = [1, 2, 4] + list(range(8, 64, 8)) + list(range(64, 256, 16)) + list(
            range(256, 1025, 32))
    else:
        sizes = [int(part) for part in spec.split(",") if part.strip()]
    if any(size < 1 for size in sizes):
        raise ValueError(f"--cuda-graphs: batch sizes must be positive, got {spec!r}")
    return sorted({size for size in sizes if size <= max_batch_size} | (
        {max_batch_size} if spec == "auto" else set()))


class DecodeGraphs:
    def __init__(self, model, kv_cache, attention, batch_sizes: list[int], max_blocks: int,
                 block_size: int, scratch_block: int, device: torch.device):
        self.model = model
        self.kv_cache = kv_cache
        self.batch_sizes = sorted(batch_sizes)
        largest = self.batch_sizes[-1]
        self.scratch_block = scratch_block
        self.scratch_slot = scratch_block * block_size
        self.input_ids = torch.zeros(largest, dtype=torch.long, device=device)
        self.positions = torch.zeros(largest, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((largest,), self.scratch_slot, dtype=torch.long,
                                       device=device)
        self.seqused_k = torch.ones(largest, dtype=torch.int32, device=device)
        self.block_table = torch.full((largest, max_blocks), scratch_block, dtype=torch.int32,
                                      device=device)
        # Graphs hold raw pointers: every tensor a capture reads must stay referenced here.
        self.cu_seqlens_q = torch.arange(largest + 1, dtype=torch.int32, device=device)
        self._metadata = []
        # One output buffer for all graphs (each graph's own would cost vocab x size each).
        self.logits = torch.empty(largest, model.config.vocab_size,
                                  dtype=next(model.parameters()).dtype, device=device)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.batch_sizes):  # the largest first: the others reuse its pool
            layout = StepLayout(size, list(range(size + 1)), [1] * size,
                                self.cu_seqlens_q[:size + 1],
                                self.seqused_k[:size], self.block_table[:size],
                                self.slot_mapping[:size], block_size)
            meta = attention.prepare(layout)
            self._metadata.append(meta)

            def decode(size=size, meta=meta):
                hidden = model(self.input_ids[:size], self.positions[:size], kv_cache.layers,
                               meta)
                self.logits[:size].copy_(model.compute_logits(hidden))

            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.inference_mode():
                with torch.cuda.stream(side):  # warm up: kernels compile, allocator settles
                    decode()
                    decode()
                torch.cuda.current_stream(device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    decode()
            self._graphs[size] = graph
        log.info("captured CUDA graphs for decode batch sizes %s", self.batch_sizes)

    def fits(self, num_decodes: int) -> bool:
        return num_decodes <= self.batch_sizes[-1]

    def replay(self, batch: StepBatch) -> torch.Tensor:
        """Logits [n, vocab] of a decode-only step of n sequences."""
        n = batch.layout.num_decodes
        size = next(s for s in self.batch_sizes if s >= n)
        layout = batch.layout
        self.input_ids[:n].copy_(batch.input_ids)
        self.positions[:n].copy_(batch.positions)
        self.slot_mapping[:n].copy_(layout.slot_mapping)
        self.seqused_k[:n].copy_(layout.seqused_k)
        self.block_table[:n, :layout.block_table.shape[1]].copy_(layout.block_table)
        if size > n:  # rows a bigger step left behind become padding again
            self.slot_mapping[n:size].fill_(self.scratch_slot)
            self.seqused_k[n:size].fill_(1)
            self.block_table[n:size, 0].fill_(self.scratch_block)
        self._graphs[size].replay()
        return self.logits[:n]
