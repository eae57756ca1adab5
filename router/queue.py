"""The bounded queue in front of the shard groups, and the choice of group for each request.

Requests leave the queue in arrival order, each to the connected group with the most free
budget that can hold its whole reservation; when none can, the queue waits for budget to move.
The shard group remains the arbiter: if several routers race for the same budget, it queues.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque

from router.errors import Overloaded, RouterError, ShardUnavailable
from router.shard_client import Generation, ShardGroup
from sluice.v1 import generate_pb2 as pb


class Dispatcher:
    def __init__(self, uris: list[str], max_concurrent_requests: int):
        self.groups = [ShardGroup(uri, self.wake) for uri in uris]
        self.max_concurrent_requests = max_concurrent_requests
        self.in_flight = 0  # queued + running
        self._pending: deque[Generation] = deque()
        self._ids = itertools.count(1)
        self._wakeup = asyncio.Event()

    @property
    def ready_groups(self) -> list[ShardGroup]:
        return [g for g in self.groups if g.ready]

    @property
    def queue_size(self) -> int:
        return len(self._pending)

    def submit(self, request: pb.Request) -> Generation:
        """Queue a request, or refuse it at once when the router is full or has no shards."""
        if not self.ready_groups:
            raise ShardUnavailable("no shard group is connected")
        if self.in_flight >= self.max_concurrent_requests:
            raise Overloaded(f"the model is overloaded: {self.in_flight} requests in flight "
                             f"(max_concurrent_requests={self.max_concurrent_requests})")
        request_id = next(self._ids)
        request.id = request_id
        gen = Generation(request_id, request, self._release)
        self.in_flight += 1
        self._pending.append(gen)
        self.wake()
        return gen

    def _release(self, gen: Generation) -> None:
        self.in_flight -= 1
        if gen.group is None and gen in self._pending:
            self._pending.remove(gen)

    def fail_all(self, error: RouterError) -> int:
        """End every queued and running request with `error`; how many there were."""
        gens = list(self._pending) + [g for group in self.groups for g in group.generations]
        for gen in gens:
            gen.fail(error)
        return len(gens)

    def wake(self) -> None:
        self._wakeup.set()

    async def run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            self._dispatch()

    def _dispatch(self) -> None:
        groups = self.ready_groups
        if not groups:
            while self._pending:  # nowhere to go: every queued request gets its error now
                self._pending.popleft().push(ShardUnavailable("no shard group is connected"))
            return
        while self._pending:
            gen = self._pending[0]
            fitting = [g for g in groups
                       if g.available_tokens >= gen.reserved_tokens(g.info.block_size)]
            if not fitting:
                break  # strict arrival order: wait for budget to move
            group = max(fitting, key=lambda g: g.available_tokens)
            group.reserve(self._pending.popleft())
        for group in groups:
            group.flush()
