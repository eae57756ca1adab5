"""The engine: rank 0's step loop, on a thread of its own.

Routers' streams hand it batches and cancels through an inbox; once per step it emits, to each
stream, one GenerateResponse with every new token of that stream's requests.

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
from dataclasses import dataclass, field

import torch

from shard import batch as step_batch
from shard.kv_cache import BlockAllocator, KVCache
from shard.metrics import ShardMetrics
from shard.sampling import Sampler
from shard.scheduler import Scheduler, Sequence, Step
from sluice.v1 import generate_pb2 as pb

log = logging.getLogger(__name__)

# Prompt rows scored per LM-head call: bounds the [rows, vocab] float32 logits it holds.
_PROMPT_SLICE_ROWS = 256


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
    """SIGTERM: take nothing new, hand back what waits, tell every stream."""


@dataclass(slots=True)
class _GiveBack:
    """The drain's grace is over: hand back what still runs."""


DRAINING = "the shard group is draining (it is shutting down)"


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
    """A step whose forward and sampling are queued on the device; its results travel to
    `host` (pinned, on CUDA), complete once `ready` has passed."""

    step: Step
    samplers: list[Sequence]
    host: torch.Tensor  # [S, 2 + 2 n] float64: token, logprob, top-n ids, top-n logprobs
    top_n: int
    ready: torch.cuda.Event | None
    started_s: float


@dataclass(slots=True, frozen=True)
class Limits:
    max_input_tokens: int
    max_total_tokens: int
    max_batch_prefill_tokens: int
    max_batch_size: int


