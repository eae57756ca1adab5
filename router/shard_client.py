"""One shard group as a router sees it: its Info, its budget, and one Generate stream.

The stream carries batches and cancels out and token batches back. The client knows groups and
token batches; what it runs are Submissions (router/request.py's Run): it hands each its
tokens, its errors, and its loss when the group fails, drains or gives it back, and nothing of
HTTP. If the stream breaks, for whatever reason, every submission on it is handed back (the
queue fails it over) and the group reconnects with backoff: no request waits on a dead stream.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Protocol

import grpc

from router.errors import GenerationError
from router.request import PromptScores
from sluice.v1 import generate_pb2 as pb
from sluice.v1 import generate_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
# Info carries the whole tokenizer: Llama 3's is ~9 MB of JSON, over gRPC's 4 MB default.
_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20),
                    ("grpc.max_send_message_length", 64 << 20)]
_INFO_TIMEOUT_S = 10
_BACKOFF_S = (0.1, 5.0)  # first and longest wait between connection attempts
_FINISH_NONE = pb.FINISH_REASON_NONE
_NO_TOP = ()  # a token's alternatives when none were asked for (shared: never mutated)


class Submission(Protocol):
    """What a group runs for the router: router/request.py's Run."""

    id: int

    @property
    def total_tokens(self) -> int: ...
    def wire_request(self) -> pb.Request: ...
    def on_token(self, token_id: int, logprob: float, finish_reason: int,
                 top_ids: Sequence[int], top_logprobs: Sequence[float]) -> None: ...
    def on_prompt_scores(self, scores: PromptScores) -> None: ...
    def on_error(self, error: GenerationError) -> None: ...
    def on_group_lost(self, reason: str, retryable_error: bool) -> None: ...


class GroupState(enum.Enum):
    CONNECTING = "connecting"  # no stream yet (or reconnecting after a failure)
    READY = "ready"  # takes new requests
    DRAINING = "draining"  # finishes what it runs, takes nothing new
    REFUSED = "refused"  # serves another model or tokenizer than this router's groups
    RETIRED = "retired"  # discovery dropped it: no new requests; closed once it is idle


def model_identity(info: pb.InfoResponse) -> tuple[str, str]:
    """What every group of one router must share: the model id, and a digest of the whole
    tokenizer (vocabulary, chat template, special tokens)."""
    tok = info.tokenizer
    digest = hashlib.sha256()
    for part in (tok.tokenizer_json, tok.chat_template, tok.bos_token, tok.eos_token,
                 ",".join(map(str, tok.eos_token_ids))):
        digest.update(part.encode())
        digest.update(b"\0")
    return info.model_id, digest.hexdigest()


