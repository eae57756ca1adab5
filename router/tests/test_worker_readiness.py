"""--workers: /health on any worker is green only once every worker has a ready shard group
(router/workers.py's marker files). Two RouterStates stand for two workers of one router here,
sharing a folder as forked workers do, against a scripted shard group; the processes themselves
run in integration-tests/test_workers.py."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest
from starlette.requests import Request

from router import app, shared_buckets, workers
from router import config as router_config
from router.errors import ShardUnavailable
from router.state import RouterState
from router.tests.fake_shard import FakeShard
from router.tests.harness import until


async def health(state: RouterState):
    """GET /health, answered by the worker that `state` is."""
    app_of_worker = SimpleNamespace(state=SimpleNamespace(router=state))
    return await app.health(Request({"type": "http", "method": "GET", "path": "/health",
                                     "headers": [], "app": app_of_worker}))


def test_health_is_green_only_once_every_worker_has_a_ready_group(tmp_path):
    async def main():
        shard = await FakeShard().start()
        shared_buckets.create(tmp_path)
        config = router_config.parse(["--workers", "3", "--shard-uri", shard.address], {})
        states = []
        try:
            for index in range(2):  # worker 2 never starts: it stays unready
                states.append(RouterState(config, workers.Worker(index, 3, tmp_path)))
                await states[-1].start()
            for state in states:
                await until(lambda: state.dispatcher.ready_groups())
            assert sorted(p.name for p in tmp_path.glob("ready-*")) == ["ready-0", "ready-1"]
            for state in states:
                with pytest.raises(ShardUnavailable,
                                   match="^router worker 2 of 3 not connected to a shard group"):
                    await health(state)
            workers.mark_ready(workers.Worker(2, 3, tmp_path), True)
            for state in states:
                answer = await health(state)
                assert json.loads(answer.body) == {"status": "ok", "shard_groups_ready": 1}
            await shard.stop()  # every worker loses the group: their markers go
            for state in states:
                await until(lambda: not state.dispatcher.ready_groups())
            assert [p.name for p in tmp_path.glob("ready-*")] == ["ready-2"]
            assert workers.unready(states[0].worker) == [0, 1]
            with pytest.raises(ShardUnavailable, match="^no shard group is connected"):
                await health(states[0])
        finally:
            for state in states:
                await state.stop()
            await shard.stop()

    asyncio.run(main())


def test_a_stopped_worker_takes_its_marker_away(tmp_path):
    """Its streams end as it stops: its group is no longer ready."""
    async def main():
        shard = await FakeShard().start()
        shared_buckets.create(tmp_path)
        config = router_config.parse(["--workers", "2", "--shard-uri", shard.address], {})
        state = RouterState(config, workers.Worker(1, 2, tmp_path))
        await state.start()
        try:
            await until(lambda: state.dispatcher.ready_groups())
            assert workers.unready(state.worker) == [0]
        finally:
            await state.stop()
            await shard.stop()
        assert workers.unready(state.worker) == [0, 1]

    asyncio.run(main())


def test_held_requests_need_no_other_worker_for_health(tmp_path):
    """--hold-without-groups: a worker without a group holds requests, so /health does not
    wait for the others (worker 1 never starts here)."""
    async def main():
        shard = await FakeShard().start()
        shared_buckets.create(tmp_path)
        config = router_config.parse(["--workers", "2", "--shard-uri", shard.address,
                                      "--hold-without-groups", "--request-timeout", "30"], {})
        state = RouterState(config, workers.Worker(0, 2, tmp_path))
        await state.start()
        try:
            await until(lambda: state.dispatcher.ready_groups())
            assert workers.unready(state.worker) == [1]
            answer = await health(state)
            assert json.loads(answer.body) == {"status": "ok", "shard_groups_ready": 1}
        finally:
            await state.stop()
            await shard.stop()

    asyncio.run(main())


def test_a_marker_that_cannot_be_written_is_logged_not_raised(tmp_path, caplog):
    gone = workers.Worker(0, 2, tmp_path / "removed")
    workers.mark_ready(gone, True)
    workers.mark_ready(gone, False)
    assert [r.getMessage() for r in caplog.records] == [
        f"router worker 0: readiness marker {gone.ready_marker(0)}: [Errno 2] No such file or "
        f"directory: '{gone.ready_marker(0)}'"]
    assert workers.unready(gone) == [0, 1]
