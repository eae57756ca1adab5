"""--workers 2: two router processes share one port (SO_REUSEPORT); both serve, per-key rate
limits stay exact across them (shared memory), /metrics on either describes the whole router,
a killed worker is replaced, and SIGTERM drains both and exits 0."""

from __future__ import annotations

import os
import signal

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import start_router, start_shard, wait_healthy, wait_until

LIMIT = 6  # requests per minute for the one client address of the test


@pytest.fixture(scope="module")
def shard(tiny_model):
    shard = start_shard(str(tiny_model))
    yield shard
    shard.stop()


def new_connection_post(url: str, body: dict) -> httpx.Response:
    # A new connection each time: the kernel picks a worker per connection.
    with httpx.Client(timeout=60) as client:
        return client.post(url, json=body)


def generate_requests(router) -> dict[str, float]:
    text = httpx.get(f"{router.url}/metrics", timeout=10).text
    return {s.labels["status"]: s.value for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name == "sluice_router_requests_total" and s.labels["route"] == "/generate"}


def test_two_workers_share_the_port_the_rate_limits_and_the_metrics(shard):
    router = start_router(shard, flags=("--workers", "2", "--requests-per-minute", str(LIMIT)))
    try:
        body = {"inputs": "abc", "parameters": {"max_new_tokens": 2}}
        statuses = [new_connection_post(f"{router.url}/generate", body).status_code
                    for _ in range(3 * LIMIT)]
        # One bucket for the client, whichever worker took each connection.
        assert statuses.count(200) == LIMIT and statuses.count(429) == 2 * LIMIT
        for _ in range(30):
            with httpx.Client(timeout=10) as client:
                assert client.get(f"{router.url}/v1/models").status_code == 200
        wait_until(lambda: len({line.get("worker") for line in router.log_lines()
                                if line.get("message") == "request"}) >= 2,
                   "request lines from both workers (one served every connection?)", 10)
        # Every scrape, whichever worker answers it, counts every worker's requests.
        for _ in range(6):
            assert generate_requests(router) == {"200": LIMIT, "429": 2 * LIMIT}
        gauges = {s.name: s.value for f in text_string_to_metric_families(
            httpx.get(f"{router.url}/metrics", timeout=10).text) for s in f.samples
            if s.name in ("sluice_router_shard_groups", "sluice_router_running_requests")
            and s.labels.get("state", "ready") == "ready"}
        # One group, seen by both workers: counted once.
        assert gauges == {"sluice_router_shard_groups": 1, "sluice_router_running_requests": 0}
    finally:
        assert router.stop() == 0


def health_answers(url: str, count: int) -> list[tuple[int, str]]:
    """(status, error or status field) of `count` GET /health, each on a new connection."""
    answers = []
    for _ in range(count):
        body = httpx.get(f"{url}/health", timeout=10)
        answers.append((body.status_code, body.json().get("error") or body.json()["status"]))
    return answers


def test_a_killed_worker_is_replaced_and_health_waits_for_it(shard):
    """The supervisor starts a worker again after SIGKILL and forgets the dead one's readiness
    (its marker stays behind). While the shard group cannot answer the new worker (stopped), no
    /health is green, whichever worker answers; once it can, every connection is served."""
    router = start_router(shard, flags=("--workers", "2"))
    stopped = False
    try:
        supervisor = psutil.Process(router.process.pid)
        before = {p.pid for p in supervisor.children()}
        assert len(before) == 2
        os.kill(shard.process.pid, signal.SIGSTOP)  # the live worker's stream stays open
        stopped = True
        os.kill(min(before), signal.SIGKILL)
        new_worker = "no shard group is connected"  # only the new worker has none
        wait_until(lambda: any(error == new_worker for _, error in health_answers(router.url, 4)),
                   "the new worker answering", 20)
        answers = health_answers(router.url, 20)
        assert {status for status, _ in answers} == {503}, answers
        assert {error for _, error in answers} <= {
            new_worker, "router worker 0 of 2 not connected to a shard group yet",
            "router worker 1 of 2 not connected to a shard group yet"}, answers
        os.kill(shard.process.pid, signal.SIGCONT)
        stopped = False
        wait_healthy(router.url)
        body = {"inputs": "abc", "parameters": {"max_new_tokens": 2}}
        statuses = [new_connection_post(f"{router.url}/generate", body).status_code
                    for _ in range(20)]
        assert statuses == [200] * 20
    finally:
        if stopped:
            os.kill(shard.process.pid, signal.SIGCONT)
        assert router.stop() == 0
