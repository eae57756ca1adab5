"""The shard group's Prometheus metrics, served over HTTP on --metrics-port.

The engine thread records once per step (never per token); budget and queue gauges are read
when Prometheus scrapes. docs/metrics.md lists every metric.
"""

from __future__ import annotations

import os

import prometheus_client
import psutil
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

from shard.kv_cache import BlockAllocator
from shard.scheduler import Scheduler, Step

prometheus_client.disable_created_metrics()  # no *_created series: they only add noise

STEP_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1,
                  2.5, 5)
COUNT_BUCKETS = tuple(2 ** i for i in range(0, 17))  # 1 .. 65536


class ShardMetrics:
    def __init__(self, allocator: BlockAllocator, scheduler: Scheduler,
                 worker_pids: dict[int, int], device_memory_bytes: list[int]):
        """worker_pids: the other ranks' processes by rank; device_memory_bytes: every rank's
        CUDA memory after warm-up (empty on cpu)."""
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.step_duration = Histogram(
            "sluice_shard_step_duration_seconds",
            "One engine step, from building its tensors to emitting its tokens",
            buckets=STEP_BUCKETS_S, registry=r)
        self.batch_sequences = Histogram("sluice_shard_batch_sequences",
                                         "Sequences in one engine step (decodes + prefill chunks)",
                                         buckets=COUNT_BUCKETS, registry=r)
        self.batch_tokens = Histogram("sluice_shard_batch_tokens",
                                      "Tokens in one engine step's forward", buckets=COUNT_BUCKETS,
                                      registry=r)
        self.prefill_tokens = Counter("sluice_shard_prefill_tokens",
                                      "Prompt tokens run through the model", registry=r)
        self.decode_tokens = Counter("sluice_shard_decode_tokens",
                                     "Tokens decoded by running sequences", registry=r)
        self.admission_rejections = Counter(
            "sluice_shard_admission_rejections",
            "Requests refused for good at submission (invalid, or larger than the budget)",
            registry=r)
        r.register(_BudgetCollector(allocator, scheduler))
        r.register(_RankCollector({0: os.getpid(), **worker_pids}, device_memory_bytes))

    def step_done(self, step: Step, duration_s: float) -> None:
        prefill = sum(n for _, n in step.prefills)
        decode = len(step.decodes)
        self.step_duration.observe(duration_s)
        self.batch_sequences.observe(decode + len(step.prefills))
        self.batch_tokens.observe(decode + prefill)
        self.prefill_tokens.inc(prefill)
        self.decode_tokens.inc(decode)

    def serve(self, host: str, port: int) -> int:
        """Serve GET /metrics on a thread; the port it listens on."""
        server, _ = prometheus_client.start_http_server(port, addr=host, registry=self.registry)
        return server.server_port


class _BudgetCollector:
    def __init__(self, allocator: BlockAllocator, scheduler: Scheduler):
        self._allocator = allocator
        self._scheduler = scheduler

    def describe(self):
        return []

    def collect(self):
        a, s = self._allocator, self._scheduler
        yield GaugeMetricFamily("sluice_shard_kv_budget_total_tokens",
                                "KV-cache budget in tokens (max_batch_total_tokens)",
                                a.total_tokens)
        yield GaugeMetricFamily("sluice_shard_kv_budget_used_tokens",
                                "KV-cache budget reserved by admitted requests",
                                a.total_tokens - a.free_tokens)
        # The Gateway API Inference Extension's model-server protocol reads KV-cache utilization
        # (0..1) beside queued and running requests; autoscalers and endpoint pickers compare
        # groups of any budget size by this ratio.
        yield GaugeMetricFamily("sluice_shard_kv_budget_usage_ratio",
                                "Share of the KV-cache budget reserved by admitted requests, 0..1",
                                (a.total_tokens - a.free_tokens) / a.total_tokens
                                if a.total_tokens else 0.0)
        yield GaugeMetricFamily("sluice_shard_running_requests", "Admitted requests",
                                len(s.running))
        yield GaugeMetricFamily("sluice_shard_waiting_requests",
                                "Requests waiting for budget, from every router", len(s.waiting))


class _RankCollector:
    """Per-rank memory: the only values that differ between the ranks of a group."""

    def __init__(self, pids: dict[int, int], device_memory_bytes: list[int]):
        self._processes = {rank: psutil.Process(pid) for rank, pid in pids.items()}
        self._device_memory = device_memory_bytes

    def describe(self):
        return []

    def collect(self):
        resident = GaugeMetricFamily("sluice_shard_rank_resident_memory_bytes",
                                     "Host memory each rank's process holds (RSS)",
                                     labels=["rank"])
        for rank, process in sorted(self._processes.items()):
            try:
                resident.add_metric([str(rank)], process.memory_info().rss)
            except psutil.Error:
                continue  # it just exited: the group is failing
        yield resident
        if any(self._device_memory):
            device = GaugeMetricFamily("sluice_shard_rank_device_memory_bytes",
                                       "CUDA memory each rank reserved by the end of warm-up "
                                       "(weights, KV cache, graphs)", labels=["rank"])
            for rank, used in enumerate(self._device_memory):
                device.add_metric([str(rank)], used)
            yield device
