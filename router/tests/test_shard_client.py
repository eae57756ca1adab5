"""One group's stream (router/shard_client.py) and the set of groups (router/groups.py), against
scripted shard groups: budget accounting in whole blocks, what a broken or malformed stream does
to the runs on it, reconnects, draining, and groups of another model."""

from __future__ import annotations

import asyncio

from router.errors import GenerationError
from router.shard_client import GroupState
from router.tests.fake_shard import FakeShard, tokens
from router.tests.harness import Router, scenario, until
from sluice.v1 import generate_pb2 as pb

NONE = pb.FINISH_REASON_NONE


def test_reservations_are_whole_blocks_and_come_back_on_admission_errors_and_cancels():
    @scenario
    async def test(router: Router, a: FakeShard):
        group = router.group(a)
        assert group.available_tokens == 1024
        one, two, three = (router.submit([1] * 5, 12) for _ in range(3))  # 17 tokens: 2 blocks
        batch = await a.next_batch()
        while len(batch) < 3:
            batch += await a.next_batch()
        assert group.unacknowledged_tokens == 3 * 32 and group.available_tokens == 1024 - 96
        a.send(pb.GenerateResponse(free_budget_tokens=1024 - 32, admitted_ids=[one.runs[0].id],
                                   errors=[pb.RequestError(id=two.runs[0].id,
                                                           message="the prompt is too long")]))
        await until(lambda: group.unacknowledged_tokens == 32)
        assert group.available_tokens == 1024 - 32 - 32
        # The refused run gets the shard's error, not a failover.
        try:
            await two.runs[0].next_events()
            raise AssertionError("no error")
        except GenerationError as exc:
            assert str(exc).endswith(": the prompt is too long"), str(exc)
        three.close()  # cancelled before its admission: its reservation is given back at once
        assert await a.next_cancel() == [three.runs[0].id]
        assert group.unacknowledged_tokens == 0
    test(count=1)


def test_a_malformed_batch_hands_the_runs_back_and_the_group_reconnects():
    """A non-gRPC exception on the stream (here, a batch of 2 ids and 1 token) must not end
    the group's task with runs waiting on it: they fail over, and the group comes back."""
    @scenario
    async def test(router: Router, a: FakeShard, b: FakeShard):
        generation = router.submit([1, 2], 10)
        run = generation.runs[0]
        target = await _first_batch(a, b)
        other = b if target is a else a
        target.send(pb.GenerateResponse(tokens=pb.TokenBatch(
            ids=[run.id, 99], token_ids=[7], logprobs=[0.0], finish_reasons=[NONE])))
        [again] = await other.next_batch()
        assert again.id == run.id
        assert router.dispatcher.failovers["group_lost"] == 1
        await until(lambda: target.streams == 2 and router.group(target).ready)
    test()


async def _first_batch(a: FakeShard, b: FakeShard) -> FakeShard:
    while True:
        for shard in (a, b):
            if not shard.received.empty():
                await shard.next_batch()
                return shard
        await asyncio.sleep(0.005)


def test_a_draining_group_keeps_its_runs_and_takes_nothing_new():
    @scenario
    async def test(router: Router, a: FakeShard, b: FakeShard):
        b.send(pb.GenerateResponse(free_budget_tokens=0))
        await until(lambda: router.group(b).free_budget_tokens == 0)
        running = router.submit([1, 2], 10)
        await a.next_batch()
        a.send(pb.GenerateResponse(free_budget_tokens=1000, draining=True))
        await until(lambda: router.group(a).state is GroupState.DRAINING)
        b.send(pb.GenerateResponse(free_budget_tokens=64))
        router.submit([3, 4], 10)
        await b.next_batch()  # not to a, though a has more budget
        a.send(tokens((running.runs[0].id, 5, NONE)))
        assert [e.token_id for e in await running.runs[0].next_events()] == [5]
    test()


def test_a_group_of_another_model_is_refused_while_the_first_model_serves():
    async def main():
        good = await FakeShard(model_id="model-a").start()
        other = await FakeShard(model_id="model-b").start()
        retokenized = await FakeShard(model_id="model-a", tokenizer_json='{"x": 1}').start()
        router = Router(good)
        try:
            await router.ready(1)
            router.groups.update("static", {good.address, other.address, retokenized.address})
            await until(lambda: router.group(other).state is GroupState.REFUSED
                        and router.group(retokenized).state is GroupState.REFUSED)
            assert [g.uri for g in router.dispatcher.ready_groups()] == [good.address]
            assert other.streams == 0  # refused before any stream is opened
            # Once no group of the first model is left, the next model is taken.
            router.groups.update("static", {other.address})
            await until(lambda: [g.uri for g in router.dispatcher.ready_groups()]
                        == [other.address], timeout_s=15)
        finally:
            await router.stop()
            for shard in (good, other, retokenized):
                await shard.stop()
    asyncio.run(main())


def test_a_group_dropped_by_discovery_finishes_its_runs_and_can_come_back():
    @scenario
    async def test(router: Router, a: FakeShard, b: FakeShard):
        b.send(pb.GenerateResponse(free_budget_tokens=0))
        await until(lambda: router.group(b).free_budget_tokens == 0)
        running = router.submit([1, 2], 10)
        await a.next_batch()
        router.groups.update("static", {b.address})  # a leaves discovery
        group_a = router.group(a)
        assert group_a.state is GroupState.RETIRED
        a.send(tokens((running.runs[0].id, 5, NONE)))  # it still streams what it runs
        assert [e.token_id for e in await running.runs[0].next_events()] == [5]
        router.groups.update("static", {a.address, b.address})  # back before it was dropped
        assert group_a.state is GroupState.READY
        assert [g.uri for g in router.groups.all()].count(a.address) == 1
        router.groups.update("static", {b.address})
        running.close()  # its last run ends: the retired group closes its stream and goes
        await until(lambda: a.address not in [g.uri for g in router.groups.all()])
        assert a.streams == 1
    test()
