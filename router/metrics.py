"""The router's Prometheus metrics (GET /metrics). docs/metrics.md lists every one.

Latency buckets span what LLM serving sees: milliseconds between tokens, seconds to minutes
for whole requests. Gauges of the queue and the shard groups' budget are read at scrape time.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable
from typing import TYPE_CHECKING

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from router.shard_client import GroupState

if TYPE_CHECKING:
    from router.queue import Dispatcher
    from router.shard_client import ShardGroup

prometheus_client.disable_created_metrics()  # no *_created series: they only add noise

REQUEST_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
FIRST_TOKEN_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
INTER_TOKEN_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25,
                         0.5, 1, 2.5)
SHORT_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5, 30)
TOKEN_BUCKETS = tuple(2 ** i for i in range(0, 18))  # 1 .. 131072


# How sluice_router_shard_groups counts each group's state: a group discovery dropped finishes
# what it runs, as a draining one does; one refused for its model is as good as down.
GROUP_STATES = {GroupState.READY: "ready", GroupState.DRAINING: "draining",
                GroupState.RETIRED: "draining", GroupState.CONNECTING: "down",
                GroupState.REFUSED: "down"}


class RouterMetrics:
    def __init__(self, dispatcher: Dispatcher, groups: Callable[[], list[ShardGroup]]):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("sluice_router_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=r)
        self.request_duration = Histogram(
            "sluice_router_request_duration_seconds", "Whole HTTP requests, streams included",
            ["route"], buckets=REQUEST_BUCKETS_S, registry=r)
        self.validation_duration = Histogram(
            "sluice_router_validation_duration_seconds",
            "Parsing, tokenization and checks of a generation request", buckets=SHORT_BUCKETS_S,
            registry=r)
        self.queue_duration = Histogram(
            "sluice_router_queue_duration_seconds",
            "Wait in the router's queue until a shard group takes the request",
            buckets=REQUEST_BUCKETS_S, registry=r)
        self.time_to_first_token = Histogram(
            "sluice_router_time_to_first_token_seconds",
            "From receiving a request to its first generated token", buckets=FIRST_TOKEN_BUCKETS_S,
            registry=r)
        self.inter_token_latency = LoopHistogram(
            "sluice_router_inter_token_latency_seconds",
            "Between consecutive generated tokens of one request", INTER_TOKEN_BUCKETS_S)
        r.register(self.inter_token_latency)
        self.input_tokens = Histogram("sluice_router_input_tokens", "Prompt tokens per request",
                                      buckets=TOKEN_BUCKETS, registry=r)
        self.generated_tokens = Histogram(
            "sluice_router_generated_tokens", "Generated tokens per finished request",
            buckets=TOKEN_BUCKETS, registry=r)
        self.finished = Counter("sluice_router_generations",
                                "Generations by how they ended (finish reason or error kind)",
                                ["reason"], registry=r)
        self.rate_limited = Counter("sluice_router_rate_limited",
                                    "Requests refused by a tenant's rate limit", ["tenant"],
                                    registry=r)
        self.filtered = Counter("sluice_router_content_filtered",
                                "Requests stopped by the content filter", ["direction"],
                                registry=r)
        r.register(_DispatcherCollector(dispatcher, groups))

    def text(self) -> bytes:
        """This process's metrics in the Prometheus text format."""
        return prometheus_client.generate_latest(self.registry)


class LoopHistogram:
    """A histogram observed once per streamed token, without prometheus_client's lock per
    update: only the router's event loop observes it (one thread), so counts in a list and a
    sum do, turned into the histogram's series at scrape time. About a quarter of the cost of a
    locked Histogram.observe."""

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...]):
        self._name, self._documentation = name, documentation
        self._bounds = list(buckets)
        self._counts = [0] * (len(buckets) + 1)  # the last: above every bound
        self._sum = 0.0

    def observe(self, value: float) -> None:
        self._counts[bisect_left(self._bounds, value)] += 1  # le: value <= bound
        self._sum += value

    def describe(self):
        return []

    def collect(self):
        cumulative, buckets = 0, []
        for bound, count in zip(self._bounds + [float("inf")], self._counts):
            cumulative += count
            buckets.append((floatToGoString(bound), cumulative))
        yield HistogramMetricFamily(self._name, self._documentation, buckets=buckets,
                                    sum_value=self._sum)


class _DispatcherCollector:
    """Queue, running requests, failovers and the shard groups, as this process sees them now."""

    def __init__(self, dispatcher: Dispatcher, groups: Callable[[], list[ShardGroup]]):
        self._dispatcher = dispatcher
        self._groups = groups

    def describe(self):
        return []

    def collect(self):
        d = self._dispatcher
        # Held requests count: with no group at all, they are what starts the first one.
        yield GaugeMetricFamily("sluice_router_queue_size",
                                "Requests waiting in the router for a shard group (queued, or "
                                "held while none is ready)", d.queue_size + d.held)
        yield GaugeMetricFamily("sluice_router_running_requests",
                                "Requests sent to a shard group and not finished",
                                d.in_flight - d.queue_size)
        failovers = CounterMetricFamily(
            "sluice_router_failovers", "Requests handed to another shard group: group_lost "
            "(its stream broke), retryable (the group gave it back, draining)", labels=["reason"])
        for reason, count in d.failovers.items():
            failovers.add_metric([reason], count)
        yield failovers
        budget = GaugeMetricFamily("sluice_router_shard_group_free_budget_tokens",
                                   "KV-cache budget a shard group last reported free",
                                   labels=["shard_group"])
        ready = GaugeMetricFamily("sluice_router_shard_group_ready",
                                  "1 while the router's stream to a shard group is up and the "
                                  "group takes requests", labels=["shard_group"])
        states = dict.fromkeys(("ready", "draining", "down"), 0)
        # One series per address: a group retiring while its address came back (and its
        # successor connects) is left out.
        by_uri: dict[str, ShardGroup] = {}
        for group in self._groups():
            if group.uri not in by_uri or by_uri[group.uri].state is GroupState.RETIRED:
                by_uri[group.uri] = group
        for group in by_uri.values():
            budget.add_metric([group.uri], group.free_budget_tokens)
            ready.add_metric([group.uri], 1 if group.ready else 0)
            states[GROUP_STATES[group.state]] += 1
        yield budget
        yield ready
        by_state = GaugeMetricFamily("sluice_router_shard_groups",
                                     "Shard groups known to the router, by state",
                                     labels=["state"])
        for state, count in states.items():
            by_state.add_metric([state], count)
        yield by_state
