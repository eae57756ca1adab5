"""One router request's life in one place: admission → queue → shard group → tokens → end.

A GenerationRequest is one HTTP generation request: its telemetry (spans, metrics, log line),
its rate-limit reservation and its deadline. Each sequence it generates (a choice, a best_of
candidate, one prompt of a list) is a Run: queued, sent to a shard group, fed tokens, moved to
another group when its group is lost (a continuation: prompt + the tokens so far), and ended
once. When the last run ends the request settles: it refunds the tokens its runs did not
generate and records how it ended.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from router.content_filter import OutputGuard
from router.errors import RouterError
from sluice.v1 import generate_pb2 as pb

if TYPE_CHECKING:
    from router.queue import Dispatcher
    from router.shard_client import ShardGroup
    from router.telemetry import RequestTelemetry

_FINISH_NONE = pb.FINISH_REASON_NONE


@dataclass(slots=True)
class TokenEvent:
    """One generated token as a shard group reported it."""

    token_id: int
    logprob: float
    finish_reason: int  # pb.FinishReason; FINISH_REASON_NONE while the run goes on
    top_ids: Sequence[int]  # alternatives, when asked for
    top_logprobs: Sequence[float]


@dataclass(slots=True)
class PromptScores:
    """Logprobs of prompt tokens 1.. (token 0 has none), for runs that asked."""

    logprobs: list[float]
    top_ids: list[list[int]]  # per scored token, its top_n_tokens alternatives
    top_logprobs: list[list[float]]


class RunListener(Protocol):
    """A streamed response (router/sse.py): takes a run's tokens as they come, in the event
    loop's turn after they arrived, instead of a task awaiting next_events()."""

    def on_events(self, run: Run, events: list[TokenEvent]) -> None: ...
    def on_run_error(self, run: Run, error: RouterError) -> None: ...


