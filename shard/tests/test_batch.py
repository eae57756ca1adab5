"""A step's integer tensors on their way to the device (shard/batch.py): one buffer of bytes,
one copy, and views of it with each tensor's own dtype and shape."""

from __future__ import annotations

import torch

from shard.batch import Staging, build, build_staged, pack, unpack
from shard.plan import StepPlan

CPU = torch.device("cpu")


def test_step_tensors_travel_as_their_own_bytes_and_arrive_as_views_of_one_buffer():
    """Each tensor starts 16 bytes aligned (Triton specializes on pointer alignment) and comes
    back as a view of the one buffer, with its dtype: on the device no kernel converts it."""
    sent = [torch.arange(3), torch.arange(7, dtype=torch.int32),
            torch.arange(10, 16, dtype=torch.int32).view(2, 3), torch.arange(1),
            torch.zeros(0, dtype=torch.int32), torch.tensor([-5, 2**40])]
    packed, starts = pack(sent)
    assert packed.dtype == torch.uint8
    assert starts == [0, 32, 64, 96, 112, 112]
    arrived = unpack(packed, starts, sent)
    for tensor, view in zip(sent, arrived):
        assert view.dtype == tensor.dtype and torch.equal(view, tensor)
        assert view.untyped_storage().data_ptr() == packed.untyped_storage().data_ptr()
        assert view.data_ptr() % 16 == 0


def decode_plan(slots: list[int], starts: list[int]) -> StepPlan:
    n = len(slots)
    none = torch.zeros(0, dtype=torch.long)
    return StepPlan(torch.zeros(0, dtype=torch.long), n, 0, torch.tensor(slots),
                    torch.tensor(starts), torch.ones(n, dtype=torch.long),
                    torch.ones(n, dtype=torch.long), torch.zeros(n, dtype=torch.long), none,
                    none, none, none, None)


def test_a_decode_step_staged_for_its_graph_is_the_plain_batch_padded_in_place():
    """A decode graph's step (batch.build_staged): its rows hold what batch.build gives the
    same plan, the rows past them padding (the scratch block's slot, a context of one, the
    padding slot's token), all views of the graph's one buffer; a smaller step after a bigger one makes
    the bigger one's rows padding again."""
    block_size, scratch = 16, 9
    tables = torch.randint(0, 9, (4, 6), generator=torch.Generator().manual_seed(0),
                           dtype=torch.int32)
    staging = Staging.allocate(4, 6, scratch, block_size, 4, torch.zeros(8, dtype=torch.long),
                               torch.arange(9, dtype=torch.int32), CPU)
    last_tokens = torch.tensor([11, 12, 13, 14, 0])  # slot 4: the padding's
    for slots, starts in (([2, 0, 3], [37, 5, 80]), ([1], [17])):
        plan = decode_plan(slots, starts)
        staged = build_staged(plan, tables, staging)
        plain = build(plan, tables, block_size, CPU, last_tokens)
        n, pad = len(slots), 4 - len(slots)
        assert torch.equal(staged.positions, plain.positions)
        assert torch.equal(staged.layout.slot_mapping, plain.layout.slot_mapping)
        assert torch.equal(staged.layout.seqused_k, plain.layout.seqused_k)
        assert torch.equal(staged.layout.block_table, plain.layout.block_table)
        assert torch.equal(staged.layout.cu_seqlens_q, plain.layout.cu_seqlens_q)
        assert torch.equal(staged.sample_slots, plain.sample_slots)
        assert torch.equal(staged.sample_rows, plain.sample_rows)
        assert staged.sample_positions == plain.sample_positions == [s + 1 for s in starts]
        assert staged.layout.context_lens == plain.layout.context_lens
        assert staged.input_ids.shape == (n,) and staged.prompt_rows is None
        assert staging.slot_mapping[n:].tolist() == [scratch * block_size] * pad
        assert staging.seqused_k[n:].tolist() == [1] * pad
        assert staging.block_table[n:, 0].tolist() == [scratch] * pad
        assert staging.sample_slots[n:].tolist() == [4] * pad
        assert staging.positions[n:].tolist() == [0] * pad
        buffer = staging.buffer.untyped_storage().data_ptr()
        for view in (staged.positions, staged.layout.slot_mapping, staged.layout.seqused_k,
                     staged.layout.block_table, staged.sample_slots):
            assert view.untyped_storage().data_ptr() == buffer
