"""How many tokens the KV cache holds, and the per-request limits that follow from it."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from shard.config import ShardConfig
from shard.kv_cache import bytes_per_token
from shard.models.config import ModelConfig

log = logging.getLogger(__name__)


@dataclass(slots=True, frozen=True)
class Budget:
    num_blocks: int
    block_size: int
    max_input_tokens: int
    max_total_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.num_blocks * self.block_size


def kv_cache_bytes(config: ShardConfig, device: torch.device, reserved_bytes: int) -> int:
    """Memory the KV cache may take: the CPU allowance, or the GPU share not yet in use.

    `reserved_bytes` is the peak this process used for weights and its largest step (measured
    by the warm-up), which stays reserved.
    """
    if device.type == "cpu":
        return int(config.cpu_kv_cache_gib * 2**30)
    free, total = torch.cuda.mem_get_info(device)
    used_by_others = total - free - torch.cuda.memory_reserved(device)
    return int(total * config.cuda_memory_fraction) - used_by_others - reserved_bytes


def size(config: ShardConfig, model: ModelConfig, dtype: torch.dtype, cache_bytes: int) -> Budget:
    """The budget in blocks, and max_input/max_total tokens that fit inside it."""
    block = config.block_size
    if config.max_batch_total_tokens is not None:
        tokens = config.max_batch_total_tokens
    else:
        tokens = cache_bytes // bytes_per_token(model, config.num_shard, dtype)
    num_blocks = tokens // block
    if num_blocks < 1:
        raise ValueError(f"the KV-cache budget ({tokens} tokens) holds not even one block of "
                         f"{block}; give the shard more memory or --max-batch-total-tokens")
    capacity = num_blocks * block
    max_total = config.max_total_tokens or min(model.max_position_embeddings, 4096)
    if max_total > capacity:
        if config.max_total_tokens is not None:
            raise ValueError(f"--max-total-tokens {max_total} exceeds the KV-cache budget of "
                             f"{capacity} tokens")
        log.warning("max_total_tokens lowered from %d to the budget, %d tokens", max_total, capacity)
        max_total = capacity
    max_input = config.max_input_tokens or min(max_total - 1, model.max_position_embeddings - 1)
    if max_input >= max_total:
        raise ValueError(f"--max-input-tokens ({max_input}) must be below max_total_tokens "
                         f"({max_total})")
    if max_total > model.max_position_embeddings:
        raise ValueError(f"max_total_tokens ({max_total}) exceeds the model's context "
                         f"({model.max_position_embeddings})")
    return Budget(num_blocks, block, max_input, max_total)
