"""The shard group's gRPC transport: Info, the Generate stream and grpc.health.v1.

It knows messages, not tensors: requests become Sequences for the engine, and the engine's
responses go back on the stream of the router that sent them. Health follows the group: it is
SERVING only while the engine runs and every rank lives, NOT_SERVING from the moment the group
drains or fails.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

import grpc
import torch
from grpc_health.v1 import health, health_pb2

from shard.engine import Engine, Stream
from shard.sampling import SamplingParams
from shard.scheduler import Sequence
from shard.tracing import SequenceTrace
from sluice.v1 import generate_pb2 as pb
from sluice.v1 import generate_pb2_grpc as pb_grpc

log = logging.getLogger("shard")
SERVICE_NAME = "sluice.v1.TextGeneration"


class _Failed:
    """Ends a stream with an error: the group failed."""

    def __init__(self, reason: str):
        self.reason = reason


class RouterStream(Stream):
    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue[pb.GenerateResponse | _Failed | None] = asyncio.Queue()

    def send(self, response: pb.GenerateResponse) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, response)


def to_sequence(request: pb.Request, stream: Stream, traced: bool = False) -> Sequence:
    s, stop = request.sampling, request.stopping
    return Sequence(
        request_id=request.id,
        stream=stream,
        prompt=torch.tensor(list(request.input_ids), dtype=torch.long),
        sampling=SamplingParams(
            temperature=s.temperature, top_k=s.top_k, top_p=s.top_p or 1.0,
            typical_p=s.typical_p or 1.0, repetition_penalty=s.repetition_penalty or 1.0,
            frequency_penalty=s.frequency_penalty, presence_penalty=s.presence_penalty,
            seed=s.seed),
        max_new_tokens=stop.max_new_tokens,
        ignore_eos=stop.ignore_eos,
        stop_token_ids=frozenset(stop.stop_token_ids),
        top_n_tokens=request.top_n_tokens,
        prefill_logprobs=request.prefill_logprobs,
        resumed_tokens=request.resumed_tokens,
        trace=SequenceTrace.start(request.trace_context, request.id) if traced else None,
    )


class TextGenerationServicer(pb_grpc.TextGenerationServicer):
    def __init__(self, engine: Engine, info: Callable[[], pb.InfoResponse], traced: bool):
        self.engine = engine
        self.info = info
        self.traced = traced
        self._streams: set[RouterStream] = set()
        self._failure: str | None = None

    async def Info(self, request: pb.InfoRequest, context) -> pb.InfoResponse:
        return self.info()

    async def Generate(self, request_iterator: AsyncIterator[pb.GenerateRequest],
                       context) -> AsyncIterator[pb.GenerateResponse]:
        if self._failure is not None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, self._failure)
        stream = RouterStream(asyncio.get_running_loop())
        self._streams.add(stream)
        self.engine.open_stream(stream)
        reader = asyncio.create_task(self._read(request_iterator, stream))
        try:
            while (response := await stream.queue.get()) is not None:
                if isinstance(response, _Failed):
                    await context.abort(grpc.StatusCode.UNAVAILABLE, response.reason)
                yield response
        finally:
            self._streams.discard(stream)
            reader.cancel()
            self.engine.close_stream(stream)  # a router that goes away cancels all its requests

    async def _read(self, request_iterator, stream: RouterStream) -> None:
        try:
            async for message in request_iterator:
                if message.HasField("batch"):
                    self.engine.submit(stream, [to_sequence(r, stream, self.traced)
                                                for r in message.batch.requests])
                elif message.HasField("cancel"):
                    self.engine.cancel(stream, list(message.cancel.ids))
        finally:
            stream.queue.put_nowait(None)  # the router closed its side: end the stream

    def fail(self, reason: str) -> None:
        """End every stream, now and later, with UNAVAILABLE (on the event loop's thread)."""
        self._failure = reason
        for stream in self._streams:
            stream.queue.put_nowait(_Failed(reason))


class Health:
    """grpc.health.v1 for the whole server and the TextGeneration service alike."""

    def __init__(self) -> None:
        self.servicer = health.aio.HealthServicer()

    async def set(self, serving: bool) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in ("", SERVICE_NAME):
            await self.servicer.set(name, status)
