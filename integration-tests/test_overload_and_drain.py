"""Backpressure, timeouts and the drain on SIGTERM, against real processes.

Where a test needs requests to stay in flight, it freezes the shard group with SIGSTOP (and
thaws it with SIGCONT): no timing decides the outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import threading

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import start_router, start_shard, wait_for_free_budget, wait_until

BUDGET = 256
MAX_NEW = 8


@pytest.fixture(scope="module")
def shard(tiny_model):
    shard = start_shard(str(tiny_model), "--max-batch-total-tokens", str(BUDGET))
    yield shard
    shard.stop()


@contextlib.contextmanager
def frozen(shard):
    shard.process.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        shard.process.send_signal(signal.SIGCONT)


def gauges(router) -> dict[str, float]:
    text = httpx.get(f"{router.url}/metrics").text
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if f.type == "gauge" and not s.labels}


def test_overload_answers_each_request_fully_or_with_429_and_the_budget_returns(shard):
    router = start_router(shard, flags=("--max-concurrent-requests", "8"))
    request = {"inputs": "abc", "parameters": {"max_new_tokens": MAX_NEW, "details": True}}

    async def burst():
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            return await asyncio.gather(*(client.post(f"{router.url}/generate", json=request)
                                          for _ in range(200)))

    try:
        answers = asyncio.run(burst())  # the client timeout bounds it: nothing may hang
        full = [a for a in answers if a.status_code == 200]
        refused = [a for a in answers if a.status_code == 429]
        assert len(full) + len(refused) == 200
        assert len(full) >= 8 and refused
        for answer in full:
            details = answer.json()["details"]
            assert (details["generated_tokens"] == MAX_NEW
                    or details["finish_reason"] == "eos_token")
        for answer in refused:
            assert answer.json()["error_type"] == "overloaded"
        assert wait_for_free_budget(shard, BUDGET, timeout_s=20) == BUDGET
        g = gauges(router)
        assert g["sluice_router_queue_size"] == 0
        assert g["sluice_router_running_requests"] == 0  # every slot was given back once
        assert httpx.post(f"{router.url}/generate", json=request, timeout=60).status_code == 200
    finally:
        router.stop()


def test_a_request_past_its_timeout_ends_with_504_and_is_cancelled(shard):
    router = start_router(shard, flags=("--request-timeout", "1"))
    request = {"inputs": "abc", "parameters": {"max_new_tokens": MAX_NEW}}
    try:
        with frozen(shard):  # no token will come
            answer = httpx.post(f"{router.url}/generate", json=request, timeout=60)
            assert answer.status_code == 504
            assert answer.json() == {
                "error": "the request took longer than 1 s (--request-timeout), queue wait "
                         "included", "error_type": "timeout"}
            with httpx.stream("POST", f"{router.url}/generate_stream", json=request,
                              timeout=60) as streamed:
                events = [json.loads(line[5:]) for line in streamed.iter_lines()
                          if line.startswith("data:")]
            assert events == [{"error": "the request took longer than 1 s "
                                        "(--request-timeout), queue wait included",
                               "error_type": "timeout"}]
        assert wait_for_free_budget(shard, BUDGET, timeout_s=20) == BUDGET
        assert gauges(router)["sluice_router_running_requests"] == 0
    finally:
        router.stop()


class Stream(threading.Thread):
    """A streamed request read to its end on a thread."""

    def __init__(self, url: str, max_new_tokens: int):
        super().__init__(daemon=True)
        self.url, self.max_new_tokens = url, max_new_tokens
        self.events: list[dict] = []

    def run(self) -> None:
        body = {"inputs": "abc", "parameters": {"max_new_tokens": self.max_new_tokens,
                                                "details": True}}
        with httpx.stream("POST", f"{self.url}/generate_stream", json=body,
                          timeout=120) as answer:
            for line in answer.iter_lines():
                if line.startswith("data:"):
                    self.events.append(json.loads(line[5:]))


def wait_in_flight(router, count: int, timeout_s: float = 30) -> None:
    def in_flight(g: dict[str, float]) -> float:
        return g["sluice_router_running_requests"] + g["sluice_router_queue_size"]
    wait_until(lambda: in_flight(gauges(router)) == count, f"{count} requests in flight",
               timeout_s, interval_s=0.02, report=lambda: gauges(router))


def test_sigterm_drains_in_flight_requests_refuses_new_ones_and_exits_0(shard):
    router = start_router(shard, flags=("--shutdown-grace", "60"))
    streams = [Stream(router.url, 20) for _ in range(3)]
    with frozen(shard):  # the requests stay in flight while the router drains
        for stream in streams:
            stream.start()
        wait_in_flight(router, 3)
        router.process.send_signal(signal.SIGTERM)
        wait_until(lambda: httpx.get(f"{router.url}/health").status_code == 503,
                   "/health answers 503 while draining", 10, interval_s=0.02)
        refused = httpx.post(f"{router.url}/generate", json={"inputs": "abc"}, timeout=10)
        assert refused.status_code == 503
        assert refused.json()["error_type"] == "unavailable"
        assert router.process.poll() is None  # still serving what it has
    for stream in streams:
        stream.join(60)
        final = stream.events[-1]
        assert final["details"]["finish_reason"] in ("length", "eos_token"), final
        assert len(stream.events) == final["details"]["generated_tokens"]
    assert router.process.wait(30) == 0


def test_when_the_grace_runs_out_in_flight_requests_get_an_error_not_silence(shard):
    router = start_router(shard, flags=("--shutdown-grace", "1"))
    stream = Stream(router.url, 20)
    with frozen(shard):
        stream.start()
        wait_in_flight(router, 1)
        router.process.send_signal(signal.SIGTERM)
        stream.join(60)
        assert router.process.wait(30) == 0
    assert stream.events == [{"error": "the router shut down before the request ended "
                                       "(--shutdown-grace ran out)",
                              "error_type": "unavailable"}]
    assert wait_for_free_budget(shard, BUDGET, timeout_s=20) == BUDGET
