"""Admission (router/admission.py) and a request's settlement (router/request.py): the rate-limit
tokens a request reserved come back whatever way it ends: refused before it ran, or ended
having generated less than it reserved."""

from __future__ import annotations

import asyncio

import pytest

from router import config as router_config
from router.errors import ShardUnavailable
from router.ratelimit import RateLimits
from router.state import RouterState
from router.tests.fake_shard import FakeShard, tokens
from router.tests.harness import CLIENT_HOST, http_request, prepared, until
from sluice.v1 import generate_pb2 as pb

TPM = 100  # tokens per minute for the test's one client address
LIMITS = RateLimits(0, TPM)


async def tokens_left(state: RouterState) -> int:
    """What the client's token bucket still holds once no refund is in flight: the largest
    request it admits now."""
    # Refunds run as tasks that RouterState.spawn keeps until each is done; waiting for none
    # left (rather than for the expected count) lets a refund that should not happen show.
    await until(lambda: not state._spawned, "the rate-limit refunds in flight done")
    decision = await state.limiter.acquire(f"client:{CLIENT_HOST}", LIMITS, 0)
    return decision.usage["tokens"].remaining


def state_for(*shard_uris: str) -> RouterState:
    config = router_config.parse(["--workers", "1", "--tokens-per-minute", str(TPM)] + [
        arg for uri in shard_uris for arg in ("--shard-uri", uri)], {})
    return RouterState(config)


def test_a_request_refused_for_want_of_a_group_refunds_its_rate_limit_tokens():
    async def main():
        state = state_for("127.0.0.1:1")  # nothing listens: no group ever connects
        await state.start()
        try:
            with pytest.raises(ShardUnavailable):
                await state.admit(http_request(state), [prepared([1, 2, 3], 37)])
            assert await tokens_left(state) == TPM
        finally:
            await state.stop()
    asyncio.run(main())


def test_a_request_refunds_what_its_runs_did_not_generate_once_the_last_ends():
    async def main():
        shard = await FakeShard().start()
        state = state_for(shard.address)
        await state.start()
        try:
            await until(lambda: state.dispatcher.ready_groups())
            generation = await state.admit(http_request(state),
                                           [prepared([1, 2], 20), prepared([1, 2], 20)])
            assert await tokens_left(state) == TPM - 2 - 40  # one prompt, two runs' tokens
            first, second = generation.runs
            batch = await shard.next_batch()
            while len(batch) < 2:
                batch += await shard.next_batch()
            shard.send(tokens(*[(first.id, 5, pb.FINISH_REASON_NONE)] * 3))
            await until(lambda: len(first.tokens) == 3)
            first.close()
            assert await tokens_left(state) == TPM - 42  # not settled: a run still open
            second.close()
            assert await tokens_left(state) == TPM - 2 - 3  # the prompt, three tokens
        finally:
            await state.stop()
            await shard.stop()
    asyncio.run(main())
