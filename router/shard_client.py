"""One shard group as a router sees it: its Info, its free budget, and one Generate stream.

The stream carries batches and cancels out and token batches back. If it breaks, every request
in flight on it ends with an error (never silence) and the group reconnects with backoff.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc

from router.content_filter import OutputGuard
from router.errors import GenerationError, RouterError, ShardUnavailable
from router.telemetry import RequestTelemetry
from sluice.v1 import generate_pb2 as pb
from sluice.v1 import generate_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
# Info carries the whole tokenizer: Llama 3's is ~9 MB of JSON, over gRPC's 4 MB default.
_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20),
                    ("grpc.max_send_message_length", 64 << 20)]


@dataclass(slots=True)
class TokenEvent:
    """One generated token as the shard group reported it."""

    token_id: int
    logprob: float
    finish_reason: int  # pb.FinishReason; FINISH_REASON_NONE while the request goes on
    top_ids: list[int]
    top_logprobs: list[float]


@dataclass(slots=True)
class PromptScores:
    """Logprobs of prompt tokens 1.. (token 0 has none), for requests that asked."""

    logprobs: list[float]
    top_ids: list[list[int]]  # per scored token, its top_n_tokens alternatives
    top_logprobs: list[list[float]]


class Generation:
    """One request in flight: the shard group feeds it events, the HTTP handler reads them."""

    def __init__(self, request_id: int, request: pb.Request, release: Callable[["Generation"], None]):
        self.id = request_id
        self.request = request
        self.group: ShardGroup | None = None
        self.finished = False
        self.prompt_scores: PromptScores | None = None  # set before the first token arrives
        self.closed = False
        self._events: asyncio.Queue[TokenEvent | RouterError] = asyncio.Queue()
        self._release = release
        # Set by admission (router/admission.py); None for a bare request.
        self.telemetry: RequestTelemetry | None = None
        self.output_guard: OutputGuard | None = None
        self.outcome: str | None = None  # finish reason or error kind, once known
        self.generated_tokens = 0  # tokens the shard produced for it (the rate-limit refund)
        self.on_close: list[Callable[["Generation"], None]] = []

    def reserved_tokens(self, block_size: int) -> int:
        """The budget this request takes on a shard group: whole blocks."""
        tokens = len(self.request.input_ids) + self.request.stopping.max_new_tokens
        return -(-tokens // block_size) * block_size

    def push(self, event: TokenEvent | RouterError) -> None:
        if isinstance(event, RouterError) or event.finish_reason != pb.FINISH_REASON_NONE:
            self.finished = True
        self._events.put_nowait(event)

    async def next_event(self) -> TokenEvent:
        event = await self._events.get()
        if isinstance(event, RouterError):
            raise event
        return event

    def fail(self, error: RouterError) -> None:
        """End it from the router's side (a timeout, a drain): stop it on the shard, report."""
        if not self.finished and self.group is not None:
            self.group.cancel(self)
        self.push(error)

    def close(self) -> None:
        """The handler is done with it: cancel on the shard if still running, free its slot.

        Several paths close a request (the stream's end, a disconnect, a background task);
        only the first counts."""
        if self.closed:
            return
        self.closed = True
        if not self.finished and self.group is not None:
            self.group.cancel(self)
        self.finished = True
        self._release(self)
        for callback in self.on_close:
            callback(self)


def _prompt_scores(message: pb.PrefillLogprobs, top_n: int) -> PromptScores:
    count = len(message.logprobs)
    ids, logprobs = list(message.top_n_token_ids), list(message.top_n_logprobs)
    n = top_n if len(ids) == count * top_n else 0
    return PromptScores(list(message.logprobs),
                        [ids[i * n:(i + 1) * n] for i in range(count)],
                        [logprobs[i * n:(i + 1) * n] for i in range(count)])


