"""What one router process holds while it runs: its shard groups, queue and tokenizer."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine

from starlette.requests import Request

from router import admission
from router.config import RouterConfig
from router.errors import ShardUnavailable
from router.metrics import RouterMetrics
from router.queue import Dispatcher
from router.ratelimit import RateLimiter
from router.shard_client import Generation
from router.tokenizer import RouterTokenizer
from router.validation import Prepared, RequestLimits
from sluice.v1 import generate_pb2 as pb

log = logging.getLogger(__name__)

# Longer prompts are tokenized on a worker thread so that the event loop keeps serving.
_INLINE_TOKENIZE_CHARS = 2048


class RouterState:
    def __init__(self, config: RouterConfig):
        self.config = config
        self.dispatcher = Dispatcher(config.shard_uri, config.max_concurrent_requests)
        self.metrics = RouterMetrics(self.dispatcher)
        self.limiter = RateLimiter(config.rate_limit_redis_url)
        self.draining = False  # SIGTERM came: /health is unready, new requests get 503
        self.started_at = int(time.time())
        self._tokenizer: RouterTokenizer | None = None
        self._tasks: list[asyncio.Task] = []
        self._spawned: set[asyncio.Task] = set()

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(g.run(), name=f"shard {g.uri}")
                       for g in self.dispatcher.groups]
        self._tasks.append(asyncio.create_task(self.dispatcher.run(), name="dispatcher"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._spawned, return_exceptions=True)
        await self.limiter.close()

    def spawn(self, work: Coroutine) -> None:
        """Run `work` in the background (a rate-limit refund), keeping it referenced."""
        task = asyncio.create_task(work)
        self._spawned.add(task)
        task.add_done_callback(self._spawned.discard)

    async def admit(self, request: Request, runs: list[Prepared]) -> list[Generation]:
        """Filter, rate-limit and queue the runs of a validated request (router/admission.py)."""
        return await admission.admit(self, request, runs)

    @property
    def info(self) -> pb.InfoResponse:
        """The Info of a connected shard group (all serve the same model)."""
        groups = self.dispatcher.ready_groups
        if not groups:
            raise ShardUnavailable("no shard group is connected")
        return groups[0].info

    @property
    def tokenizer(self) -> RouterTokenizer:
        if self._tokenizer is None:
            self._tokenizer = RouterTokenizer(self.info.tokenizer)
        return self._tokenizer

    @property
    def limits(self) -> RequestLimits:
        """Per-request limits every connected group accepts."""
        infos = [g.info for g in self.dispatcher.ready_groups] or [self.info]
        return RequestLimits(min(i.max_input_tokens for i in infos),
                      min(i.max_total_tokens for i in infos),
                      self.config.max_stop_sequences, self.config.max_top_n_tokens)

    @property
    def model_name(self) -> str:
        return self.config.served_model_name or self.info.model_id

    def submit(self, requests: list[pb.Request]) -> list[Generation]:
        """Queue the runs of one HTTP request; if one is refused, the others are withdrawn."""
        gens: list[Generation] = []
        try:
            for request in requests:
                gens.append(self.dispatcher.submit(request))
        except Exception:
            for gen in gens:
                gen.close()
            raise
        return gens

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return await self._tokenize(self.tokenizer.encode, text, add_special_tokens)

    async def encode_offsets(self, text: str, add_special_tokens: bool = True,
                             ) -> tuple[list[int], list[tuple[int, int]]]:
        return await self._tokenize(self.tokenizer.encode_offsets, text, add_special_tokens)

    async def _tokenize(self, encode, text: str, add_special_tokens: bool):
        if len(text) <= _INLINE_TOKENIZE_CHARS:
            return encode(text, add_special_tokens)
        return await asyncio.to_thread(encode, text, add_special_tokens)
