"""How many tokens the KV cache holds, and the per-request limits that follow from it."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from shard.attention import StepLayout
from shard.config import ShardConfig
from shard.kv_cache import KVCache, blocks_for, bytes_per_token
from shard.models.config import ModelConfig
from shard.sampling import Sampler, SamplingParams

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


def size(config: ShardConfig, model: ModelConfig, dtype: torch.dtype, cache_bytes: int,
         num_shards: int = 1) -> Budget:
    """The budget in blocks, and max_input/max_total tokens that fit inside it; cache_bytes is
    one rank's (each holds its share of every token's keys and values)."""
    block = config.block_size
    if config.max_batch_total_tokens is not None:
        tokens = config.max_batch_total_tokens
    else:
        tokens = cache_bytes // bytes_per_token(model, num_shards, dtype)
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


def eager_forward(model, attention, tokens: int, config: ShardConfig, dtype: torch.dtype,
                  device: torch.device) -> torch.Tensor:
    """Hidden states of one prompt of `tokens` ids, run eagerly (no CUDA graph) over a KV cache
    of its own, which is dropped after."""
    block = config.block_size
    num_blocks = blocks_for(tokens, block)
    kv_cache = KVCache(model.config, model.lm_head.tp.world_size, num_blocks, block, dtype,
                       device)
    layout = StepLayout(
        num_decodes=0, query_starts=[0, tokens], context_lens=[tokens],
        cu_seqlens_q=torch.tensor([0, tokens], dtype=torch.int32, device=device),
        seqused_k=torch.tensor([tokens], dtype=torch.int32, device=device),
        block_table=torch.arange(num_blocks, dtype=torch.int32, device=device)[None],
        slot_mapping=torch.arange(tokens, device=device), block_size=block)
    with torch.inference_mode():
        # The same ids on every rank: under tensor parallelism they run one forward together.
        ids = torch.arange(tokens, device=device) % model.config.vocab_size
        return model(ids, torch.arange(tokens, device=device), kv_cache.layers,
                     attention.prepare(layout))


def profile_peak_bytes(model, attention, config: ShardConfig, dtype: torch.dtype,
                       device: torch.device) -> int:
    """Peak CUDA memory of the weights plus the largest step the engine may run: a prefill of
    max_batch_prefill_tokens, and sampling with top-p (a sort) over max_batch_size rows."""
    tokens = min(config.max_batch_prefill_tokens, model.config.max_position_embeddings)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    rows = config.max_batch_size
    sampler = Sampler(model.config.vocab_size, rows, device)
    hidden = eager_forward(model, attention, tokens, config, dtype, device)
    with torch.inference_mode():
        logits = model.compute_logits(hidden[-1:].expand(rows, -1).contiguous()).float()
        sampler(logits, [SamplingParams(temperature=1.0, top_p=0.9)] * rows, list(range(rows)),
                [tokens] * rows, top_n=0)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del hidden, logits
    torch.cuda.empty_cache()
    return peak
