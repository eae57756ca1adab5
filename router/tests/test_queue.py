"""The queue, the choice of group and failover (router/queue.py), against scripted shard groups
on loopback (fake_shard.py): which group a run goes to, what waits, what a lost group's runs
become, and the races of runs closed while they move."""

from __future__ import annotations

import asyncio
import time

import pytest

from router.errors import ShardUnavailable
from router.tests.fake_shard import FakeShard, tokens
from router.tests.harness import Router, scenario, until
from sluice.v1 import generate_pb2 as pb

NONE, LENGTH = pb.FINISH_REASON_NONE, pb.FINISH_REASON_LENGTH


def test_a_run_goes_to_the_group_with_most_free_budget_then_fewest_waiting():
    @scenario
    async def test(router: Router, *shards: FakeShard):
        # In the order the router lists them: a tie would go to the first.
        listed = [g.uri for g in router.groups.all()]
        first, second = sorted(shards, key=lambda s: listed.index(s.address))
        first.send(pb.GenerateResponse(free_budget_tokens=512, waiting_requests=0))
        second.send(pb.GenerateResponse(free_budget_tokens=768, waiting_requests=3))
        await until(lambda: router.group(second).free_budget_tokens == 768
                    and router.group(first).free_budget_tokens == 512)
        router.submit([1, 2, 3], 13)  # 16 tokens: one block
        [taken] = await second.next_batch()
        second.send(pb.GenerateResponse(free_budget_tokens=512, waiting_requests=1,
                                        admitted_ids=[taken.id]))
        first.send(pb.GenerateResponse(free_budget_tokens=512, waiting_requests=3))
        await until(lambda: router.group(first).waiting_requests == 3
                    and router.group(second).waiting_requests == 1
                    and router.group(second).available_tokens == 512)
        router.submit([1, 2, 3], 13)  # equal budgets: the fewer waiting wins, listed second
        assert len(await second.next_batch()) == 1
        assert first.received.empty()
    test()


def test_a_run_that_fits_nowhere_waits_in_arrival_order_until_budget_moves():
    @scenario
    async def test(router: Router, a: FakeShard):
        a.send(pb.GenerateResponse(free_budget_tokens=32))
        await until(lambda: router.group(a).free_budget_tokens == 32)
        first = router.submit([1] * 20, 20)  # 40 tokens: three blocks, 48 > 32
        second = router.submit([1], 3)  # would fit, but may not overtake
        await asyncio.sleep(0.05)
        assert router.dispatcher.queue_size == 2 and a.received.empty()
        a.send(pb.GenerateResponse(free_budget_tokens=64))
        batch = await a.next_batch()
        ids = [r.id for r in batch]
        if len(ids) == 1:
            ids += [r.id for r in await a.next_batch()]
        assert ids == [first.runs[0].id, second.runs[0].id]
        # Sent and not yet admitted: the router counts both reservations (48 + 16) at once.
        assert router.group(a).available_tokens == 64 - 64
    test(count=1)


def test_a_lost_group_s_run_resumes_elsewhere_as_a_continuation_without_a_gap():
    @scenario
    async def test(router: Router, a: FakeShard, b: FakeShard):
        b.send(pb.GenerateResponse(free_budget_tokens=0))  # everything goes to a first
        await until(lambda: router.group(b).free_budget_tokens == 0)
        generation = router.submit([5, 6, 7], 10)
        run = generation.runs[0]
        [sent] = await a.next_batch()
        a.send(pb.GenerateResponse(admitted_ids=[run.id]))
        a.send(tokens((run.id, 40, NONE), (run.id, 41, NONE)))
        await until(lambda: len(run.tokens) == 2)
        b.send(pb.GenerateResponse(free_budget_tokens=1024))
        a.break_stream()
        [continuation] = await b.next_batch()
        assert list(continuation.input_ids) == [5, 6, 7, 40, 41]
        assert continuation.resumed_tokens == 2
        assert continuation.stopping.max_new_tokens == 8
        assert continuation.sampling == sent.sampling and continuation.id == run.id
        b.send(tokens((run.id, 42, NONE)))
        b.send(tokens((run.id, 43, LENGTH)))
        events = [e.token_id for batch in [await run.next_events() for _ in range(2)]
                  for e in batch]
        while events[-1] != 43:
            events += [e.token_id for e in await run.next_events()]
        assert events == [40, 41, 42, 43]
        assert router.dispatcher.failovers == {"group_lost": 1, "retryable": 0}
        assert generation.telemetry.dispatched_to == [a.address, b.address]
    test()


