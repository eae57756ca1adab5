"""Attention over the paged KV cache: one interface, chosen once at start.

Every backend reads and writes the same layout: per layer, `k_cache` and `v_cache` of shape
[num_blocks, block_size, num_kv_heads, head_dim]; token t of a sequence lives in block
`block_table[t // block_size]` at offset `t % block_size`.

A step is one ragged batch: the first `num_decodes` sequences bring one new token each, the
rest bring prefill chunks. `prepare` turns the step's layout into whatever the backend's kernels
need, once per step; `forward` runs once per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(slots=True)
class StepLayout:
    """Where a step's tokens come from and go to; all tensors already on the device."""

    num_decodes: int
    query_starts: list[int]  # host copy of cu_seqlens_q: sequence i owns rows [s_i, s_{i+1})
    context_lens: list[int]  # host copy: tokens in cache for each sequence after this step
    cu_seqlens_q: torch.Tensor  # [B + 1] int32
    seqused_k: torch.Tensor  # [B] int32
    block_table: torch.Tensor  # [B, max_blocks] int32
    slot_mapping: torch.Tensor  # [T] int64: cache slot of each new token
    block_size: int

    @property
    def max_query_len(self) -> int:
        return max(b - a for a, b in zip(self.query_starts, self.query_starts[1:]))

    @property
    def max_context_len(self) -> int:
        return max(self.context_lens)


@dataclass(slots=True)
class _Prefill:
    rows: slice  # this sequence's query rows in the step
    slots: torch.Tensor  # [context_len] cache slots of its whole context
    causal_mask: torch.Tensor | None  # None when the chunk is the whole context


@dataclass(slots=True)
class TorchMetadata:
    slot_mapping: torch.Tensor
    num_decodes: int
    decode_slots: torch.Tensor | None  # [num_decodes, max_context] slots; past its end: its first
    decode_mask: torch.Tensor | None  # [num_decodes, 1, 1, max_context] True where attended
    prefills: list[_Prefill]


def _context_slots(block_table: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    """Cache slots of positions 0..length-1 for each row of `block_table`: [rows, length]."""
    positions = torch.arange(length, device=block_table.device)
    blocks = block_table[:, positions // block_size].long()
    return blocks * block_size + positions % block_size


class TorchAttention:
    """Plain PyTorch over the pages: gather each sequence's context, then SDPA.

    Decodes share one batched SDPA call (padded to the longest context, masked); each prefill
    chunk gets its own call, causal with its offset in the context.
    """

    name = "torch"

    def prepare(self, layout: StepLayout) -> TorchMetadata:
        nd = layout.num_decodes
        decode_slots = decode_mask = None
        if nd:
            lens = layout.seqused_k[:nd]
            longest = max(layout.context_lens[:nd])
            slots = _context_slots(layout.block_table[:nd], longest, layout.block_size)
            inside = torch.arange(longest, device=lens.device) < lens[:, None]
            # Padding reads the sequence's own first slot, never another's: masked scores still
            # multiply the values they skip by 0, and 0 × a foreign NaN would leak.
            decode_slots = torch.where(inside, slots, slots[:, :1])
            decode_mask = inside[:, None, None, :]
        prefills = []
        for i in range(nd, len(layout.context_lens)):
            start, end = layout.query_starts[i], layout.query_starts[i + 1]
            context = layout.context_lens[i]
            slots = _context_slots(layout.block_table[i:i + 1], context, layout.block_size)[0]
            mask = None
            if end - start != context:  # a later chunk: it also sees the cached earlier ones
                q_pos = torch.arange(context - (end - start), context, device=slots.device)
                mask = torch.arange(context, device=slots.device)[None, :] <= q_pos[:, None]
            prefills.append(_Prefill(slice(start, end), slots, mask))
        return TorchMetadata(layout.slot_mapping, nd, decode_slots, decode_mask, prefills)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: TorchMetadata) -> torch.Tensor:
        """q: [T, Hq, D]; k, v: [T, Hkv, D] for the step's new tokens. Returns [T, Hq, D]."""
        heads, dim = k_cache.shape[-2:]
        flat_k = k_cache.view(-1, heads, dim)
        flat_v = v_cache.view(-1, heads, dim)
        flat_k.index_copy_(0, meta.slot_mapping, k)
        flat_v.index_copy_(0, meta.slot_mapping, v)
        out = torch.empty_like(q)
        nd = meta.num_decodes
        if nd:
            keys = flat_k[meta.decode_slots].transpose(1, 2)  # [nd, Hkv, ctx, D]
            values = flat_v[meta.decode_slots].transpose(1, 2)
            out[:nd] = F.scaled_dot_product_attention(
                q[:nd].unsqueeze(2), keys, values, attn_mask=meta.decode_mask, enable_gqa=True,
            ).squeeze(2)
        for p in meta.prefills:
            keys = flat_k[p.slots].transpose(0, 1).unsqueeze(0)  # [1, Hkv, ctx, D]
            values = flat_v[p.slots].transpose(0, 1).unsqueeze(0)
            query = q[p.rows].transpose(0, 1).unsqueeze(0)  # [1, Hq, L, D]
            result = F.scaled_dot_product_attention(
                query, keys, values, attn_mask=p.causal_mask, is_causal=p.causal_mask is None,
                enable_gqa=True)
            out[p.rows] = result[0].transpose(0, 1)
        return out


def select_backend(requested: str, device: torch.device):
    """The backend for --attention: 'torch' always works; 'flash' needs its kernels."""
    if requested == "flash":
        raise ValueError("--attention flash needs the FlashAttention kernels on a CUDA GPU; "
                         "they are not available here (use --attention torch)")
    return TorchAttention()
