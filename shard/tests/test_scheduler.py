"""The block allocator (the token budget) and the scheduler's admission and step plans."""

from __future__ import annotations

import torch

from shard import plan as step_plan
from shard.kv_cache import BlockAllocator
from shard.sampling import SamplingParams
from shard.scheduler import Scheduler, Sequence


def seq(request_id: int, prompt_len: int, max_new_tokens: int) -> Sequence:
    return Sequence(request_id=request_id, stream=None, prompt=torch.arange(prompt_len),
                    sampling=SamplingParams(), max_new_tokens=max_new_tokens)


def make_scheduler(num_blocks=10, block_size=4, max_batch_size=8, max_prefill_tokens=1000,
                   max_total_tokens=None) -> Scheduler:
    allocator = BlockAllocator(num_blocks, block_size)
    return Scheduler(allocator, max_batch_size, max_prefill_tokens,
                     max_total_tokens or num_blocks * block_size)


def finish_prefill(s: Sequence) -> None:
    s.num_cached = s.prompt_len


# -- BlockAllocator ----------------------------------------------------------------------------

def test_allocate_is_all_or_nothing():
    allocator = BlockAllocator(5, 16)
    assert allocator.total_tokens == 80 and allocator.free_tokens == 80
    first = allocator.allocate(3)
    assert len(first) == 3 and len(set(first)) == 3
    assert allocator.allocate(3) is None
    assert allocator.free_blocks == 2 and allocator.free_tokens == 32
    second = allocator.allocate(2)
    assert set(first) | set(second) == set(range(5))
    assert allocator.allocate(1) is None and allocator.free_tokens == 0
    assert allocator.allocate(0) == []


def test_released_blocks_return_to_the_budget_and_are_handed_out_again():
    allocator = BlockAllocator(6, 4)
    a, b = allocator.allocate(2), allocator.allocate(4)
    allocator.release(a)
    assert allocator.free_blocks == 2 and allocator.free_tokens == 8
    again = allocator.allocate(2)
    assert sorted(again) == sorted(a)
    allocator.release(again)
    allocator.release(b)
    assert allocator.free_tokens == allocator.total_tokens == 24
    assert sorted(allocator.allocate(6)) == list(range(6))


# -- admission ---------------------------------------------------------------------------------

def test_admission_is_fifo_and_a_request_that_does_not_fit_blocks_the_ones_behind_it():
    scheduler = make_scheduler(num_blocks=10, block_size=4)
    a, b, c = seq(1, 10, 6), seq(2, 20, 8), seq(3, 2, 2)  # 4, 7 and 1 blocks
    for s in (a, b, c):
        scheduler.add(s)
    assert scheduler.admit() == [a]
    assert list(scheduler.waiting) == [b, c]  # c would fit, but b is older
    assert scheduler.allocator.free_blocks == 6
    assert scheduler.admit() == []  # nothing changed, nothing admitted
    scheduler.release(a)
    assert scheduler.admit() == [b, c]
    assert not scheduler.waiting and scheduler.running == [b, c]
    assert scheduler.allocator.free_blocks == 2


def test_admission_reserves_prompt_plus_max_new_tokens_in_blocks_and_the_plan_carries_them():
    scheduler = make_scheduler(num_blocks=10, block_size=4)
    s = seq(1, 9, 3)  # 12 tokens: exactly 3 blocks
    scheduler.add(s)
    assert scheduler.admit() == [s]
    assert len(s.blocks) == 3 and s.slot >= 0
    t = seq(2, 9, 4)  # 13 tokens: 4 blocks
    scheduler.add(t)
    assert scheduler.admit() == [t]
    assert len(t.blocks) == 4 and not set(t.blocks) & set(s.blocks)
    assert scheduler.allocator.free_blocks == 3
    # Every rank's block tables learn both reservations from the next step's plan.
    plan = step_plan.make(scheduler.schedule(), [s, t])
    assert plan.admitted_slots.tolist() == [s.slot, t.slot]
    assert plan.admitted_counts.tolist() == [3, 4]
    assert plan.admitted_blocks.tolist() == s.blocks + t.blocks
    unpacked = step_plan.StepPlan.unpack(plan.packed.clone())  # as another rank receives it
    assert unpacked.admitted_blocks.tolist() == s.blocks + t.blocks
    assert unpacked.prefill_ids.tolist() == s.prompt.tolist() + t.prompt.tolist()
    assert unpacked.lengths.tolist() == [9, 9] and unpacked.starts.tolist() == [0, 0]


