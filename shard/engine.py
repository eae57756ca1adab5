"""The engine: rank 0's step loop, on a thread of its own.

Routers' streams hand it batches and cancels through an inbox; once per step it emits, to each
stream, one GenerateResponse with every new token of that stream's requests. It owns admission
and the plan of each step; the model runner (shard/runner.py, on every rank) owns the tensors.
The engine hands each plan to `execute` (the runner, behind the broadcast to the other ranks)
and reads back only the sampled tokens.

With async scheduling (on CUDA by default) the loop plans and launches step n+1 before it
waits for step n's tokens, so the host's work (planning, step tensors, emitting) overlaps the
GPU's. Step n+1 feeds each decoding sequence the token step n sampled, read on the device. What
the host learns one step late is only whether a sequence ended on an EOS or stop token: such a
sequence decodes once more in step n+1, and that token is dropped. Length limits are known
ahead, so no sequence is planned past its max_new_tokens. The KV blocks of a sequence that ends
(or is cancelled) while a step using them is in flight go back at once: any later step that
reuses them runs after it on the same CUDA stream.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from shard import plan as step_plan
from shard.metrics import ShardMetrics
from shard.runner import StepOutput
from shard.scheduler import Scheduler, Sequence, State, Step
from sluice.v1 import generate_pb2 as pb

log = logging.getLogger(__name__)

DRAINING = "the shard group is draining (shutting down); another group takes the request"


class Stream:
    """A router's Generate stream as the engine sees it: somewhere to send responses."""

    def send(self, response: pb.GenerateResponse) -> None:  # called on the engine thread
        raise NotImplementedError


@dataclass(slots=True)
class _Submit:
    stream: Stream
    sequences: list[Sequence]


@dataclass(slots=True)
class _Cancel:
    stream: Stream
    request_ids: list[int]


@dataclass(slots=True)
class _Open:
    stream: Stream


@dataclass(slots=True)
class _Close:
    stream: Stream


@dataclass(slots=True)
class _Drain:
    """Take no new requests; with `hand_over`, end the running ones as retryable errors."""

    hand_over: bool


@dataclass(slots=True)
class _Outgoing:
    """What one stream will be told at the end of this iteration, as packed arrays."""

    ids: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reasons: list[int] = field(default_factory=list)
    top_n_counts: list[int] = field(default_factory=list)
    top_n_token_ids: list[int] = field(default_factory=list)
    top_n_logprobs: list[float] = field(default_factory=list)
    admitted: list[int] = field(default_factory=list)
    errors: list[pb.RequestError] = field(default_factory=list)
    prefill_logprobs: list[pb.PrefillLogprobs] = field(default_factory=list)


@dataclass(slots=True)
class _Launched:
    """A step whose forward and sampling are queued; its results come back in `output`."""

    step: Step
    samplers: list[Sequence]
    scoring: list[tuple[Sequence, int]]  # sequences whose prompt rows it scored, and how many
    output: StepOutput
    started_s: float


@dataclass(slots=True, frozen=True)
class ShardLimits:
    """What one request and one step may hold on this shard group."""

    max_input_tokens: int
    max_total_tokens: int
    max_batch_prefill_tokens: int
    max_batch_size: int


