"""What one router process holds while it runs: its shard groups, queue and tokenizer."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine

from starlette.requests import Request

from router import admission, discovery, workers
from router.config import RouterConfig
from router.errors import ShardUnavailable
from router.groups import ShardGroups
from router.metrics import RouterMetrics
from router.queue import Dispatcher
from router.ratelimit import RateLimiter
from router.shared_buckets import SharedBuckets
from router.workers import Worker
from router.request import GenerationRequest
from router.tokenizer import RouterTokenizer
from router.validation import Prepared, RequestLimits
from sluice.v1 import generate_pb2 as pb

log = logging.getLogger(__name__)

# Longer prompts are tokenized on a worker thread so that the event loop keeps serving.
_INLINE_TOKENIZE_CHARS = 2048


class RouterState:
    def __init__(self, config: RouterConfig, worker: Worker | None = None):
        self.config = config
        self.worker = worker  # None: the only router process
        self._marked_ready = False  # what this worker last told the others (workers.mark_ready)
        self.groups = ShardGroups(self._groups_changed)
        self.dispatcher = Dispatcher(self.groups.all, config.max_concurrent_requests,
                                     config.failover_timeout_s, config.hold_without_groups)
        self.metrics = RouterMetrics(self.dispatcher, self.groups.all)
        self.limiter = RateLimiter(config.rate_limit_redis_url, shared=(
            SharedBuckets(worker.buckets) if worker is not None else None))
        self.draining = False  # SIGTERM came: /health is unready, new requests get 503
        self.started_at = int(time.time())
        self._tokenizer: tuple[tuple[str, str], RouterTokenizer] | None = None
        self._tasks: list[asyncio.Task] = []
        self._spawned: set[asyncio.Task] = set()
        self._metrics_server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        config = self.config
        if config.shard_uri:
            self.groups.update("static", set(config.shard_uri))
        if config.shard_dns is not None:
            self._tasks.append(asyncio.create_task(discovery.watch_dns(
                config.shard_dns, config.shard_dns_server, config.discovery_interval_s,
                self.groups.update), name="dns discovery"))
        if config.shard_service is not None:
            self._tasks.append(asyncio.create_task(discovery.watch_service(
                config.shard_service, config.discovery_interval_s, self.groups.update),
                name="kubernetes discovery"))
        self._tasks.append(asyncio.create_task(self.dispatcher.run(), name="dispatcher"))
        if self.worker is not None:
            self._metrics_server = await workers.serve_metrics(self.worker, self.metrics.text)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._metrics_server is not None:
            self._metrics_server.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.groups.stop()
        await asyncio.gather(*self._spawned, return_exceptions=True)
        await self.limiter.close()

    async def metrics_text(self) -> bytes:
        """GET /metrics: this process's metrics, or with --workers every worker's as one."""
        own = self.metrics.text()
        return own if self.worker is None else await workers.all_metrics(self.worker, own)

    def _groups_changed(self) -> None:
        self.dispatcher.wake()
        if self.worker is not None:
            ready = bool(self.dispatcher.ready_groups())
            if ready != self._marked_ready:
                workers.mark_ready(self.worker, ready)
                self._marked_ready = ready

    def unready_workers(self) -> list[int]:
        """The router's workers that have no ready shard group; none for a single process."""
        return [] if self.worker is None else workers.unready(self.worker)

    def spawn(self, work: Coroutine) -> None:
        """Run `work` in the background (a rate-limit refund), keeping it referenced."""
        task = asyncio.create_task(work)
        self._spawned.add(task)
        task.add_done_callback(self._spawned.discard)

    async def admit(self, request: Request, runs: list[Prepared]) -> GenerationRequest:
        """Filter, rate-limit and queue the runs of a validated request (router/admission.py)."""
        return await admission.admit(self, request, runs)

    @property
    def info(self) -> pb.InfoResponse:
        """The Info of a ready shard group (all serve the same model and tokenizer)."""
        groups = self.dispatcher.ready_groups()
        if not groups:
            raise ShardUnavailable("no shard group is connected")
        return groups[0].info

    @property
    def tokenizer(self) -> RouterTokenizer:
        """The ready groups' tokenizer; built again when they change to another model."""
        groups = self.dispatcher.ready_groups()
        if not groups:
            raise ShardUnavailable("no shard group is connected")
        identity = groups[0].identity
        if self._tokenizer is None or self._tokenizer[0] != identity:
            self._tokenizer = (identity, RouterTokenizer(groups[0].info.tokenizer))
        return self._tokenizer[1]

    @property
    def limits(self) -> RequestLimits:
        """Per-request limits every ready group accepts."""
        infos = [g.info for g in self.dispatcher.ready_groups()] or [self.info]
        return RequestLimits(min(i.max_input_tokens for i in infos),
                             min(i.max_total_tokens for i in infos),
                             self.config.max_stop_sequences, self.config.max_top_n_tokens)

    @property
    def model_name(self) -> str:
        return self.config.served_model_name or self.info.model_id

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return await self._tokenize(self.tokenizer.encode, text, add_special_tokens)

    async def encode_offsets(self, text: str, add_special_tokens: bool = True,
                             ) -> tuple[list[int], list[tuple[int, int]]]:
        return await self._tokenize(self.tokenizer.encode_offsets, text, add_special_tokens)

    async def _tokenize(self, encode, text: str, add_special_tokens: bool):
        if len(text) <= _INLINE_TOKENIZE_CHARS:
            return encode(text, add_special_tokens)
        return await asyncio.to_thread(encode, text, add_special_tokens)
