"""One step's tensors: token ids, positions, cu_seqlens, block tables and slot mapping.

Tokens are laid out ragged, with no padding: first one token per decoding sequence, then the
prefill chunks. Per-sequence values come from Python ints; per-token values (prefill chunks)
are built with tensor ops, never a Python object per token.

A decoding sequence's input token is the one it sampled last, read on the device from
`last_tokens` (one row per slot, written by sampling): the host need not have seen it yet, so
a step can be planned and launched while the previous one still runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shard.attention import StepLayout
from shard.scheduler import Sequence, Step


@dataclass(slots=True)
class PromptRows:
    """The rows whose logits score the next prompt token, for sequences that asked for them."""

    rows: torch.Tensor  # [R] rows of the step's tokens, on the device
    targets: torch.Tensor  # [R] the prompt token each row predicts, on the device
    owners: list[tuple[Sequence, int]]  # (sequence, its number of rows), in row order


@dataclass(slots=True)
class StepBatch:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    layout: StepLayout
    sample_rows: torch.Tensor  # [S] row of each sampling sequence's last token
    sample_slots: torch.Tensor  # [S] slot of each sampling sequence: where its token goes
    samplers: list[Sequence]
    sample_positions: list[int]  # position of the token each sampler is about to produce
    prompt_rows: PromptRows | None = None  # None unless a prefill asked for prompt logprobs


def build(step: Step, block_tables: torch.Tensor, block_size: int, device: torch.device,
          last_tokens: torch.Tensor) -> StepBatch:
    """last_tokens: [slots] on `device`, each running sequence's latest sampled token."""
    decodes, prefills = step.decodes, step.prefills
    seqs = decodes + [s for s, _ in prefills]
    slots = torch.tensor([s.slot for s in seqs], dtype=torch.long)
    tables = block_tables.index_select(0, slots)

    ids_parts = [torch.zeros(len(decodes), dtype=torch.long)]  # filled on the device below
    pos_parts = [torch.tensor([s.num_cached for s in decodes], dtype=torch.long)]
    # A decode's one slot from Python ints; prefill chunks' slots with tensor ops.
    slot_parts = [torch.tensor([s.blocks[s.num_cached // block_size] * block_size +
                                s.num_cached % block_size for s in decodes], dtype=torch.long)]
    lengths = [1] * len(decodes)
    for i, (seq, n) in enumerate(prefills, start=len(decodes)):
        ids_parts.append(seq.prompt[seq.num_cached:seq.num_cached + n])
        positions = torch.arange(seq.num_cached, seq.num_cached + n)
        pos_parts.append(positions)
        slot_parts.append(tables[i, positions // block_size].long() * block_size +
                          positions % block_size)
        lengths.append(n)
    input_ids = torch.cat(ids_parts)
    positions = torch.cat(pos_parts)
    slot_mapping = torch.cat(slot_parts)

    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    context_lens = [s.num_cached + n for s, n in zip(seqs, lengths)]

    # Decodes always sample; a prefill samples once its chunk reaches the end of the prompt.
    sample_index = list(range(len(decodes))) + [
        i for i, (s, n) in enumerate(prefills, start=len(decodes))
        if s.num_cached + n == s.prompt_len]
    # long even when empty: a step of only unfinished prefill chunks samples nothing.
    sample_rows = torch.tensor([starts[i + 1] - 1 for i in sample_index], dtype=torch.long)
    sample_slots = torch.tensor([seqs[i].slot for i in sample_index], dtype=torch.long)
    (input_ids, positions, slot_mapping, sample_rows, sample_slots, cu_seqlens_q, seqused_k,
     tables) = to_device(
        device, input_ids, positions, slot_mapping, sample_rows, sample_slots,
        torch.tensor(starts, dtype=torch.int32), torch.tensor(context_lens, dtype=torch.int32),
        tables)
    if decodes:  # decodes are the first samplers
        torch.index_select(last_tokens, 0, sample_slots[:len(decodes)],
                           out=input_ids[:len(decodes)])
    layout = StepLayout(
        num_decodes=len(decodes),
        query_starts=starts,
        context_lens=context_lens,
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
        samplers=[seqs[i] for i in sample_index],
        sample_positions=[context_lens[i] for i in sample_index],
        prompt_rows=_prompt_rows(prefills, starts[len(decodes):], device),
    )


ALIGN_INT64 = 2  # 16 bytes


def to_device(device: torch.device, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """The step's integer tensors on `device`, in one copy from pinned memory that does not
    wait for the GPU (a copy from pageable memory waits for all queued work)."""
    if device.type == "cpu":
        return list(tensors)
    parts, starts, offset = [], [], 0
    for t in tensors:
        # Each tensor starts 16 bytes aligned: Triton specializes a kernel on whether each
        # pointer argument is, so a step whose first tensor had an odd length compiled
        # _rotary_cache_kernel again mid-run (~170 ms; docs/benchmarks.md, eleventh session).
        pad = -t.numel() % ALIGN_INT64
        parts.append(t.reshape(-1).to(torch.int64))
        if pad:
            parts.append(torch.zeros(pad, dtype=torch.int64))
        starts.append(offset)
        offset += t.numel() + pad
    on_device = torch.cat(parts).pin_memory().to(device, non_blocking=True)
    return [on_device[start:start + t.numel()].view(t.shape).to(t.dtype)
            for start, t in zip(starts, tensors)]


def _prompt_rows(prefills: list[tuple[Sequence, int]], starts: list[int],
                 device: torch.device) -> PromptRows | None:
    """Row j of a chunk starting at prompt position c predicts prompt token c + j + 1; the row
    of the prompt's last token predicts the first generated token, which sampling scores."""
    rows, targets, owners = [], [], []
    for (seq, n), start in zip(prefills, starts):
        if not seq.prefill_logprobs:
            continue
        count = min(seq.num_cached + n, seq.prompt_len - 1) - seq.num_cached
        if count > 0:
            rows.append(torch.arange(start, start + count))
            targets.append(seq.prompt[seq.num_cached + 1:seq.num_cached + 1 + count])
            owners.append((seq, count))
    if not owners:
        return None
    return PromptRows(torch.cat(rows).to(device), torch.cat(targets).to(device), owners)
