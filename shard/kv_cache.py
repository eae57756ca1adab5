"""The paged KV cache and the allocator of its blocks, which is the token budget.

A request reserves all the blocks it can ever need (prompt + max_new_tokens) once, at
admission, and returns them when it ends: no preemption, no out-of-memory mid-generation.
"""

from __future__ import annotations

import torch

from shard.models.config import ModelConfig


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


def local_kv_heads(config: ModelConfig, num_shards: int) -> int:
    """Key/value heads one rank holds: its share, or one shared with other ranks when the
    model has fewer than the ranks (shard/models/llama.py)."""
    return config.num_kv_heads // min(config.num_kv_heads, num_shards)


def bytes_per_token(config: ModelConfig, num_shards: int, dtype: torch.dtype) -> int:
    """KV-cache bytes one token takes on one rank (K and V, every layer)."""
    kv_heads = local_kv_heads(config, num_shards)
    return 2 * config.num_layers * kv_heads * config.head_dim * dtype.itemsize


class BlockAllocator:
    """Free list of block ids; the budget in tokens is free blocks × block size."""

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def free_tokens(self) -> int:
        return len(self._free) * self.block_size

    @property
    def total_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def allocate(self, count: int) -> list[int] | None:
        """`count` blocks, or None (and nothing taken) when fewer are free."""
        if count > len(self._free):
            return None
        taken = self._free[-count:] if count else []
        del self._free[len(self._free) - count:]
        return taken[::-1]

    def release(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


class KVCache:
    """Per layer, K and V pages of shape [num_blocks, block_size, kv_heads, head_dim]."""

    def __init__(self, config: ModelConfig, num_shards: int, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device):
        kv_heads = local_kv_heads(config, num_shards)
        shape = (config.num_layers, 2, num_blocks, block_size, kv_heads, config.head_dim)
        # Zeros, not empty: padded reads in attention must never meet NaN garbage.
        self.storage = torch.zeros(shape, dtype=dtype, device=device)
        self.layers = [(self.storage[i, 0], self.storage[i, 1]) for i in range(config.num_layers)]