def test_max_batch_size_limits_running_sequences():
    scheduler = make_scheduler(num_blocks=100, max_batch_size=2)
    a, b, c = seq(1, 3, 1), seq(2, 3, 1), seq(3, 3, 1)
    for s in (a, b, c):
        scheduler.add(s)
    assert scheduler.admit() == [a, b]
    assert list(scheduler.waiting) == [c]
    assert {a.slot, b.slot} == {0, 1}
    freed_slot = a.slot
    scheduler.release(a)
    assert a.slot == -1 and a.blocks == []
    assert scheduler.admit() == [c]
    assert c.slot == freed_slot


def test_rejection_of_requests_larger_than_the_budget_or_max_total_tokens():
    scheduler = make_scheduler(num_blocks=10, block_size=4, max_total_tokens=24)
    assert scheduler.rejection(seq(1, 20, 4)) is None  # 24 tokens: the limit itself
    too_long = scheduler.rejection(seq(2, 20, 5))
    assert too_long is not None and "max_total_tokens" in too_long
    scheduler = make_scheduler(num_blocks=10, block_size=4, max_total_tokens=64)
    assert scheduler.rejection(seq(3, 30, 10)) is None  # the whole budget, 40 tokens
    too_big = scheduler.rejection(seq(4, 30, 11))
    assert too_big is not None and "whole budget" in too_big and "40" in too_big


def test_release_of_a_waiting_sequence_touches_no_blocks():
    scheduler = make_scheduler(num_blocks=4, block_size=4)
    a, b, c = seq(1, 10, 6), seq(2, 4, 4), seq(3, 1, 1)
    for s in (a, b, c):
        scheduler.add(s)
    assert scheduler.admit() == [a]
    scheduler.release(b)  # never admitted
    assert list(scheduler.waiting) == [c]
    assert scheduler.allocator.free_blocks == 0 and scheduler.running == [a]
    scheduler.release(a)
    assert scheduler.allocator.free_blocks == 4
    assert scheduler.admit() == [c]


def test_idle_only_when_nothing_runs_or_waits():
    scheduler = make_scheduler(num_blocks=4, block_size=4)
    assert scheduler.idle
    a, b = seq(1, 10, 6), seq(2, 10, 6)
    scheduler.add(a)
    scheduler.add(b)
    assert not scheduler.idle
    scheduler.admit()
    scheduler.release(a)  # b waits, nothing runs: the engine must not sleep now
    assert scheduler.running == [] and list(scheduler.waiting) == [b]
    assert not scheduler.idle
    scheduler.admit()
    scheduler.release(b)
    assert scheduler.idle


# -- step plans --------------------------------------------------------------------------------

def test_chunked_prefill_splits_prompts_oldest_first_under_the_prefill_budget():
    scheduler = make_scheduler(num_blocks=100, max_prefill_tokens=10)
    a, b, c, d = seq(1, 4, 5), seq(2, 7, 5), seq(3, 12, 5), seq(4, 5, 5)
    for s in (a, b, c, d):
        scheduler.add(s)
    scheduler.admit()
    finish_prefill(a)
    step = scheduler.schedule()
    assert step.decodes == [a]
    assert step.prefills == [(b, 7), (c, 3)]  # d gets nothing this step
    a.num_cached += 1
    b.num_cached += 7
    c.num_cached += 3
    step = scheduler.schedule()
    assert step.decodes == [a, b]  # b finished its prompt: it decodes now
    assert step.prefills == [(c, 9), (d, 1)]
    a.num_cached += 1
    b.num_cached += 1
    c.num_cached += 9
    d.num_cached += 1
    step = scheduler.schedule()
    assert step.decodes == [a, b, c] and step.prefills == [(d, 4)]


def test_decodes_always_run_whatever_the_prefill_backlog():
    scheduler = make_scheduler(num_blocks=1000, block_size=4, max_prefill_tokens=8)
    running = [seq(i, 3, 50) for i in range(3)]
    backlog = [seq(10 + i, 100, 10) for i in range(4)]
    for s in running + backlog:
        scheduler.add(s)
    scheduler.admit()
    for s in running:
        finish_prefill(s)
    for _ in range(5):
        step = scheduler.schedule()
        assert step.decodes == running
        assert sum(n for _, n in step.prefills) == 8
        assert [s for s, _ in step.prefills] == [backlog[0]]
        backlog[0].num_cached += 8
        for s in running:
            s.num_cached += 1


def test_schedule_is_empty_when_nothing_runs():
    scheduler = make_scheduler()
    assert scheduler.schedule() is None
    scheduler.add(seq(1, 3, 3))
    assert scheduler.schedule() is None  # waiting is not running
    scheduler.admit()
    assert scheduler.schedule().prefills[0][1] == 3