class Engine:
    def __init__(self, execute: Callable[[step_plan.StepPlan], StepOutput],
                 scheduler: Scheduler, limits: ShardLimits, vocab_size: int,
                 eos_token_ids: tuple[int, ...], async_scheduling: bool = False,
                 metrics: ShardMetrics | None = None, errors_are_fatal: bool = False,
                 on_failure: Callable[[str], None] = lambda reason: None):
        """execute: runs a plan on every rank, returning rank 0's output. errors_are_fatal:
        an exception in a step stops the engine (several ranks: they may be out of step)
        instead of failing that step's requests. on_failure(reason): the engine thread ended
        without being stopped."""
        self.execute = execute
        self.scheduler = scheduler
        self.allocator = scheduler.allocator
        self.limits = limits
        self.vocab_size = vocab_size
        self.eos_token_ids = frozenset(eos_token_ids)
        self.async_scheduling = async_scheduling
        self.metrics = metrics
        self.errors_are_fatal = errors_are_fatal
        self.on_failure = on_failure
        self.draining = False
        # When the iteration in progress began (monotonic seconds), None while it waits for
        # work: a watchdog reads it (shard/ranks.py).
        self.busy_since: float | None = None
        self.last_step: Step | None = None  # the plan of the latest step, for measurements
        self._in_flight: deque[_Launched] = deque()
        self._admitted: list[Sequence] = []  # admitted, not yet announced in a plan
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sequences: dict[tuple[Stream, int], Sequence] = {}
        self._reported_budget: dict[Stream, int] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False

    # -- called from other threads -------------------------------------------------------------
    def open_stream(self, stream: Stream) -> None:
        self._inbox.put(_Open(stream))

    def submit(self, stream: Stream, sequences: list[Sequence]) -> None:
        self._inbox.put(_Submit(stream, sequences))

    def cancel(self, stream: Stream, request_ids: list[int]) -> None:
        self._inbox.put(_Cancel(stream, request_ids))

    def close_stream(self, stream: Stream) -> None:
        self._inbox.put(_Close(stream))

    def drain(self, hand_over: bool = False) -> None:
        """Stop taking requests (new and waiting ones go back as retryable errors, and every
        stream hears that the group drains); with hand_over, also end the running ones so."""
        self._inbox.put(_Drain(hand_over))

    @property
    def idle(self) -> bool:
        """Nothing admitted, waiting or in flight (read from other threads: a snapshot)."""
        return not self._sequences and not self._in_flight

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join()

    # -- the step loop (engine thread) ---------------------------------------------------------
    def run(self) -> None:
        try:
            while not self._stopping:
                try:
                    self.run_iteration()
                except Exception:
                    if self.errors_are_fatal:
                        raise
                    log.exception("engine step failed; failing its requests")
                    self._fail_running("internal error in the engine step")
        except BaseException as exc:
            log.exception("the engine stopped")
            self.on_failure(f"the engine stopped: {type(exc).__name__}: {exc}")

    def run_iteration(self) -> None:
        """One turn of the loop: take commands, admit, launch one step, emit what finished
        steps sampled. Synchronous, a step's tokens are emitted in the iteration that launched
        it; with async scheduling, in the next one, after the next step has been launched."""
        outgoing: dict[Stream, _Outgoing] = {}
        self._take_inbox(outgoing, block=self.scheduler.idle and not self._in_flight)  # 1.
        self.busy_since = time.monotonic()
        for seq in self.scheduler.admit():                              #    admission
            self._admitted.append(seq)
            outgoing.setdefault(seq.stream, _Outgoing()).admitted.append(seq.request_id)
        step = self.last_step = self.scheduler.schedule()               # 2. plan one step
        if step is not None:
            self._in_flight.append(self._launch(step))                  # 3.-5. on every rank
        keep = 1 if self.async_scheduling and step is not None else 0
        while len(self._in_flight) > keep:
            self._collect(self._in_flight.popleft(), outgoing)          # 6. emit, free
        self._publish(outgoing)
        self.busy_since = None

    def _launch(self, step: Step) -> _Launched:
        started_s = time.perf_counter()
        # Admitted since the last plan (still running: a cancel may come between the two).
        admitted = [s for s in self._admitted if s.state is State.RUNNING]
        self._admitted = []
        plan = step_plan.make(step, admitted)
        output = self.execute(plan)
        samplers = step.decodes + [s for s, n in step.prefills if s.num_cached + n == s.prompt_len]
        scoring = []
        if plan.sampling.prompt_targets is not None:
            scored = plan.scored[len(step.decodes):].tolist()
            scoring = [(s, n) for (s, _), n in zip(step.prefills, scored) if n]
        self.scheduler.advance(step)
        return _Launched(step, samplers, scoring, output, started_s)

    def _take_inbox(self, outgoing: dict[Stream, _Outgoing], block: bool) -> None:
        commands = [self._inbox.get()] if block else []
        while True:
            try:
                commands.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        for command in commands:
            if isinstance(command, _Submit):
                for seq in command.sequences:
                    self._add(seq, outgoing)
            elif isinstance(command, _Cancel):
                for request_id in command.request_ids:
                    seq = self._sequences.pop((command.stream, request_id), None)
                    if seq is not None:
                        self.scheduler.release(seq)
            elif isinstance(command, _Open):
                outgoing.setdefault(command.stream, _Outgoing())  # it learns the budget at once
            elif isinstance(command, _Close):
                for key in [k for k in self._sequences if k[0] is command.stream]:
                    self.scheduler.release(self._sequences.pop(key))
                self._reported_budget.pop(command.stream, None)
                outgoing.pop(command.stream, None)
            elif isinstance(command, _Drain):
                self.draining = True
                for stream in self._reported_budget:  # every stream hears it now
                    outgoing.setdefault(stream, _Outgoing())
                # What waits for budget goes back at once: another group may take it now.
                ending = list(self._sequences.values() if command.hand_over
                              else self.scheduler.waiting)
                self._fail_requests(outgoing, ending, DRAINING, retryable=True)

    def _add(self, seq: Sequence, outgoing: dict[Stream, _Outgoing]) -> None:
        retryable = self.draining
        reason = DRAINING if retryable else self._invalid(seq) or self.scheduler.rejection(seq)
        if reason is None and (seq.stream, seq.request_id) in self._sequences:
            reason = f"request id {seq.request_id} is already in use on this stream"
        if reason is not None:
            outgoing.setdefault(seq.stream, _Outgoing()).errors.append(
                pb.RequestError(id=seq.request_id, message=reason, retryable=retryable))
            if self.metrics is not None and not retryable:
                self.metrics.admission_rejections.inc()
            return
        self._sequences[(seq.stream, seq.request_id)] = seq
        self.scheduler.add(seq)

    def _invalid(self, seq: Sequence) -> str | None:
        """What makes a request unrunnable; routers validate too, but a bad one must not
        reach the forward, where it would fail every request of the step."""
        vocab = self.vocab_size
        if seq.prompt_len == 0:
            return "the prompt is empty"
        if not 0 <= seq.resumed_tokens < seq.prompt_len:
            return "resumed_tokens must be below the number of input tokens"
        # A continuation's input holds the tokens generated before: the client's prompt is
        # what the limit bounds (its whole reservation still fits max_total_tokens).
        if seq.prompt_len - seq.resumed_tokens > self.limits.max_input_tokens:
            return (f"the prompt has {seq.prompt_len - seq.resumed_tokens} tokens; "
                    f"max_input_tokens is {self.limits.max_input_tokens}")
        if int(seq.prompt.max()) >= vocab:
            return f"the prompt holds a token id outside the vocabulary (size {vocab})"
        if seq.max_new_tokens < 1:
            return "max_new_tokens must be at least 1"
        if seq.top_n_tokens > vocab:
            return f"top_n_tokens must be at most the vocabulary size ({vocab})"
        return None

    def _collect(self, launched: _Launched, outgoing: dict[Stream, _Outgoing]) -> None:
        """Wait for a launched step's results and emit them; free the sequences that ended."""
        output = launched.output
        if output.ready is not None:
            output.ready.synchronize()
        if launched.scoring:
            self._keep_prompt_scores(launched.scoring, output.prompt_scores)
        rows = output.host.tolist()
        n_top = output.top_n
        for seq, row in zip(launched.samplers, rows):
            seq.num_pending -= 1
            if seq.state is State.ENDED:
                continue  # ended (EOS, stop token) or cancelled while this step was in flight
            token = int(row[0])
            seq.num_generated += 1
            if seq.trace is not None and seq.num_generated == 1:
                seq.trace.first_token()
            reason = self._finish_reason(seq, token)
            o = outgoing.setdefault(seq.stream, _Outgoing())
            if seq.prefill_logprobs and seq.num_generated == 1:  # its prefill ended this step
                o.prefill_logprobs.append(_prompt_logprobs(seq))
            o.ids.append(seq.request_id)
            o.token_ids.append(token)
            o.logprobs.append(row[1])
            o.finish_reasons.append(reason)
            if n_top:
                n = seq.top_n_tokens
                o.top_n_counts.append(n)
                o.top_n_token_ids.extend(int(x) for x in row[2:2 + n])
                o.top_n_logprobs.extend(row[2 + n_top:2 + n_top + n])
            if reason != pb.FINISH_REASON_NONE:
                del self._sequences[(seq.stream, seq.request_id)]
                self.scheduler.release(seq)
        if self.metrics is not None:
            self.metrics.step_done(launched.step, time.perf_counter() - launched.started_s)

    @staticmethod
    def _keep_prompt_scores(scoring: list[tuple[Sequence, int]],
                            scores: tuple[torch.Tensor, ...]) -> None:
        """Each scoring sequence's slice of the step's prompt scores, kept (on the device)
        until its prefill ends."""
        offset = 0
        for seq, count in scoring:
            seq.prompt_logprobs.append(tuple(
                t[offset:offset + count, :seq.top_n_tokens] if t.dim() == 2 else
                t[offset:offset + count] for t in scores))
            offset += count

    def _finish_reason(self, seq: Sequence, token: int) -> int:
        if token in self.eos_token_ids and not seq.ignore_eos:
            return pb.FINISH_REASON_EOS_TOKEN
        if token in seq.stop_token_ids:
            return pb.FINISH_REASON_STOP_TOKEN
        if seq.num_generated >= seq.max_new_tokens:
            return pb.FINISH_REASON_LENGTH
        return pb.FINISH_REASON_NONE

    def _publish(self, outgoing: dict[Stream, _Outgoing]) -> None:
        free = self.allocator.free_tokens
        waiting = len(self.scheduler.waiting)
        for stream, reported in self._reported_budget.items():
            if reported != free and stream not in outgoing:
                outgoing[stream] = _Outgoing()  # tell every router the budget moved
        for stream, o in outgoing.items():
            response = pb.GenerateResponse(
                admitted_ids=o.admitted, errors=o.errors, free_budget_tokens=free,
                waiting_requests=waiting, prefill_logprobs=o.prefill_logprobs,
                draining=self.draining)
            if o.ids:
                response.tokens.CopyFrom(pb.TokenBatch(
                    ids=o.ids, token_ids=o.token_ids, logprobs=o.logprobs,
                    finish_reasons=o.finish_reasons, top_n_counts=o.top_n_counts,
                    top_n_token_ids=o.top_n_token_ids, top_n_logprobs=o.top_n_logprobs))
            self._reported_budget[stream] = free
            stream.send(response)

    def _fail_running(self, message: str) -> None:
        self._in_flight.clear()
        self._admitted = []
        outgoing: dict[Stream, _Outgoing] = {}
        self._fail_requests(outgoing, list(self._sequences.values()), message, retryable=False)
        self._publish(outgoing)

    def _fail_requests(self, outgoing: dict[Stream, _Outgoing], sequences: list[Sequence],
                       message: str, retryable: bool) -> None:
        """End these requests (running or waiting) with an error."""
        for seq in sequences:
            del self._sequences[(seq.stream, seq.request_id)]
            self.scheduler.release(seq)
            outgoing.setdefault(seq.stream, _Outgoing()).errors.append(
                pb.RequestError(id=seq.request_id, message=message, retryable=retryable))


def _prompt_logprobs(seq: Sequence) -> pb.PrefillLogprobs:
    """What the chunks of `seq`'s prefill scored, in one message (one host sync)."""
    chunks = [torch.cat(columns) for columns in zip(*seq.prompt_logprobs)]
    seq.prompt_logprobs = []
    message = pb.PrefillLogprobs(id=seq.request_id)
    if chunks:
        message.logprobs.extend(chunks[0].tolist())
    if len(chunks) == 3:
        message.top_n_logprobs.extend(chunks[1].flatten().tolist())
        message.top_n_token_ids.extend(chunks[2].flatten().tolist())
    return message