class ShardGroup:
    def __init__(self, uri: str, on_change: Callable[[], None],
                 check_identity: Callable[[ShardGroup, tuple[str, str]], str | None]):
        self.uri = uri
        self.info: pb.InfoResponse | None = None  # set once accepted
        self.identity: tuple[str, str] | None = None  # model_identity(info)
        self.state = GroupState.CONNECTING
        self.streaming = False  # accepted, its Generate stream open
        self.free_budget_tokens = 0
        self.waiting_requests = 0
        # Budget sent since the group's last report and not yet admitted: a running sum, so
        # that choosing a group costs O(groups) per request.
        self.unacknowledged_tokens = 0
        self._on_change = on_change
        self._check_identity = check_identity  # None, or why this group must not be used
        self._in_flight: dict[int, Submission] = {}
        self._unacknowledged: dict[int, int] = {}  # sent, not yet admitted: id → tokens
        self._outbox: asyncio.Queue[pb.GenerateRequest | None] = asyncio.Queue()
        self._unsent: list[pb.Request] = []
        self._stop = asyncio.Event()  # retired and idle, or stopped: no reconnecting

    @property
    def ready(self) -> bool:
        return self.state is GroupState.READY

    @property
    def available_tokens(self) -> int:
        """Free budget as last reported, minus what this router sent since and is not admitted."""
        return self.free_budget_tokens - self.unacknowledged_tokens

    def reservation(self, tokens: int) -> int:
        """The budget `tokens` take on this group: whole KV-cache blocks."""
        block = self.info.block_size
        return -(-tokens // block) * block

    def fits(self, sub: Submission) -> bool:
        tokens = sub.total_tokens
        return (tokens <= self.info.max_total_tokens
                and self.reservation(tokens) <= self.available_tokens)

    @property
    def submissions(self) -> list[Submission]:
        """Submissions sent to this group and not ended."""
        return list(self._in_flight.values())

    def send(self, sub: Submission, wire: pb.Request) -> None:
        """Take `sub` on: it counts against available_tokens at once and goes out on flush()."""
        tokens = self.reservation(sub.total_tokens)
        self._in_flight[sub.id] = sub
        self._unacknowledged[sub.id] = tokens
        self.unacknowledged_tokens += tokens
        self._unsent.append(wire)

    def flush(self) -> None:
        """Send what send() took on since the last flush, as one batch."""
        if self._unsent:
            self._outbox.put_nowait(pb.GenerateRequest(batch=pb.Batch(requests=self._unsent)))
            self._unsent = []

    def cancel(self, sub: Submission) -> None:
        if self._in_flight.pop(sub.id, None) is not None:
            self.unacknowledged_tokens -= self._unacknowledged.pop(sub.id, 0)
            self._outbox.put_nowait(pb.GenerateRequest(cancel=pb.Cancel(ids=[sub.id])))
            self._stop_if_retired_and_idle()

    def retire(self) -> None:
        """Discovery dropped it: send nothing new; close the stream once what runs has ended."""
        if self.state is not GroupState.RETIRED:
            log.info("shard group %s left discovery: finishing its %d requests", self.uri,
                     len(self._in_flight))
            self.state = GroupState.RETIRED
            self._stop_if_retired_and_idle()
            self._on_change()

    def unretire(self) -> bool:
        """Discovery finds it again before it was dropped: take requests again if its stream
        is still open; False when it is already closing (a new group takes its place)."""
        if self.state is not GroupState.RETIRED or self._stop.is_set():
            return False
        self.state = GroupState.READY if self.streaming else GroupState.CONNECTING
        log.info("shard group %s is back in discovery", self.uri)
        self._on_change()
        return True

    def stop(self) -> None:
        """End the stream gracefully (the router's side closes first) and stop reconnecting."""
        if not self._stop.is_set():
            self._stop.set()
            self._outbox.put_nowait(None)

    async def run(self) -> None:
        """Connect, stream, and on any failure hand back what is in flight and reconnect."""
        backoff_s = _BACKOFF_S[0]
        while not self._stop.is_set():
            try:
                reason = await self._connect_and_stream()
            except asyncio.CancelledError:
                self._lost("the router stopped")
                raise
            except grpc.aio.AioRpcError as exc:
                reason = f"{exc.code().name}: {exc.details()}"
            except Exception as exc:  # a bug or a malformed message: never a silent dead task
                log.exception("shard group %s: unexpected error on its stream", self.uri)
                reason = f"{type(exc).__name__}: {exc}"
            if self.state in (GroupState.READY, GroupState.DRAINING):
                backoff_s = _BACKOFF_S[0]  # it was serving: the next try comes soon
            self._lost(reason)
            if self._stop.is_set():
                return
            try:
                await asyncio.wait_for(self._stop.wait(), backoff_s)
            except asyncio.TimeoutError:
                pass
            backoff_s = min(backoff_s * 2, _BACKOFF_S[1])

    async def _connect_and_stream(self) -> str:
        """Stream until the stream ends; why it ended."""
        async with grpc.aio.insecure_channel(self.uri, options=_CHANNEL_OPTIONS) as channel:
            stub = pb_grpc.TextGenerationStub(channel)
            info = await stub.Info(pb.InfoRequest(), timeout=_INFO_TIMEOUT_S)
            identity = model_identity(info)
            refusal = self._check_identity(self, identity)
            if refusal is not None:
                if self.state is not GroupState.REFUSED:
                    log.error("shard group %s refused: %s", self.uri, refusal)
                    self.state = GroupState.REFUSED
                    self._on_change()
                return f"refused: {refusal}"
            if self.state is GroupState.REFUSED:
                log.info("shard group %s accepted: it serves this router's model now", self.uri)
                self.state = GroupState.CONNECTING
            self.info, self.identity = info, identity
            self.streaming = True
            async for response in stub.Generate(self._requests()):
                if self.state is GroupState.CONNECTING:
                    self.state = GroupState.READY
                    log.info("shard group %s connected (%s)", self.uri, info.model_id)
                self._on_response(response)
            return "the router closed the stream" if self._stop.is_set() else \
                "the shard group closed its stream"

    async def _requests(self) -> AsyncIterator[pb.GenerateRequest]:
        outbox = self._outbox
        while (message := await outbox.get()) is not None:
            yield message

    def _on_response(self, response: pb.GenerateResponse) -> None:
        self.free_budget_tokens = response.free_budget_tokens
        self.waiting_requests = response.waiting_requests
        if response.draining and self.state is GroupState.READY:
            log.info("shard group %s is draining: no new requests go there", self.uri)
            self.state = GroupState.DRAINING
        unacknowledged = self._unacknowledged
        for request_id in response.admitted_ids:
            self.unacknowledged_tokens -= unacknowledged.pop(request_id, 0)
        for error in response.errors:
            self.unacknowledged_tokens -= unacknowledged.pop(error.id, 0)
            sub = self._in_flight.pop(error.id, None)
            if sub is None:
                continue
            if error.retryable:
                sub.on_group_lost(f"shard group {self.uri}: {error.message}", True)
            else:
                sub.on_error(GenerationError(f"shard group {self.uri}: {error.message}"))
        for scores in response.prefill_logprobs:  # before the tokens: they precede the first
            sub = self._in_flight.get(scores.id)
            if sub is not None:
                sub.on_prompt_scores(_prompt_scores(scores))
        if response.HasField("tokens"):
            self._deliver(response.tokens)
        self._stop_if_retired_and_idle()
        self._on_change()

    def _deliver(self, batch: pb.TokenBatch) -> None:
        in_flight = self._in_flight
        ids, token_ids, logprobs = batch.ids, batch.token_ids, batch.logprobs
        reasons, counts = batch.finish_reasons, batch.top_n_counts
        if len(token_ids) != len(ids) or len(logprobs) != len(ids) or len(reasons) != len(ids):
            raise ValueError(f"a token batch of {len(ids)} ids holds {len(token_ids)} tokens, "
                             f"{len(logprobs)} logprobs and {len(reasons)} finish reasons")
        if not counts:  # no run of this step asked for alternatives: the common case
            for request_id, token_id, logprob, reason in zip(ids, token_ids, logprobs, reasons):
                sub = in_flight.get(request_id)
                if sub is not None:  # None: cancelled while this step ran
                    sub.on_token(token_id, logprob, reason, _NO_TOP, _NO_TOP)
                    if reason != _FINISH_NONE:
                        del in_flight[request_id]
            return
        top_ids, top_logprobs = batch.top_n_token_ids, batch.top_n_logprobs
        offset = 0
        for i, request_id in enumerate(ids):
            n = counts[i]
            sub = in_flight.get(request_id)
            if sub is not None:
                reason = reasons[i]
                sub.on_token(token_ids[i], logprobs[i], reason,
                             list(top_ids[offset:offset + n]) if n else _NO_TOP,
                             list(top_logprobs[offset:offset + n]) if n else _NO_TOP)
                if reason != _FINISH_NONE:
                    del in_flight[request_id]
            offset += n

    def _lost(self, reason: str) -> None:
        """The stream ended: hand every submission back, forget what was not sent."""
        if self.state in (GroupState.READY, GroupState.DRAINING):
            log.warning("shard group %s disconnected: %s", self.uri, reason)
        self.streaming = False
        if self.state is not GroupState.RETIRED and self.state is not GroupState.REFUSED:
            self.state = GroupState.CONNECTING
        lost = list(self._in_flight.values())
        self._in_flight.clear()
        self._unacknowledged.clear()
        self.unacknowledged_tokens = 0
        self.free_budget_tokens = 0
        self._outbox = asyncio.Queue()  # what was not sent belongs to the submissions lost
        if self._stop.is_set():
            self._outbox.put_nowait(None)
        self._unsent = []
        for sub in lost:
            sub.on_group_lost(f"shard group {self.uri} failed: {reason}", False)
        self._on_change()

    def _stop_if_retired_and_idle(self) -> None:
        if self.state is GroupState.RETIRED and not self._in_flight:
            self.stop()


def _prompt_scores(message: pb.PrefillLogprobs) -> PromptScores:
    count = len(message.logprobs)
    ids, logprobs = list(message.top_n_token_ids), list(message.top_n_logprobs)
    n = len(ids) // count if count and len(ids) % count == 0 else 0
    return PromptScores(list(message.logprobs),
                        [ids[i * n:(i + 1) * n] for i in range(count)],
                        [logprobs[i * n:(i + 1) * n] for i in range(count)])
