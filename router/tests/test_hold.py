"""Scale to zero's side in the router (--hold-without-groups; router/hold.py, router/queue.py):
held requests count where the autoscaler and the concurrency limit look, they go on once a
group is ready, and a request's deadline runs from its arrival. The HTTP side (held requests
answered, 503 after the timeout, disconnects, /health) runs on real processes in
integration-tests/test_scale_to_zero.py."""

from __future__ import annotations

import asyncio
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from router import config as router_config
from router.errors import Draining, Overloaded, RequestTimeout, ShardUnavailable
from router.state import RouterState
from router.tests.fake_shard import FakeShard
from router.tests.harness import http_request, prepared, until

NOWHERE = "127.0.0.1:1"  # nothing listens: that group never connects
HOLD = ("--hold-without-groups", "--request-timeout", "30")


def state_with(*flags: str) -> RouterState:
    return RouterState(router_config.parse(
        ["--workers", "1", "--shard-uri", NOWHERE, *flags], {}))


def queue_gauge(state: RouterState) -> float:
    [family] = [f for f in text_string_to_metric_families(state.metrics.text().decode())
                if f.name == "sluice_router_queue_size"]
    return family.samples[0].value


def running(test):
    """Run an async test against a started RouterState, stopped afterwards."""
    def run(*flags: str):
        async def main():
            state = state_with(*flags)
            await state.start()
            try:
                await test(state)
            finally:
                await state.stop()
        asyncio.run(main())
    return run


def test_hold_without_groups_needs_a_request_timeout_and_reads_its_environment(capsys):
    with pytest.raises(SystemExit):
        router_config.parse(["--shard-uri", NOWHERE, "--hold-without-groups"], {})
    assert "--hold-without-groups needs --request-timeout" in capsys.readouterr().err
    config = router_config.parse(["--shard-uri", NOWHERE],
                                 {"HOLD_WITHOUT_GROUPS": "true", "REQUEST_TIMEOUT": "600"})
    assert config.hold_without_groups and config.request_timeout_s == 600
    assert not router_config.parse(["--shard-uri", NOWHERE], {}).hold_without_groups


def test_held_requests_count_in_the_queue_gauge_and_toward_max_concurrent_requests():
    @running
    async def test(state: RouterState):
        dispatcher = state.dispatcher
        with dispatcher.holding(), dispatcher.holding():
            assert queue_gauge(state) == 2
            with pytest.raises(Overloaded, match="2 requests in flight"):
                with dispatcher.holding():
                    pass
            with pytest.raises(Overloaded):  # a validated request finds no room either
                await state.admit(http_request(state), [prepared([1, 2], 5)])
            assert dispatcher.held == 2
        assert queue_gauge(state) == 0 and dispatcher.held == 0 and dispatcher.in_flight == 0
    test(*HOLD, "--max-concurrent-requests", "2")


def test_a_held_request_goes_on_once_discovery_finds_a_ready_group():
    @running
    async def test(state: RouterState):
        shard = await FakeShard().start()
        try:
            waiting = asyncio.ensure_future(state.dispatcher.group_ready())
            await asyncio.sleep(0.3)
            assert not waiting.done()
            state.groups.update("dns", {shard.address})
            await asyncio.wait_for(waiting, 10)
            assert [g.uri for g in state.dispatcher.ready_groups()] == [shard.address]
        finally:
            await shard.stop()
    test(*HOLD)


def test_a_drain_ends_the_held_requests_with_its_error_at_once():
    @running
    async def test(state: RouterState):
        waiting = asyncio.ensure_future(state.dispatcher.group_ready())
        await asyncio.sleep(0.1)
        state.dispatcher.end_holding("the router is shutting down")
        with pytest.raises(Draining, match="the router is shutting down"):
            await asyncio.wait_for(waiting, 5)
    test(*HOLD)


def test_with_hold_a_validated_request_queues_while_no_group_is_ready_then_ends_with_503():
    """Its group went away between the hold and the queue: it waits --failover-timeout for
    another, as a failed-over request does, rather than 503 at once."""
    @running
    async def test(state: RouterState):
        generation = await state.admit(http_request(state), [prepared([1, 2], 5)])
        [run] = generation.runs
        assert queue_gauge(state) == 1
        with pytest.raises(ShardUnavailable, match="--failover-timeout"):
            await asyncio.wait_for(run.next_events(), 10)
        generation.close()
        assert state.dispatcher.in_flight == 0
    test(*HOLD, "--failover-timeout", "0.3")


def test_without_hold_a_request_is_refused_at_once_when_no_group_is_ready():
    @running
    async def test(state: RouterState):
        with pytest.raises(ShardUnavailable, match="no shard group is connected"):
            await state.admit(http_request(state), [prepared([1, 2], 5)])
        assert state.dispatcher.in_flight == 0
    test()


def test_the_request_deadline_runs_from_arrival_not_from_admission():
    """A request held 1.5 s of its 2 s has 0.5 s left once queued, not another 2 s."""
    @running
    async def test(state: RouterState):
        shard = await FakeShard().start()  # takes the run and never answers
        try:
            state.groups.update("dns", {shard.address})
            await until(lambda: state.dispatcher.ready_groups(), timeout_s=10)
            request = http_request(state)
            await asyncio.sleep(1.5)
            admitted_s = time.monotonic()
            generation = await state.admit(request, [prepared([1, 2], 5)])
            with pytest.raises(RequestTimeout):
                await asyncio.wait_for(generation.runs[0].next_events(), 10)
            assert time.monotonic() - admitted_s < 1.5  # a deadline from admission: 2 s
            generation.close()
        finally:
            await shard.stop()
    test("--request-timeout", "2")
