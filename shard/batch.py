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
    slot_mapping = _slot_mapping(tables, row_owner, positions, block_size)
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


@dataclass(slots=True)
class Staging:
    """Where a decode graph of `size` rows reads its step's tensors (shard/cuda_graphs.py):
    their bytes in one device buffer, laid out as pack() lays out decode_tensors(size), and
    the views of it the graph was captured with. A step of n <= size decodes sends its
    tensors padded to `size` rows straight into the buffer (build): no copy into the graph's
    inputs, no fill of the padding, on the device. Padding rows decode a dummy token whose
    K/V land in the scratch block, with a context of one token; they read their input token
    from, and the greedy graphs write their pick to, `padding_slot`: a slot past the
    sequences' own."""

    size: int
    buffer: torch.Tensor  # uint8
    starts: list[int]
    scratch_block: int
    block_size: int
    padding_slot: int
    positions: torch.Tensor  # [size] int64
    slot_mapping: torch.Tensor  # [size] int64
    sample_slots: torch.Tensor  # [size] int64: where each row's input token is read
    seqused_k: torch.Tensor  # [size] int32
    block_table: torch.Tensor  # [size, max_blocks] int32
    input_ids: torch.Tensor  # [size]: written by the graph from the last tokens
    cu_seqlens_q: torch.Tensor  # [size + 1]: 0..size
    rows: torch.Tensor  # [size]: 0..size-1

    @classmethod
    def allocate(cls, size: int, max_blocks: int, scratch_block: int, block_size: int,
                 padding_slot: int, input_ids: torch.Tensor, cu_seqlens_q: torch.Tensor,
                 device: torch.device) -> "Staging":
        """A buffer holding a step of padding alone; input_ids and cu_seqlens_q [size + 1]
        (0..size) are the graph's own."""
        empty = decode_tensors(size, max_blocks, scratch_block, block_size, padding_slot)
        packed, starts = pack(empty)
        buffer = packed.to(device)
        views = unpack(buffer, starts, empty)
        return cls(size, buffer, starts, scratch_block, block_size, padding_slot, *views,
                   input_ids, cu_seqlens_q, cu_seqlens_q[:size])


def decode_tensors(size: int, max_blocks: int, scratch_block: int, block_size: int,
                   padding_slot: int, slots: torch.Tensor | None = None,
                   positions: torch.Tensor | None = None, tables: torch.Tensor | None = None
                   ) -> list[torch.Tensor]:
    """A decode step's tensors as a Staging of `size` rows holds them (positions, slot
    mapping, sample slots, context lengths, block tables), on the host: its sequences' (slots,
    positions and block tables of n <= size) in the first n rows, padding after them."""
    n = 0 if slots is None else slots.shape[0]
    out_positions = torch.zeros(size, dtype=torch.long)
    slot_mapping = torch.full((size,), scratch_block * block_size, dtype=torch.long)
    sample_slots = torch.full((size,), padding_slot, dtype=torch.long)
    context = torch.ones(size, dtype=torch.int32)
    block_table = torch.zeros(size, max_blocks, dtype=torch.int32)
    block_table[n:, 0] = scratch_block
    if n:
        out_positions[:n] = positions
        slot_mapping[:n] = _slot_mapping(tables, torch.arange(n), positions, block_size)
        sample_slots[:n] = slots
        context[:n] = positions + 1
        block_table[:n] = tables
    return [out_positions, slot_mapping, sample_slots, context, block_table]


def build_staged(plan: StepPlan, block_tables: torch.Tensor, staging: Staging) -> StepBatch:
    """A decode-only step's batch, its tensors sent into `staging` (n <= staging.size): views
    of it, and of the graph's input ids, which the graph itself reads from the last tokens."""
    n, slots, positions = plan.num_decodes, plan.slots, plan.starts
    assert plan.num_prefills == 0 and n <= staging.size
    tables = block_tables.index_select(0, slots)
    host = decode_tensors(staging.size, tables.shape[1], staging.scratch_block,
                          staging.block_size, staging.padding_slot, slots, positions, tables)
    packed, starts = pack(host)
    assert starts == staging.starts and packed.shape == staging.buffer.shape
    if staging.buffer.device.type == "cuda":  # from pinned memory: the copy does not wait
        packed = packed.pin_memory()
    staging.buffer.copy_(packed, non_blocking=True)
    context = positions + 1
    layout = StepLayout(
        num_decodes=n,
        query_starts=list(range(n + 1)),
        context_lens=context.tolist(),
        cu_seqlens_q=staging.cu_seqlens_q[:n + 1],
        seqused_k=staging.seqused_k[:n],
        block_table=staging.block_table[:n],
        slot_mapping=staging.slot_mapping[:n],
        block_size=staging.block_size,
    )
    return StepBatch(
        input_ids=staging.input_ids[:n],
        positions=staging.positions[:n],
        layout=layout,
        sample_rows=staging.rows[:n],
        sample_slots=staging.sample_slots[:n],
        sample_positions=context.tolist(),
        prompt_rows=None,
    )


def _slot_mapping(tables: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor,
                  block_size: int) -> torch.Tensor:
    """The cache slot of each token: its row's block table (`rows` index `tables`) at its
    position's block."""
    return (tables[rows, positions // block_size].long() * block_size
            + positions % block_size)


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
