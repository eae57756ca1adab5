"""A request's spans on the shard group: admit (waiting for budget), prefill, decode.

They hang under the router's dispatch span, whose W3C context arrives in Request.trace_context
(one bidi stream carries many requests, so the context travels per request, not as stream
metadata). The engine only stamps times (at admission, first token, end); the spans are
built once, when the sequence ends.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_propagator = TraceContextTextMapPropagator()
_tracer = trace.get_tracer("sluice.shard")


class SequenceTrace:
    def __init__(self, parent: Context, request_id: int):
        self._parent = parent
        self._request_id = request_id
        self.arrived_ns = time.time_ns()
        self.admitted_ns: int | None = None
        self.first_token_ns: int | None = None

    @classmethod
    def start(cls, carrier: Mapping[str, str], request_id: int) -> "SequenceTrace | None":
        """The trace of a request that carries a trace context; None for one that does not."""
        if "traceparent" not in carrier:
            return None
        return cls(_propagator.extract(dict(carrier)), request_id)

    def admitted(self) -> None:
        self.admitted_ns = time.time_ns()

    def first_token(self) -> None:
        self.first_token_ns = time.time_ns()

    def ended(self, generated_tokens: int) -> None:
        """Finished or cancelled: emit the spans of the phases it reached."""
        now = time.time_ns()
        attributes = {"sluice.request_id": self._request_id}
        phases = [("admit", self.arrived_ns, self.admitted_ns)]
        if self.admitted_ns is not None:
            phases.append(("prefill", self.admitted_ns, self.first_token_ns))
        if self.first_token_ns is not None:
            phases.append(("decode", self.first_token_ns, None))
        for name, start_ns, end_ns in phases:
            span = _tracer.start_span(name, context=self._parent, start_time=start_ns,
                                      attributes=attributes)
            if name == "decode":
                span.set_attribute("sluice.generated_tokens", generated_tokens)
            span.end(end_time=end_ns if end_ns is not None else now)
