"""Two routers in front of shard groups found through DNS (a real dnsmasq on loopback), under
streaming load: a group killed or stopped mid-stream loses no request (each resumes on another
group and ends with the text an undisturbed run gives), a group that appears in DNS gets
traffic within the discovery interval, one that leaves is dropped, and no group ever holds more
admitted reservations than its budget.

The groups listen on 127.0.0.2-5 (all loopback) at one port, since a DNS name gives addresses
and --shard-dns one port.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import Service, start_router, start_shard, wait_until
from dnsmasq import Dnsmasq

NAME = "shards.sluice.test"
HOSTS = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]
BUDGET = 2048  # tokens per group: six of the requests below at once
MAX_TOKENS = 300
INTERVAL_S = 0.5
PROMPTS = ["The quick brown fox", "Once upon a time", "abc", "Sluice serves models",
           "1 2 3 4", "Hello, world", "zzz", "A longer prompt with several words in it",
           "Kubernetes", "failover", "tokens", "the end"]


def common_port() -> int:
    """A port free on every host address."""
    for _ in range(20):
        with socket.socket() as probe:
            probe.bind((HOSTS[0], 0))
            port = probe.getsockname()[1]
        try:
            for host in HOSTS[1:]:
                with socket.socket() as sock:
                    sock.bind((host, port))
            return port
        except OSError:
            continue
    raise RuntimeError("no port free on every test address")


def metrics(url: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


class Fleet:
    def __init__(self, folder, model: str):
        self.dns = Dnsmasq(folder)
        self.port = common_port()
        self.model = model
        self.shards: dict[str, Service] = {}
        with ThreadPoolExecutor(3) as pool:  # they load at once
            list(pool.map(self.start_shard, HOSTS[:3]))
        self.dns.set(NAME, set(HOSTS[:3]))
        self.routers = [self._start_router() for _ in range(2)]
        self.over_budget: list[str] = []
        self.budget_polls = 0
        self._watching = True
        self._watcher = threading.Thread(target=self._watch_budgets, daemon=True)
        self._watcher.start()

    def start_shard(self, host: str) -> Service:
        shard = start_shard(self.model, "--host", host, "--port", str(self.port),
                            "--max-batch-total-tokens", str(BUDGET), "--metrics-port", "0",
                            "--shutdown-grace", "1")
        self.shards[host] = shard
        return shard

    def _start_router(self) -> Service:
        return start_router(flags=("--shard-dns", f"{NAME}:{self.port}", "--shard-dns-server",
                                   self.dns.server, "--discovery-interval", str(INTERVAL_S)))

    def _watch_budgets(self) -> None:
        """The shard's own gauges, polled through the whole module: used <= budget always."""
        while self._watching:
            for host, shard in list(self.shards.items()):
                if shard.process.poll() is not None:
                    continue
                try:
                    m = metrics(f"http://{shard.ready['metrics_address']}")
                except httpx.HTTPError:
                    continue
                used = m[("sluice_shard_kv_budget_used_tokens", ())]
                if used > m[("sluice_shard_kv_budget_total_tokens", ())]:
                    self.over_budget.append(f"{host}: {used}")
                self.budget_polls += 1
            time.sleep(0.05)

    def groups(self, router: Service) -> dict[str, str]:
        return {g["uri"]: g["state"]
                for g in httpx.get(f"{router.url}/info", timeout=10).json()["shard_groups"]}

    def uri(self, host: str) -> str:
        return f"{host}:{self.port}"

    def stop(self) -> None:
        self._watching = False
        for service in self.routers + list(self.shards.values()):
            service.stop(signal.SIGKILL if service in self.shards.values() else signal.SIGTERM)
        self.dns.stop()


class Completion(threading.Thread):
    """One streamed /v1/completions request read to its end on a thread."""

    def __init__(self, router: Service, prompt: str, seed: int | None,
                 max_tokens: int = MAX_TOKENS):
        super().__init__(daemon=True)
        self.body = {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True,
                     "stream": True, "stream_options": {"include_usage": True},
                     "temperature": 0.8 if seed is not None else 0}
        if seed is not None:
            self.body["seed"] = seed
        self.url = f"{router.url}/v1/completions"
        self.text, self.chunks, self.errors, self.usage, self.finish = "", 0, [], None, None

    def run(self) -> None:
        with httpx.stream("POST", self.url, json=self.body, timeout=300) as answer:
            for line in answer.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    self.errors.append(event["error"])
                elif event.get("usage"):
                    self.usage = event["usage"]
                else:
                    self.chunks += 1
                    self.text += event["choices"][0]["text"]
                    self.finish = event["choices"][0]["finish_reason"] or self.finish