def test_a_retryable_error_goes_back_to_the_head_of_the_queue():
    @scenario
    async def test(router: Router, a: FakeShard):
        old = router.submit([1, 2], 14)
        [sent] = await a.next_batch()
        a.send(pb.GenerateResponse(free_budget_tokens=0))
        await until(lambda: router.group(a).free_budget_tokens == 0)
        new = router.submit([3, 4], 14)  # waits: no budget
        a.send(pb.GenerateResponse(free_budget_tokens=16, errors=[pb.RequestError(
            id=sent.id, message="draining", retryable=True)]))
        [again] = await a.next_batch()
        assert again.id == old.runs[0].id  # ahead of the newer run
        assert again.resumed_tokens == 0 and list(again.input_ids) == [1, 2]
        assert router.dispatcher.failovers == {"group_lost": 0, "retryable": 1}
        assert new.runs[0].group is None
    test(count=1)


def test_with_no_group_left_a_failed_over_run_ends_with_503_after_the_timeout():
    @scenario
    async def test(router: Router, a: FakeShard):
        generation = router.submit([1, 2], 14)
        run = generation.runs[0]
        await a.next_batch()
        await a.stop()  # gone for good: the run waits, then fails
        started = time.monotonic()
        with pytest.raises(ShardUnavailable, match="--failover-timeout"):
            await asyncio.wait_for(run.next_events(), 5)
        assert time.monotonic() - started >= 0.25
        run.close()
        assert router.dispatcher.in_flight == 0 and router.settled == [generation]
    test(count=1, failover_timeout_s=0.3)


def test_closing_a_run_that_waits_for_failover_withdraws_it_and_frees_its_slot():
    @scenario
    async def test(router: Router, a: FakeShard):
        generation = router.submit([1, 2], 14)
        await a.next_batch()
        await a.stop()
        run = generation.runs[0]
        await until(lambda: router.dispatcher.queue_size == 1)
        assert run.failover_timer is not None
        generation.close()
        assert router.dispatcher.queue_size == 0 and router.dispatcher.in_flight == 0
        assert run.failover_timer is None  # no timer left to fire on a closed run
        generation.close()  # twice: counted out once
        assert router.dispatcher.in_flight == 0 and router.settled == [generation]
    test(count=1, failover_timeout_s=60)


def test_a_run_closed_while_its_tokens_arrive_is_cancelled_once_and_late_tokens_dropped():
    @scenario
    async def test(router: Router, a: FakeShard):
        generation = router.submit([1, 2], 14, runs=2)
        batch = await a.next_batch()
        first, second = generation.runs
        assert [r.id for r in batch] == [first.id, second.id]
        a.send(tokens((first.id, 9, NONE), (second.id, 9, NONE)))
        await until(lambda: len(first.tokens) == 1 and len(second.tokens) == 1)
        first.close()
        assert await a.next_cancel() == [first.id]
        a.send(tokens((first.id, 10, NONE), (second.id, 10, LENGTH)))  # the step in flight
        await until(lambda: second.finished)
        assert first.tokens == [9] and second.tokens == [9, 10]
        assert router.settled == []  # one run still open
        second.close()
        assert router.settled == [generation] and router.dispatcher.in_flight == 0
        assert a.received.empty()  # the finished run is not cancelled again
    test(count=1)