class Run:
    """One sequence on the shard groups, from the queue to its end.

    The gRPC client (router/shard_client.py) sees `id`, `total_tokens`, `wire_request()` and
    the `on_*` calls; the HTTP handler reads `next_events()`, or hands them to a listener, and
    closes it. Tokens wait in a list until the handler takes them all at once: one wake-up per
    shard step, not per token.
    """

    __slots__ = ("id", "index", "request", "owner", "output_guard", "group", "tokens",
                 "prompt_scores", "finished", "closed", "outcome",
                 "failover_timer", "_dispatcher", "_events", "_error", "_waiter", "_listener",
                 "_loop", "_handing_over")

    def __init__(self, owner: GenerationRequest, index: int, request: pb.Request,
                 output_guard: OutputGuard | None):
        self.id = 0  # set when queued: unique among this router's runs
        self.index = index
        self.request = request  # as the client asked for it
        self.owner = owner
        self.output_guard = output_guard
        self.group: ShardGroup | None = None
        self.tokens: list[int] = []  # generated so far: a continuation resubmits them
        self.prompt_scores: PromptScores | None = None  # set before the first token arrives
        self.finished = False  # the shard side is over: last token, or an error
        self.closed = False
        self.outcome: str | None = None  # finish reason or error kind, once known
        self.failover_timer: asyncio.TimerHandle | None = None
        self._dispatcher: Dispatcher | None = None
        self._events: list[TokenEvent] = []
        self._error: RouterError | None = None
        self._waiter: asyncio.Future | None = None
        self._listener: RunListener | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handing_over = False  # a hand-over to the listener is scheduled

    # -- for the queue and the gRPC client ---------------------------------------------------
    @property
    def total_tokens(self) -> int:
        """Prompt + max_new_tokens: what it reserves on a group (before block rounding), the
        same for a continuation, whose prompt holds the tokens it no longer has to generate."""
        return len(self.request.input_ids) + self.request.stopping.max_new_tokens

    def queued(self, run_id: int, dispatcher: Dispatcher) -> None:
        self.id, self._dispatcher = run_id, dispatcher
        self.request.id = run_id

    def wire_request(self) -> pb.Request:
        """What a group runs: the request itself, or after a failover its continuation (the
        prompt + the tokens already generated, the same seed, what remains to generate)."""
        if not self.tokens:
            return self.request
        wire = pb.Request()
        wire.CopyFrom(self.request)
        wire.input_ids.extend(self.tokens)
        wire.resumed_tokens = len(self.tokens)
        wire.stopping.max_new_tokens -= len(self.tokens)
        wire.prefill_logprobs = False  # the client has them already
        return wire

    def dispatched(self, group: ShardGroup, wire: pb.Request) -> None:
        """Taken by `group`; the request's telemetry follows its first run."""
        self.group = group
        if self.index == 0:
            self.owner.telemetry.dispatched(group.uri, wire.trace_context)

    def on_token(self, token_id: int, logprob: float, finish_reason: int,
                 top_ids: Sequence[int], top_logprobs: Sequence[float]) -> None:
        if self.finished:
            return
        self.tokens.append(token_id)
        if self.index == 0:
            self.owner.telemetry.token()
        if finish_reason != _FINISH_NONE:
            self.finished = True
        self._events.append(TokenEvent(token_id, logprob, finish_reason, top_ids, top_logprobs))
        if self._listener is None:
            self._wake()
        elif not self._handing_over:  # once per run and shard step, not per token
            self._handing_over = True
            self._loop.call_soon(self._hand_over)

    def on_prompt_scores(self, scores: PromptScores) -> None:
        self.prompt_scores = scores

    def on_error(self, error: RouterError) -> None:
        """The run cannot go on anywhere: the handler gets `error` after the tokens before it."""
        if self.finished:
            return
        self.finished = True
        self._error = error
        self._wake()

    def on_group_lost(self, reason: str, retryable_error: bool) -> None:
        """Its group failed, drained, or gave it back: go on elsewhere (router/queue.py)."""
        self.group = None
        if not self.finished and not self.closed and self._dispatcher is not None:
            self._dispatcher.fail_over(self, reason, retryable_error)

    # -- for the HTTP handler ----------------------------------------------------------------
    async def next_events(self) -> list[TokenEvent]:
        """Every token that arrived since the last call (at least one); raises the run's
        error once they are all taken."""
        while not self._events:
            if self._error is not None:
                raise self._error
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        events, self._events = self._events, []
        return events

    def listen(self, listener: RunListener) -> None:
        """From now on, hand every batch of tokens (what arrived since the last hand-over) and
        then the run's error to `listener`, once per event-loop turn: no task wakes up per
        shard step. Tokens that arrived before are handed over in the next turn."""
        self._listener = listener
        self._loop = asyncio.get_running_loop()
        if self._events or self._error is not None:
            self._schedule_hand_over()

    def fail(self, error: RouterError) -> None:
        """End it from the router's side (a timeout, a drain): stop it on its group, report."""
        if self.finished:
            return
        if self._dispatcher is not None:
            self._dispatcher.withdraw(self)
        self.on_error(error)

    def finish(self, outcome: str) -> None:
        """The handler saw its last token (or stopped it on a stop string or the filter)."""
        self.outcome = outcome

    def close(self) -> None:
        """The handler is done with it: withdraw it from its group or the queue if it still
        runs, and settle. Several paths close a run (the stream's end, a disconnect, a
        background task); only the first counts."""
        if self.closed:
            return
        self.closed = True
        if self.outcome is None:
            self.outcome = self._error.error_type if self._error is not None else "cancelled"
        if self._dispatcher is not None:
            self._dispatcher.withdraw(self)
        self.finished = True
        self.owner.run_closed(self)

    def _wake(self) -> None:
        if self._listener is not None:
            if not self._handing_over:
                self._schedule_hand_over()
            return
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _schedule_hand_over(self) -> None:
        self._handing_over = True
        self._loop.call_soon(self._hand_over)

    def _hand_over(self) -> None:
        """The tokens first, then the error (the listener may close the run on a token)."""
        self._handing_over = False
        if self.closed:
            self._events = []
            return
        if self._events:
            events, self._events = self._events, []
            self._listener.on_events(self, events)
        if self._error is not None and not self.closed:
            self._listener.on_run_error(self, self._error)


class GenerationRequest:
    """One HTTP generation request: its runs, telemetry, rate-limit reservation and deadline."""

    def __init__(self, requests: list[pb.Request], telemetry: RequestTelemetry,
                 output_guard: Callable[[], OutputGuard] | None,
                 settle: Callable[[GenerationRequest], None]):
        self.telemetry = telemetry
        self.runs = [Run(self, i, r, output_guard() if output_guard else None)
                     for i, r in enumerate(requests)]
        self._settle = settle
        self._open = len(self.runs)
        self._deadline: asyncio.TimerHandle | None = None

    @property
    def max_new_tokens(self) -> int:
        return sum(run.request.stopping.max_new_tokens for run in self.runs)

    @property
    def generated_tokens(self) -> int:
        return sum(len(run.tokens) for run in self.runs)

    def fail(self, error: RouterError) -> None:
        for run in self.runs:
            run.fail(error)

    def fail_after(self, timeout_s: float, error: RouterError) -> None:
        """The request's deadline (--request-timeout): past it, every run ends with `error`."""
        self._deadline = asyncio.get_running_loop().call_later(timeout_s, self.fail, error)

    def close(self) -> None:
        for run in self.runs:
            run.close()

    def run_closed(self, run: Run) -> None:
        self._open -= 1
        if self._open == 0:
            if self._deadline is not None:
                self._deadline.cancel()
            self._settle(self)

    @property
    def outcome(self) -> str:
        """How the request ended, as the first run tells (its telemetry follows that run)."""
        return self.runs[0].outcome or "cancelled"
