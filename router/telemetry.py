"""What one HTTP request records as it goes: metrics, spans and its one log line.

Spans (docs/operations.md): `<METHOD> <route>` (the root, a child of the client's traceparent
if it sent one) with children `hold` (only with --hold-without-groups, while no group was
ready), `validate`, `queue`, `dispatch` and `stream`. The dispatch span's
context travels to the shard group in Request.trace_context, where admit, prefill and decode
hang under it.
"""

from __future__ import annotations

import logging
import time

from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from router.metrics import RouterMetrics

log = logging.getLogger("router.requests")
_propagator = TraceContextTextMapPropagator()
_tracer = trace.get_tracer("sluice.router")


class RequestTelemetry:
    def __init__(self, metrics: RouterMetrics, method: str, route: str, request_id: str,
                 headers: dict[str, str]):
        self._metrics = metrics
        self.route = route
        self.started_s = time.perf_counter()
        self._started_ns = time.time_ns()
        self.root = _tracer.start_span(f"{method} {route}", context=_propagator.extract(headers),
                                       kind=SpanKind.SERVER, start_time=self._started_ns)
        self.root.set_attribute("sluice.request_id", request_id)
        self.fields: dict = {"request_id": request_id, "route": route}  # the log line
        self.ratelimit_headers: dict[str, str] = {}  # sent with a successful answer
        self._queue: Span | None = None
        self._dispatch: Span | None = None
        self._stream: Span | None = None
        self._queued_s = self.started_s
        self._validating_s, self._validating_ns = self.started_s, self._started_ns
        self._last_token_s: float | None = None
        self.generated_tokens = 0

    def _child(self, name: str, **kwargs) -> Span:
        return _tracer.start_span(name, context=trace.set_span_in_context(self.root), **kwargs)

    def set_tenant(self, tenant: str) -> None:
        self.fields["tenant"] = tenant
        self.root.set_attribute("sluice.tenant", tenant)

    def held(self) -> None:
        """It waited for a shard group to be ready, from its arrival until now; validation
        starts now."""
        now_s, now_ns = time.perf_counter(), time.time_ns()
        self._child("hold", start_time=self._started_ns).end(end_time=now_ns)
        self.fields["held_s"] = round(now_s - self.started_s, 6)
        self._validating_s, self._validating_ns = now_s, now_ns

    def validated(self, input_tokens: int, max_new_tokens: int) -> None:
        now_s = time.perf_counter()
        self._child("validate", start_time=self._validating_ns).end()
        self._metrics.validation_duration.observe(now_s - self._validating_s)
        self._metrics.input_tokens.observe(input_tokens)
        self.fields.update(input_tokens=input_tokens, max_new_tokens=max_new_tokens,
                           validation_s=round(now_s - self._validating_s, 6))

    def queued(self) -> None:
        self._queue = self._child("queue")
        self._queued_s = time.perf_counter()

    def dispatched(self, shard_group: str, trace_context) -> None:
        """Taken by a shard group (again, after a failover): write the dispatch span's context
        into the wire request."""
        if self._dispatch is None:
            waited_s = time.perf_counter() - self._queued_s
            self._metrics.queue_duration.observe(waited_s)
            self.fields["queue_s"] = round(waited_s, 6)
            if self._queue is not None:
                self._queue.end()
        else:  # a failover: the lost group's span ends here
            self._dispatch.set_attribute("sluice.failed_over", True)
            self._dispatch.end()
            self.fields["failovers"] = self.fields.get("failovers", 0) + 1
        self.fields["shard_group"] = shard_group
        self._dispatch = self._child("dispatch", attributes={"sluice.shard_group": shard_group})
        _propagator.inject(trace_context, context=trace.set_span_in_context(self._dispatch))

    def token(self) -> None:
        now_s = time.perf_counter()
        if self._last_token_s is None:
            self._metrics.time_to_first_token.observe(now_s - self.started_s)
            self.fields["time_to_first_token_s"] = round(now_s - self.started_s, 6)
            self._stream = self._child("stream")
        else:
            self._metrics.inter_token_latency.observe(now_s - self._last_token_s)
        self._last_token_s = now_s
        self.generated_tokens += 1

    def generation_ended(self, outcome: str) -> None:
        """The shard side is over: finished, failed, timed out or cancelled."""
        self._metrics.finished.labels(outcome).inc()
        if outcome in ("length", "eos_token", "stop_sequence", "content_filter"):
            self._metrics.generated_tokens.observe(self.generated_tokens)
        self.fields.update(finish_reason=outcome, generated_tokens=self.generated_tokens)
        for span in (self._queue, self._dispatch, self._stream):
            if span is not None and span.is_recording():
                span.set_attribute("sluice.finish_reason", outcome)
                span.end()

    def ended(self, status: int) -> None:
        """The HTTP exchange is over: count it, end the root span, write the log line."""
        duration_s = time.perf_counter() - self.started_s
        self._metrics.requests.labels(self.route, str(status)).inc()
        self._metrics.request_duration.labels(self.route).observe(duration_s)
        self.root.set_attribute("http.response.status_code", status)
        if status >= 500:
            self.root.set_status(Status(StatusCode.ERROR))
        self.root.end()
        context = self.root.get_span_context()
        if context.is_valid:
            self.fields["trace_id"] = format(context.trace_id, "032x")
        self.fields.update(status=status, duration_s=round(duration_s, 6))
        log.info("request", extra={"fields": self.fields})
