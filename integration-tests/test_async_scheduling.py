"""Async scheduling through the real shard server and router: the same concurrent requests on
a shard that launches step n+1 before reading step n's tokens (`--async-scheduling on`, the
CUDA default, forced here on CPU) and on one that does not give the same answers, finishes
and budget, also when a client goes away mid-stream."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from conftest import shard_info, start_router, start_shard, wait_for_free_budget

PROMPTS = ["hello world", "a b c d e f g h i j k l", "zz", "the quick brown fox jumps"]


@pytest.fixture(scope="module")
def stacks(tiny_model):
    """{mode: (shard, router)} for --async-scheduling on and off, on the same model."""
    started = {}
    for mode in ("on", "off"):
        shard = start_shard(str(tiny_model), "--async-scheduling", mode)
        started[mode] = (shard, start_router(shard))
    yield started
    for shard, router in started.values():
        router.stop()
        shard.stop()


async def _answers(url: str) -> list[tuple[str, str, int]]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        bodies = [{"inputs": p, "parameters": {"max_new_tokens": 3 + 4 * i, "details": True,
                                               "stop": ["q"] if i == 3 else []}}
                  for i, p in enumerate(PROMPTS)]
        answers = await asyncio.gather(*(client.post("/generate", json=b) for b in bodies))
    out = []
    for answer in answers:
        assert answer.status_code == 200, answer.text
        body = answer.json()
        out.append((body["generated_text"], body["details"]["finish_reason"],
                    body["details"]["generated_tokens"]))
    return out


def test_concurrent_requests_get_the_same_answers_with_and_without_overlap(stacks):
    answers = {mode: asyncio.run(_answers(router.url)) for mode, (_, router) in stacks.items()}
    assert answers["on"] == answers["off"]
    for i, (_, reason, tokens) in enumerate(answers["on"]):
        assert 1 <= tokens <= 3 + 4 * i and reason in ("length", "eos_token", "stop_sequence")
    for shard, _ in stacks.values():
        total = shard_info(shard).max_batch_total_tokens
        assert wait_for_free_budget(shard, total) == total


@pytest.mark.parametrize("mode", ["on", "off"])
def test_a_client_leaving_mid_stream_frees_its_budget_and_others_still_finish(stacks, mode):
    shard, router = stacks[mode]
    total = shard_info(shard).max_batch_total_tokens
    body = {"inputs": "a long one", "parameters": {"max_new_tokens": 200}, "stream": True}
    with httpx.stream("POST", f"{router.url}/generate_stream", json=body, timeout=60) as answer:
        lines = answer.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
    # The stream is closed after its first token: the router cancels, the shard frees.
    assert wait_for_free_budget(shard, total) == total
    done = httpx.post(f"{router.url}/generate", timeout=60,
                      json={"inputs": "after", "parameters": {"max_new_tokens": 5}})
    assert done.status_code == 200 and isinstance(done.json()["generated_text"], str)
    assert wait_for_free_budget(shard, total) == total
