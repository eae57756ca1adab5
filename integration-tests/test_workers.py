"""--workers 2: two router processes share one port (SO_REUSEPORT); both serve, per-key rate
limits stay exact across them (shared memory), /metrics on either describes the whole router,
and SIGTERM drains both and exits 0."""

from __future__ import annotations


import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import start_router, start_shard, wait_until

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