class ShardGroup:
    def __init__(self, uri: str, on_change: Callable[[], None]):
        self.uri = uri
        self.info: pb.InfoResponse | None = None
        self.ready = False
        self.free_budget_tokens = 0
        self._on_change = on_change
        self._in_flight: dict[int, Generation] = {}
        self._unacknowledged: dict[int, int] = {}  # submitted, not yet admitted: id → tokens
        self._outbox: asyncio.Queue[pb.GenerateRequest] = asyncio.Queue()
        self._unsent: list[pb.Request] = []

    @property
    def available_tokens(self) -> int:
        """Free budget as last reported, minus what this router sent since and is not admitted."""
        return self.free_budget_tokens - sum(self._unacknowledged.values())

    @property
    def generations(self) -> list[Generation]:
        """Requests sent to this group and not ended."""
        return list(self._in_flight.values())

    def reserve(self, gen: Generation) -> None:
        """Take `gen` on; it counts against available_tokens at once and is sent by flush()."""
        gen.group = self
        if gen.telemetry is not None:
            gen.telemetry.dispatched(self.uri, gen.request.trace_context)
        self._in_flight[gen.id] = gen
        self._unacknowledged[gen.id] = gen.reserved_tokens(self.info.block_size)
        self._unsent.append(gen.request)

    def flush(self) -> None:
        """Send what reserve() took on since the last flush, as one batch."""
        if self._unsent:
            self._outbox.put_nowait(pb.GenerateRequest(batch=pb.Batch(requests=self._unsent)))
            self._unsent = []

    def cancel(self, gen: Generation) -> None:
        if self._in_flight.pop(gen.id, None) is not None:
            self._unacknowledged.pop(gen.id, None)
            self._outbox.put_nowait(pb.GenerateRequest(cancel=pb.Cancel(ids=[gen.id])))

    async def run(self) -> None:
        """Connect, stream, and on any failure fail what is in flight and reconnect."""
        backoff_s = 0.1
        while True:
            try:
                async with grpc.aio.insecure_channel(self.uri, options=_CHANNEL_OPTIONS) as channel:
                    stub = pb_grpc.TextGenerationStub(channel)
                    self.info = await stub.Info(pb.InfoRequest(), timeout=10)
                    async for response in stub.Generate(self._requests()):
                        if not self.ready:
                            self.ready, backoff_s = True, 0.1
                            log.info("shard group %s connected (%s)", self.uri, self.info.model_id)
                        self._on_response(response)
                reason = "the shard group closed its stream"
            except grpc.aio.AioRpcError as exc:
                reason = f"{exc.code().name}: {exc.details()}"
            self._down(reason)
            await asyncio.sleep(backoff_s)
            backoff_s = min(backoff_s * 2, 5.0)

    async def _requests(self) -> AsyncIterator[pb.GenerateRequest]:
        while True:
            yield await self._outbox.get()

    def _on_response(self, response: pb.GenerateResponse) -> None:
        self.free_budget_tokens = response.free_budget_tokens
        for request_id in response.admitted_ids:
            self._unacknowledged.pop(request_id, None)
        for error in response.errors:
            self._unacknowledged.pop(error.id, None)
            gen = self._in_flight.pop(error.id, None)
            if gen is not None:
                gen.push(GenerationError(f"shard group {self.uri}: {error.message}"))
        for scores in response.prefill_logprobs:  # before the tokens: they precede the first
            gen = self._in_flight.get(scores.id)
            if gen is not None:
                gen.prompt_scores = _prompt_scores(scores, gen.request.top_n_tokens)
        if response.HasField("tokens"):
            self._deliver(response.tokens)
        self._on_change()

    def _deliver(self, batch: pb.TokenBatch) -> None:
        counts = batch.top_n_counts
        top_ids, top_logprobs = batch.top_n_token_ids, batch.top_n_logprobs
        offset = 0
        for i, request_id in enumerate(batch.ids):
            n = counts[i] if counts else 0
            gen = self._in_flight.get(request_id)
            if gen is not None:  # None: cancelled while this step ran
                reason = batch.finish_reasons[i]
                gen.push(TokenEvent(batch.token_ids[i], batch.logprobs[i], reason,
                                    list(top_ids[offset:offset + n]),
                                    list(top_logprobs[offset:offset + n])))
                if reason != pb.FINISH_REASON_NONE:
                    del self._in_flight[request_id]
            offset += n

    def _down(self, reason: str) -> None:
        was_ready, self.ready = self.ready, False
        if was_ready:
            log.warning("shard group %s disconnected: %s", self.uri, reason)
        for gen in self._in_flight.values():
            gen.push(ShardUnavailable(f"shard group {self.uri} failed: {reason}"))
        self._in_flight.clear()
        self._unacknowledged.clear()
        self._outbox = asyncio.Queue()  # what was not sent belongs to requests just failed
        self._unsent = []
        self._on_change()
