"""The fixed token budget: excess requests wait rather than fail, and every ending gives it back."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from conftest import shard_info, start_router, start_shard, wait_for_free_budget, wait_until

BUDGET = 64  # four blocks of 16 tokens
REQUEST = {"inputs": "abc", "parameters": {"max_new_tokens": 20, "details": True}}


@pytest.fixture(scope="module")
def small_budget(tiny_model):
    shard = start_shard(str(tiny_model), "--max-batch-total-tokens", str(BUDGET),
                        "--block-size", "16")
    router = start_router(shard)
    yield shard, router
    router.stop()
    shard.stop()


async def until_admitted(shard) -> None:
    """Once the shard has admitted a request (its budget is no longer all free). Polled on a
    thread, often: the event loop must go on sending the request, which runs for 60 tokens."""
    await asyncio.to_thread(wait_until, lambda: shard_info(shard).free_budget_tokens != BUDGET,
                            "the shard running the request", 10, interval_s=0.01)


def test_budget_is_what_the_flag_says(small_budget):
    shard, router = small_budget
    info = shard_info(shard)
    assert info.max_batch_total_tokens == BUDGET
    assert info.free_budget_tokens == BUDGET
    # max_total_tokens is lowered to fit the budget, so no request can be too big to ever run.
    assert info.max_total_tokens == BUDGET
    groups = httpx.get(f"{router.url}/info").json()["shard_groups"]
    assert groups == [{"uri": shard.address, "ready": True, "state": "ready",
                       "free_budget_tokens": BUDGET,
                       "max_batch_total_tokens": BUDGET, "prefill_chunk_tokens": 0}]


def test_excess_requests_wait_and_all_finish(small_budget):
    shard, router = small_budget
    # Each request reserves 3 + 20 tokens = 2 blocks: 12 requests need 24 blocks, 4 exist.
    async def burst():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(client.post(f"{router.url}/generate",
                                                      json=REQUEST | {"stream": False})
                                          for _ in range(12)))

    answers = asyncio.run(burst())
    assert [a.status_code for a in answers] == [200] * 12
    assert all(a.json()["details"]["generated_tokens"] == 20 or
               a.json()["details"]["finish_reason"] == "eos_token" for a in answers)
    assert wait_for_free_budget(shard, BUDGET) == BUDGET


def test_streaming_client_disconnect_frees_the_budget(small_budget):
    shard, router = small_budget
    request = {"inputs": "abc", "parameters": {"max_new_tokens": 60}}
    with httpx.stream("POST", f"{router.url}/generate_stream", json=request,
                      timeout=60) as answer:
        lines = answer.iter_lines()
        next(line for line in lines if line.startswith("data:"))
        assert shard_info(shard).free_budget_tokens == 0  # 63 tokens: all four blocks
    # The connection is closed mid-generation: the router cancels, the shard frees.
    assert wait_for_free_budget(shard, BUDGET) == BUDGET


def test_non_streaming_client_disconnect_frees_the_budget(small_budget):
    shard, router = small_budget
    request = {"inputs": "abc", "parameters": {"max_new_tokens": 60}}

    async def leave_early():
        async with httpx.AsyncClient() as client:
            task = asyncio.create_task(client.post(f"{router.url}/generate", json=request,
                                                   timeout=60))
            await until_admitted(shard)
            task.cancel()  # closes the connection before the answer
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(leave_early())
    assert wait_for_free_budget(shard, BUDGET) == BUDGET


def test_requests_waiting_for_budget_are_cancelled_when_their_clients_leave(small_budget):
    shard, router = small_budget
    long = {"inputs": "abc", "parameters": {"max_new_tokens": 60}}

    async def scenario():
        async with httpx.AsyncClient(timeout=60) as client:
            running = asyncio.create_task(client.post(f"{router.url}/generate", json=long))
            await until_admitted(shard)
            waiting = [asyncio.create_task(client.post(f"{router.url}/generate", json=long))
                       for _ in range(3)]
            await asyncio.sleep(0.3)
            for task in waiting + [running]:
                task.cancel()
            await asyncio.gather(*waiting, running, return_exceptions=True)
        after = await client_after()
        return after

    async def client_after():
        async with httpx.AsyncClient(timeout=60) as client:
            return await client.post(f"{router.url}/generate", json=REQUEST)

    after = asyncio.run(scenario())
    assert after.status_code == 200
    assert wait_for_free_budget(shard, BUDGET) == BUDGET
