"""Async scheduling through the real shard server and router: the same concurrent requests on
a shard that launches step n+1 before reading step n's tokens (`--async-scheduling on`, the
CUDA default, forced here on CPU) and on one that does not give the same answers, finishes
and budget; a client that goes away mid-stream gives its budget back and leaves the request
running beside it as it would have been alone."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Iterator

import httpx
import pytest

from conftest import shard_info, start_router, start_shard, wait_for_free_budget, wait_until

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


# A stream long enough to be cut off mid-way (ignore_eos: no early end on the random model), and
# a greedy bystander that runs beside it when it is cut off.
LEAVING = {"prompt": "a long one", "max_tokens": 900, "ignore_eos": True, "stream": True}
BYSTANDER = {"prompt": "after", "max_tokens": 48, "ignore_eos": True, "temperature": 0,
             "stream": True, "stream_options": {"include_usage": True}}


def _open(client: httpx.Client, body: dict) -> tuple[httpx.Response, Iterator[str]]:
    """A streamed completion, open: its answer and the iterator over its lines."""
    answer = client.send(client.build_request("POST", "/v1/completions", json=body), stream=True)
    return answer, answer.iter_lines()


def _events(answer: httpx.Response, lines) -> Iterator[dict]:
    assert answer.status_code == 200, answer.read()
    for line in lines:
        if line.startswith("data:") and line != "data: [DONE]":
            yield json.loads(line[len("data:"):])


def _completion(events: Iterator[dict]) -> tuple[str, list[str], int]:
    """(the text, the finish reasons, completion tokens) of a streamed completion."""
    text, reasons, tokens = "", [], -1
    for event in events:
        for choice in event["choices"]:
            text += choice["text"]
            if choice["finish_reason"] is not None:
                reasons.append(choice["finish_reason"])
        if event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
    return text, reasons, tokens


def _request_log(router, max_new_tokens: int, timeout_s: float = 10) -> dict:
    """The router's log line of the request that asked for `max_new_tokens`, once written."""
    lines = wait_until(lambda: [line for line in router.log_lines()
                                if line.get("message") == "request"
                                and line.get("max_new_tokens") == max_new_tokens],
                       f"a request line with max_new_tokens={max_new_tokens}", timeout_s)
    return lines[-1]


@pytest.mark.parametrize("mode", ["on", "off"])
def test_a_client_leaving_mid_stream_frees_its_budget_and_a_running_neighbour_is_undisturbed(
        stacks, mode):
    """A stream cancelled while another runs beside it (with overlap, its in-flight token is
    dropped and its blocks go back at once) changes nothing of the other's answer: the same
    text, finish and token count as the same request alone; the cancelled one's blocks all come
    back."""
    shard, router = stacks[mode]
    total = shard_info(shard).max_batch_total_tokens
    with httpx.Client(base_url=router.url, timeout=60) as client:
        alone_answer, alone_lines = _open(client, BYSTANDER)
        try:
            alone = _completion(_events(alone_answer, alone_lines))
        finally:
            alone_answer.close()
        assert alone[1:] == (["length"], BYSTANDER["max_tokens"])
        leaving, leaving_lines = _open(client, LEAVING)
        try:
            assert len(list(itertools.islice(_events(leaving, leaving_lines), 3))) == 3
            beside, beside_lines = _open(client, BYSTANDER)
            beside_events = _events(beside, beside_lines)
            first = next(beside_events)  # both run now
        finally:
            leaving.close()  # the client leaves: the router cancels, the shard frees
        try:
            assert _completion(itertools.chain([first], beside_events)) == alone
        finally:
            beside.close()
    cut = _request_log(router, LEAVING["max_tokens"])
    assert cut["finish_reason"] == "cancelled"
    assert 3 <= cut["generated_tokens"] < LEAVING["max_tokens"]
    assert wait_for_free_budget(shard, total) == total
