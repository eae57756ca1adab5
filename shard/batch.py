"""One step's tensors: token ids, positions, cu_seqlens, block tables and slot mapping.

Built from the step's plan (shard/plan.py) by every rank alike. Tokens are laid out ragged,
with no padding: first one token per decoding sequence, then the prefill chunks. Everything is
computed with tensor ops over the plan's arrays, never a Python object per sequence or token.

A decoding sequence's input token is the one it sampled last, read on the device from
`last_tokens` (one row per slot, written by sampling): the host need not have seen it yet, so
a step can be planned and launched while the previous one still runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shard.attention import StepLayout
from shard.plan import StepPlan


@dataclass(slots=True)
class StepBatch:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    layout: StepLayout
    sample_rows: torch.Tensor  # [S] row of each sampling sequence's last token
    sample_slots: torch.Tensor  # [S] slot of each sampling sequence: where its token goes
    sample_positions: list[int]  # position of the token each sampler is about to produce
    prompt_rows: torch.Tensor | None  # [R] rows that score prompt tokens; None: no such row


def build(plan: StepPlan, block_tables: torch.Tensor, block_size: int, device: torch.device,
          last_tokens: torch.Tensor) -> StepBatch:
    """block_tables: [slots, max_blocks] int32 on the host; last_tokens: [slots] on `device`,
    each running sequence's latest sampled token."""
    nd, slots, starts, lengths = plan.num_decodes, plan.slots, plan.starts, plan.lengths
    tables = block_tables.index_select(0, slots)
    cu_seqlens = torch.zeros(plan.num_sequences + 1, dtype=torch.long)
    torch.cumsum(lengths, 0, out=cu_seqlens[1:])
    if plan.num_prefills:
        row_owner = torch.arange(plan.num_sequences).repeat_interleave(lengths)
        positions = (starts.repeat_interleave(lengths) + torch.arange(row_owner.shape[0])
                     - cu_seqlens[:-1].repeat_interleave(lengths))
        input_ids = torch.cat([torch.zeros(nd, dtype=torch.long), plan.prefill_ids])
    else:  # decodes only: a row per sequence (positions a tensor of this step's own: an
        # inference tensor like the rest, which compiled stages guard on)
        row_owner, positions = torch.arange(nd), starts.clone()
        input_ids = torch.zeros(nd, dtype=torch.long)  # filled on the device below
    slot_mapping = (tables[row_owner, positions // block_size].long() * block_size
                    + positions % block_size)
    context = starts + lengths
    sampling = plan.samples.bool()
    sample_rows = cu_seqlens[1:][sampling] - 1
    sample_slots = slots[sampling]
    prompt_rows = _prompt_rows(plan.scored, cu_seqlens)
    (input_ids, positions, slot_mapping, sample_rows, sample_slots, cu_seqlens_q, seqused_k,
     tables, *prompt_rows) = to_device(
        device, input_ids, positions, slot_mapping, sample_rows, sample_slots,
        cu_seqlens.int(), context.int(), tables, *prompt_rows)
    if nd:  # decodes are the first samplers
        torch.index_select(last_tokens, 0, sample_slots[:nd], out=input_ids[:nd])
    layout = StepLayout(
        num_decodes=nd,
        query_starts=cu_seqlens.tolist(),
        context_lens=context.tolist(),
        cu_seqlens_q=cu_seqlens_q,
        seqused_k=seqused_k,
        block_table=tables,
        slot_mapping=slot_mapping,
        block_size=block_size,
    )
    return StepBatch(
        input_ids=input_ids,
        positions=positions,
        layout=layout,
        sample_rows=sample_rows,
        sample_slots=sample_slots,
        sample_positions=context[sampling].tolist(),
        prompt_rows=prompt_rows[0] if prompt_rows else None,
    )


def _prompt_rows(scored: torch.Tensor, cu_seqlens: torch.Tensor) -> list[torch.Tensor]:
    """[rows] that score prompt tokens: a chunk's first `scored` rows, chunk after chunk; or
    nothing when no sequence asked for prompt logprobs."""
    if not scored.any():
        return []
    owner = torch.arange(scored.shape[0]).repeat_interleave(scored)
    first = torch.cumsum(scored, 0) - scored
    return [cu_seqlens[:-1][owner] + torch.arange(owner.shape[0]) - first[owner]]


ALIGN = 16  # bytes


def to_device(device: torch.device, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """The step's integer tensors on `device`, in one copy from pinned memory that does not
    wait for the GPU (a copy from pageable memory waits for all queued work)."""
    if device.type == "cpu":
        return list(tensors)
    packed, starts = pack(tensors)
    return unpack(packed.pin_memory().to(device, non_blocking=True), starts, tensors)


def pack(tensors) -> tuple[torch.Tensor, list[int]]:
    """The tensors' bytes in one uint8 tensor, and where each starts: 16 bytes aligned, since
    Triton specializes a kernel on whether each pointer argument is (a step whose first tensor
    had an odd length compiled _rotary_cache_kernel again mid-run: ~170 ms, on the H200)."""
    parts, starts, offset = [], [], 0
    for t in tensors:
        data = t.contiguous().view(-1).view(torch.uint8)
        parts.append(data)
        pad = -data.numel() % ALIGN
        if pad:
            parts.append(torch.zeros(pad, dtype=torch.uint8))
        starts.append(offset)
        offset += data.numel() + pad
    return torch.cat(parts), starts


def unpack(packed: torch.Tensor, starts: list[int], like) -> list[torch.Tensor]:
    """Views of `packed` with the dtypes and shapes of `like`: on the device no kernel converts
    them (each int32 tensor sent as int64 took one)."""
    return [packed[start:start + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
            for start, t in zip(starts, like)]