def load(fleet: Fleet, victim: Service | None = None, disrupt=None) -> list[Completion]:
    """The twelve requests (two seeded, the rest greedy) spread over both routers. `disrupt`
    runs while `victim` has requests running that streamed tokens already."""
    streams = [Completion(fleet.routers[i % 2], prompt, seed=i if i in (3, 8) else None)
               for i, prompt in enumerate(PROMPTS)]
    for stream in streams:
        stream.start()
    if disrupt is not None:
        # Polled often: the window in which the victim runs two streams is short.
        wait_until(lambda: sum(s.chunks for s in streams) >= 60 and running_on(victim) >= 2,
                   "60 chunks streamed and two requests running on the victim", 120,
                   interval_s=0.01, report=lambda: [s.chunks for s in streams])
        disrupt()
    for stream in streams:
        stream.join(300)
        assert not stream.is_alive(), "a stream hangs"
    return streams


def assert_complete_and_equal(streams: list[Completion], reference: list[str]) -> None:
    for stream, expected in zip(streams, reference):
        assert stream.errors == [], stream.errors
        assert stream.finish == "length"
        assert stream.usage["completion_tokens"] == MAX_TOKENS
        assert stream.text == expected


def failovers(router: Service) -> dict[str, float]:
    m = metrics(router.url)
    return {reason: m[("sluice_router_failovers_total", (("reason", reason),))]
            for reason in ("group_lost", "retryable")}


@pytest.fixture(scope="module")
def fleet(tiny_model, tmp_path_factory):
    fleet = Fleet(tmp_path_factory.mktemp("dns"), str(tiny_model))
    yield fleet
    fleet.stop()


@pytest.fixture(scope="module")
def reference(fleet) -> list[str]:
    """Each request's text on the undisturbed fleet."""
    streams = load(fleet)
    for stream in streams:
        assert stream.errors == [] and stream.usage["completion_tokens"] == MAX_TOKENS
    return [s.text for s in streams]


def running_on(shard: Service) -> float:
    return metrics(f"http://{shard.ready['metrics_address']}")[
        ("sluice_shard_running_requests", ())]


def test_both_routers_find_the_three_groups_through_dns(fleet):
    for router in fleet.routers:
        assert fleet.groups(router) == {fleet.uri(h): "ready" for h in HOSTS[:3]}
        assert failovers(router) == {"group_lost": 0, "retryable": 0}


def test_sigterm_of_a_group_hands_its_streams_over_and_it_exits_0(fleet, reference):
    victim = fleet.shards[HOSTS[0]]
    before = [failovers(r)["retryable"] for r in fleet.routers]

    streams = load(fleet, victim, lambda: victim.process.send_signal(signal.SIGTERM))
    assert_complete_and_equal(streams, reference)
    assert victim.process.wait(30) == 0
    # Its grace (1 s) is shorter than its streams: what it ran was handed back, retryable.
    assert sum(failovers(r)["retryable"] for r in fleet.routers) > sum(before)
    for router in fleet.routers:
        groups = fleet.groups(router)
        assert groups[fleet.uri(HOSTS[0])] in ("connecting", "draining")
        assert [groups[fleet.uri(h)] for h in HOSTS[1:3]] == ["ready", "ready"]


def test_a_group_added_to_dns_gets_traffic_and_one_removed_is_dropped(fleet):
    new = fleet.start_shard(HOSTS[3])
    gone = fleet.uri(HOSTS[0])
    fleet.dns.set(NAME, set(HOSTS[1:]))  # the stopped group leaves, a fourth comes
    expected = {fleet.uri(h): "ready" for h in HOSTS[1:]}
    wait_until(lambda: all(fleet.groups(r) == expected for r in fleet.routers),
               f"both routers' groups {expected}", 10 * INTERVAL_S + 5,
               report=lambda: [fleet.groups(r) for r in fleet.routers])
    before = metrics(f"http://{new.ready['metrics_address']}")[
        ("sluice_shard_prefill_tokens_total", ())]
    # Each request goes where the most budget is free: concurrent ones spread over the groups.
    bodies = [Completion(fleet.routers[i % 2], "abc", None, max_tokens=16) for i in range(12)]
    for body in bodies:
        body.start()
    for body in bodies:
        body.join(120)
        assert body.usage["completion_tokens"] == 16
    after = metrics(f"http://{new.ready['metrics_address']}")[
        ("sluice_shard_prefill_tokens_total", ())]
    assert after - before >= 3  # one request's three prompt tokens at least
    assert all(gone not in fleet.groups(r) for r in fleet.routers)


def test_sigkill_of_a_group_mid_stream_loses_no_request(fleet, reference):
    victim = fleet.shards[HOSTS[1]]
    before = [failovers(r)["group_lost"] for r in fleet.routers]

    streams = load(fleet, victim, victim.process.kill)
    assert_complete_and_equal(streams, reference)
    assert sum(failovers(r)["group_lost"] for r in fleet.routers) > sum(before)
    for router in fleet.routers:  # the survivors keep serving
        answer = httpx.post(f"{router.url}/generate", json={
            "inputs": "abc", "parameters": {"max_new_tokens": 4}}, timeout=60)
        assert answer.status_code == 200


def test_no_group_ever_held_more_than_its_budget(fleet):
    assert fleet._watcher.is_alive() and fleet.budget_polls > 0  # it watched the whole time
    assert fleet.over_budget == []