class Engine:
    def __init__(self, model, kv_cache: KVCache, allocator: BlockAllocator, attention,
                 limits: Limits, eos_token_ids: tuple[int, ...], device: torch.device,
                 with_metrics: bool = False, async_scheduling: bool = False,
                 compiled: bool = False, sampled_rows_only: bool = True):
        self.model = model
        self.kv_cache = kv_cache
        self.allocator = allocator
        self.attention = attention
        self.limits = limits
        self.eos_token_ids = frozenset(eos_token_ids)
        self.device = device
        self.scheduler = Scheduler(allocator, limits.max_batch_size,
                                   limits.max_batch_prefill_tokens, limits.max_total_tokens)
        self.sampler = Sampler(model.config.vocab_size, limits.max_batch_size, device, compiled)
        # Each slot's latest sampled token, where the next step's decode reads it.
        self.last_tokens = torch.zeros(limits.max_batch_size, dtype=torch.long, device=device)
        self.async_scheduling = async_scheduling
        # --last-layer-rows sampled: the last layer's output projection and MLP only for rows
        # whose logits the step reads (LlamaForCausalLM.forward).
        self.sampled_rows_only = sampled_rows_only
        self._in_flight: deque[_Launched] = deque()
        self.metrics = ShardMetrics(allocator, self.scheduler) if with_metrics else None
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sequences: dict[tuple[Stream, int], Sequence] = {}
        self._reported_budget: dict[Stream, int] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.draining = False  # set by the engine thread once it took the drain command
        # Set once captured (on CUDA): DecodeGraphs, PiecewiseGraphs.
        self.graphs = None
        self.piecewise = None
        self.last_step: Step | None = None  # the plan of the latest step, for measurements

    # -- called from other threads -------------------------------------------------------------
    def open_stream(self, stream: Stream) -> None:
        self._inbox.put(_Open(stream))

    def submit(self, stream: Stream, sequences: list[Sequence]) -> None:
        self._inbox.put(_Submit(stream, sequences))

    def cancel(self, stream: Stream, request_ids: list[int]) -> None:
        self._inbox.put(_Cancel(stream, request_ids))

    def close_stream(self, stream: Stream) -> None:
        self._inbox.put(_Close(stream))

    def drain(self) -> None:
        """Stop taking requests: new and waiting ones go back to their routers as retryable
        errors, every stream is told (draining=true) at once; admitted ones run on."""
        self._inbox.put(_Drain())

    def give_back(self) -> None:
        """End what still runs with retryable errors: the routers resume it elsewhere."""
        self._inbox.put(_GiveBack())

    @property
    def busy(self) -> bool:
        """Requests waiting or running (read from another thread: a dict's size)."""
        return bool(self._sequences)

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
        while not self._stopping:
            try:
                self.step()
            except Exception:
                log.exception("engine step failed; failing its requests")
                self._fail_running("internal error in the engine step")

    def step(self) -> None:
        """One iteration: take commands, launch one step, emit what finished steps sampled.

        Synchronous, a step's tokens are emitted in the iteration that launched it; with async
        scheduling, in the next one, after the next step has been launched."""
        outgoing: dict[Stream, _Outgoing] = {}
        self._take_inbox(outgoing, block=self.scheduler.idle and not self._in_flight)  # 1.
        for seq in self.scheduler.admit():                              #    admission
            self.sampler.admit(seq.slot, seq.sampling, seq.prompt, seq.resumed_tokens)
            outgoing.setdefault(seq.stream, _Outgoing()).admitted.append(seq.request_id)
        step = self.last_step = self.scheduler.schedule()               # 2. plan one step
        if step is not None:
            self._in_flight.append(self._launch(step))                  # 3.-5.
        keep = 1 if self.async_scheduling and step is not None else 0
        while len(self._in_flight) > keep:
            self._collect(self._in_flight.popleft(), outgoing)          # 6. emit, free
        self._publish(outgoing)

    def _launch(self, step: Step) -> _Launched:
        """Queue the step's forward and sampling, and the copy of its results to the host."""
        started_s = time.perf_counter()
        # Inference tensors throughout, as in warm-up: compiled stages guard on the kind of
        # tensor too, and a new kind would compile again mid-run.
        with torch.inference_mode():
            batch = step_batch.build(step, self.scheduler.block_tables,  # 3. step tensors
                                     self.allocator.block_size, self.device, self.last_tokens)
            top_n = max((s.top_n_tokens for s in batch.samplers), default=0)
            logits = self._forward(step, batch)                         # 4. forward
            out = self.sampler(logits, [s.sampling for s in batch.samplers],  # 5. sample
                               [s.slot for s in batch.samplers], batch.sample_positions, top_n)
            self.last_tokens.index_copy_(0, batch.sample_slots, out.tokens)
            # Everything the step reports travels in one float64 tensor (token ids are exact
            # in float64): one transfer, one wait.
            parts = [out.tokens[:, None], out.logprobs[:, None]]
            if out.top_ids is not None:
                parts += [out.top_ids, out.top_logprobs]
            packed = torch.cat([p.double() for p in parts], dim=1)
        ready = None
        if self.device.type == "cuda":
            host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            host.copy_(packed, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        else:
            host = packed
        for seq in step.decodes:
            seq.num_cached += 1
        for seq, n in step.prefills:
            seq.num_cached += n
        for seq in batch.samplers:
            seq.num_pending += 1
        return _Launched(step, batch.samplers, host, top_n, ready, started_s)

    def _forward(self, step: Step, batch: step_batch.StepBatch) -> torch.Tensor:
        """Logits of the step's sampling rows, in the model's dtype (the sampler upcasts)."""
        if self.graphs is not None and not step.prefills and self.graphs.fits(len(step.decodes)):
            return self.graphs.replay(batch)  # decode only: no prompt rows to score
        meta = self.attention.prepare(batch.layout)
        # Prompt logprobs read every prompt row: those steps keep all of them.
        rows = (batch.sample_rows if self.sampled_rows_only and batch.prompt_rows is None
                else None)
        if self.piecewise is not None and self.piecewise.fits(batch.input_ids.shape[0]):
            hidden = self.piecewise.run(batch, meta, rows)
        else:
            hidden = self.model(batch.input_ids, batch.positions, self.kv_cache.layers, meta,
                                rows)
        if rows is not None:  # hidden holds the sampling rows alone, in their order
            return self.model.compute_logits(hidden)
        if batch.prompt_rows is not None:  # only requests that asked for them
            self._score_prompt(hidden, batch.prompt_rows)
        return self.model.compute_logits(hidden[batch.sample_rows])

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
                for stream in self._reported_budget:
                    outgoing.setdefault(stream, _Outgoing())  # each learns it now
                for seq in list(self.scheduler.waiting):
                    self._hand_back(seq, outgoing)
            elif isinstance(command, _GiveBack):
                for seq in list(self._sequences.values()):
                    self._hand_back(seq, outgoing)

    def _hand_back(self, seq: Sequence, outgoing: dict[Stream, _Outgoing]) -> None:
        del self._sequences[(seq.stream, seq.request_id)]
        self.scheduler.release(seq)
        outgoing.setdefault(seq.stream, _Outgoing()).errors.append(
            pb.RequestError(id=seq.request_id, message=DRAINING, retryable=True))

    def _add(self, seq: Sequence, outgoing: dict[Stream, _Outgoing]) -> None:
        if self.draining:
            outgoing.setdefault(seq.stream, _Outgoing()).errors.append(
                pb.RequestError(id=seq.request_id, message=DRAINING, retryable=True))
            return
        reason = self._invalid(seq) or self.scheduler.rejection(seq)
        if reason is None and (seq.stream, seq.request_id) in self._sequences:
            reason = f"request id {seq.request_id} is already in use on this stream"
        if reason is not None:
            outgoing.setdefault(seq.stream, _Outgoing()).errors.append(
                pb.RequestError(id=seq.request_id, message=reason))
            if self.metrics is not None:
                self.metrics.admission_rejections.inc()
            return
        self._sequences[(seq.stream, seq.request_id)] = seq
        self.scheduler.add(seq)

    def _invalid(self, seq: Sequence) -> str | None:
        """What makes a request unrunnable; routers validate too, but a bad one must not
        reach the forward, where it would fail every request of the step."""
        vocab = self.model.config.vocab_size
        if seq.prompt_len == 0:
            return "the prompt is empty"
        if seq.resumed_tokens > seq.prompt_len:
            return "resumed_tokens exceeds the prompt"
        # A continuation's prompt holds tokens generated before: the client's prompt is shorter.
        if seq.prompt_len - seq.resumed_tokens > self.limits.max_input_tokens:
            return (f"the prompt has {seq.prompt_len} tokens; max_input_tokens is "
                    f"{self.limits.max_input_tokens}")
        if int(seq.prompt.max()) >= vocab:
            return f"the prompt holds a token id outside the vocabulary (size {vocab})"
        if seq.max_new_tokens < 1:
            return "max_new_tokens must be at least 1"
        if seq.top_n_tokens > vocab:
            return f"top_n_tokens must be at most the vocabulary size ({vocab})"
        return None

    def _score_prompt(self, hidden: torch.Tensor, prompt: step_batch.PromptRows) -> None:
        """Logprobs of the prompt tokens this step's chunks predict, kept on their sequences.

        Unlike sampled tokens', they are the model's raw distribution (no penalty, no
        temperature), as TGI reports them. Rows go through the LM head in slices so that a long
        prompt never holds [prompt, vocab] logits at once."""
        top_n = max(seq.top_n_tokens for seq, _ in prompt.owners)
        parts = []
        for lo in range(0, prompt.rows.shape[0], _PROMPT_SLICE_ROWS):
            rows = prompt.rows[lo:lo + _PROMPT_SLICE_ROWS]
            logprobs = self.model.compute_logits(hidden[rows]).float().log_softmax(-1)
            chosen = logprobs.gather(1, prompt.targets[lo:lo + rows.shape[0], None]).squeeze(1)
            parts.append((chosen, *logprobs.topk(top_n, dim=-1)) if top_n else (chosen,))
        scored = [torch.cat(columns) for columns in zip(*parts)]
        offset = 0
        for seq, count in prompt.owners:
            seq.prompt_logprobs.append(tuple(
                t[offset:offset + count, :seq.top_n_tokens] if t.dim() == 2 else
                t[offset:offset + count] for t in scored))
            offset += count

    def _prompt_logprobs(self, seq: Sequence) -> pb.PrefillLogprobs:
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

    def _collect(self, launched: _Launched, outgoing: dict[Stream, _Outgoing]) -> None:
        """Wait for a launched step's results and emit them; free the sequences that ended."""
        if launched.ready is not None:
            launched.ready.synchronize()
        rows = launched.host.tolist()
        n_top = launched.top_n
        for seq, row in zip(launched.samplers, rows):
            seq.num_pending -= 1
            if seq.slot < 0:
                continue  # ended (EOS, stop token) or cancelled while this step was in flight
            token = int(row[0])
            seq.num_generated += 1
            if seq.trace is not None and seq.num_generated == 1:
                seq.trace.first_token()
            reason = self._finish_reason(seq, token)
            o = outgoing.setdefault(seq.stream, _Outgoing())
            if seq.prefill_logprobs and seq.num_generated == 1:  # its prefill ended this step
                o.prefill_logprobs.append(self._prompt_logprobs(seq))
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
        outgoing: dict[Stream, _Outgoing] = {}
        for (stream, request_id), seq in list(self._sequences.items()):
            self.scheduler.release(seq)
            outgoing.setdefault(stream, _Outgoing()).errors.append(
                pb.RequestError(id=request_id, message=message))
        self._sequences.clear()
        self._publish(outgoing)
