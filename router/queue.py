"""The bounded queue in front of the shard groups, the choice of group, and failover.

Runs leave the queue in arrival order, each to a ready group that can hold its whole
reservation, preferring the most free budget, then the fewest waiting requests: O(groups) per
run. When none can, the queue waits for budget to move. The shard group remains the arbiter when
several routers race for its budget: a run it cannot admit yet waits there.

A run whose group is lost (its stream broke, or it handed the run back with a retryable error)
goes back to the head of the queue, as a continuation when it had generated tokens, and waits at
most --failover-timeout for a group to take it. So does every queued run while no group is
ready.

With --hold-without-groups (scale to zero) a request that arrives while no group is ready is
held before validation (router/hold.py); the dispatcher counts it, in the queue and toward
--max-concurrent-requests, and tells it when a group is ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import deque
from collections.abc import Callable, Iterator

from router.errors import Draining, Overloaded, RouterError, ShardUnavailable
from router.request import Run
from router.shard_client import ShardGroup

log = logging.getLogger(__name__)

FAILOVER_REASONS = ("group_lost", "retryable")


class Dispatcher:
    def __init__(self, groups: Callable[[], list[ShardGroup]], max_concurrent_requests: int,
                 failover_timeout_s: float, hold_without_groups: bool = False):
        self._groups = groups  # every known group, ready or not
        self.max_concurrent_requests = max_concurrent_requests
        self.failover_timeout_s = failover_timeout_s
        self.hold_without_groups = hold_without_groups
        self.failovers = dict.fromkeys(FAILOVER_REASONS, 0)  # runs handed over, by reason
        self.in_flight = 0  # queued + running runs
        self.held = 0  # requests waiting, before validation, for a first group
        self._pending: deque[Run] = deque()
        self._ids = itertools.count(1)
        self._wakeup = asyncio.Event()
        self._group_ready = asyncio.Event()  # set by dispatch() while a group is ready
        self._holding_ends: str | None = None  # why held requests end: the router drains

    @property
    def queue_size(self) -> int:
        return len(self._pending)

    def ready_groups(self) -> list[ShardGroup]:
        return [g for g in self._groups() if g.ready]

    def submit(self, runs: list[Run]) -> None:
        """Queue the runs of one request, or refuse them all at once when the router is full or
        (unless requests are held without groups) no shard group is ready."""
        if not self.hold_without_groups and not self.ready_groups():
            raise ShardUnavailable("no shard group is connected")
        self._check_room(len(runs))
        for run in runs:
            run.queued(next(self._ids), self)
            self.in_flight += 1
            self._pending.append(run)
        self.wake()

    @contextlib.contextmanager
    def holding(self) -> Iterator[None]:
        """One request held while no group is ready: it counts in the queue and toward
        max_concurrent_requests until it leaves (for validation, or with an error)."""
        self._check_room(1)
        self.held += 1
        try:
            yield
        finally:
            self.held -= 1

    async def group_ready(self) -> None:
        """Return once a shard group is ready (at once if one is); raise Draining if
        end_holding comes first."""
        while not self.ready_groups():
            if self._holding_ends is not None:
                raise Draining(self._holding_ends)
            self._group_ready.clear()
            await self._group_ready.wait()

    def end_holding(self, reason: str) -> None:
        """The router drains: requests held for a group end now (503, `reason`), so that their
        clients retry elsewhere rather than wait out the drain."""
        self._holding_ends = reason
        self._group_ready.set()

    def _check_room(self, runs: int) -> None:
        if self.in_flight + self.held + runs > self.max_concurrent_requests:
            raise Overloaded(f"the model is overloaded: {self.in_flight + self.held} requests in "
                             f"flight (max_concurrent_requests={self.max_concurrent_requests})")

    def withdraw(self, run: Run) -> None:
        """The run ended from the router's side (closed, failed): off its group or the queue."""
        if run.failover_timer is not None:
            run.failover_timer.cancel()
            run.failover_timer = None
        if run.group is not None:
            run.group.cancel(run)
            run.group = None
        elif run in self._pending:
            self._pending.remove(run)
        if run.closed:  # Run.close() withdraws once
            self.in_flight -= 1

    def fail_over(self, run: Run, reason: str, retryable_error: bool) -> None:
        """Its group lost it: back to the head of the queue, bounded by --failover-timeout."""
        kind = "retryable" if retryable_error else "group_lost"
        self.failovers[kind] += 1
        log.info("run %d fails over (%s) after %d tokens: %s", run.id, kind, len(run.tokens),
                 reason)
        self._arm_failover_deadline(run, reason)
        self._pending.appendleft(run)
        self.wake()

    def fail_all(self, error: RouterError) -> int:
        """End every queued and running run with `error`; how many there were."""
        runs = list(self._pending) + [s for g in self._groups() for s in g.submissions]
        for run in runs:
            run.fail(error)
        return len(runs)

    def wake(self) -> None:
        self._wakeup.set()

    async def run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            try:
                self.dispatch()
            except Exception:  # a bug: never a dead queue with requests waiting on it
                log.exception("dispatching failed; the request at the head of the queue ends")
                if self._pending:
                    self._pending[0].fail(RouterError("internal error while dispatching"))
                self.wake()

    def dispatch(self) -> None:
        groups = self.ready_groups()
        if not groups:
            for run in self._pending:  # nowhere to go now: wait a bounded time for a group
                if run.failover_timer is None:
                    self._arm_failover_deadline(run, "no shard group is ready")
            return
        self._group_ready.set()  # held requests go on to validation
        pending = self._pending
        while pending:
            run = pending[0]
            best, best_key = None, None
            for group in groups:  # O(groups): the running sums make each look O(1)
                if group.fits(run):
                    key = (group.available_tokens, -group.waiting_requests)
                    if best is None or key > best_key:
                        best, best_key = group, key
            if best is None:
                break  # strict arrival order: wait for budget to move
            pending.popleft()
            if run.failover_timer is not None:
                run.failover_timer.cancel()
                run.failover_timer = None
            wire = run.wire_request()
            run.dispatched(best, wire)
            best.send(run, wire)
        for group in groups:
            group.flush()

    def _arm_failover_deadline(self, run: Run, reason: str) -> None:
        if run.failover_timer is not None:
            return
        timeout_s = self.failover_timeout_s
        run.failover_timer = asyncio.get_running_loop().call_later(
            timeout_s, self._failover_expired, run, reason)

    def _failover_expired(self, run: Run, reason: str) -> None:
        run.failover_timer = None
        run.fail(ShardUnavailable(
            f"no shard group could take the request within {self.failover_timeout_s:g} s "
            f"(--failover-timeout); the last failure: {reason}"))
