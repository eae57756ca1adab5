"""Streamed responses (SSE): a request's tokens pushed to the client as they arrive.

No task wakes up per shard step for a stream: each run hands its new tokens to the response
in the event loop's next turn (router/request.py, Run.listen), which turns them into events
(stop strings, output filter, the route's JSON) and writes them to the server at once. The
route says what its events are (an EventSource); the response owns the stream's life: its
start, its end (the last tokens and the route's closing events in one write), the client
leaving, and a run's error, which ends the stream with the route's error event.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Generator
from typing import Any, Protocol

from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from router.errors import RouterError
from router.request import GenerationRequest, Run, TokenEvent
from router.streaming import RunTokens, Token, disconnected
from router.tokenizer import RouterTokenizer

RAW_SEND = "sluice.raw_send"  # scope key: the server's own send, set by raw_send_in_scope


def raw_send_in_scope(app: ASGIApp) -> ASGIApp:
    """The outermost layer: puts the server's `send` into the scope, where SSEResponse finds it."""
    async def with_raw_send(scope: Scope, receive: Receive, send: Send) -> None:
        scope[RAW_SEND] = send
        await app(scope, receive, send)
    return with_raw_send


class EventSource(Protocol):
    """A streamed route's events, as SSE text."""

    def opening(self) -> str:
        """Sent as the stream starts, before any token ("" for nothing)."""

    def tokens(self, index: int, batch: list[Token]) -> str:
        """The events of a batch of choice `index`'s tokens; the last one of its last batch
        carries the Finish."""

    def closing(self) -> str:
        """After every choice's last token (usage, [DONE])."""

    def failed(self, error: RouterError) -> str:
        """Instead of closing(), when a run fails after the headers went out."""


class SSEResponse(Response):
    """A stream of SSE events: the generation's runs push their tokens into it.

    The response's start and its end go through the whole middleware chain (the request
    middleware records the status and adds headers there; Starlette's layers note that it
    started); the events in between, which no layer looks at, go straight to the server."""

    media_type = "text/event-stream"

    def __init__(self, generation: GenerationRequest, tokenizer: RouterTokenizer,
                 stops: list[list[str]], source: EventSource):
        self.status_code = 200
        self.background = None
        # No body attribute: a stream has no content-length.
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._generation = generation
        self._tokenizer = tokenizer
        self._stops = stops
        self._source = source

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        generation = self._generation
        try:
            await send({"type": "http.response.start", "status": self.status_code,
                        "headers": self.raw_headers})
            stream = _Stream(self._tokenizer, generation.runs, self._stops, self._source,
                             BodyWriter(scope.get(RAW_SEND, send)))
            watcher = asyncio.ensure_future(disconnected(receive))
            watcher.add_done_callback(stream.client_left)
            try:
                tail = await stream.ended  # raises what went wrong in making the events
            finally:
                watcher.cancel()
            if tail is None:
                return  # the client left: nothing more to write
            await stream.writer.drained()
            await send({"type": "http.response.body", "body": tail, "more_body": False})
        finally:
            generation.close()  # the runs still going stop on their groups


class _Stream:
    """The push side of one SSEResponse: every run's tokens, as they come, become the route's
    events, written at once. `ended` is set to the stream's last bytes (the last events and the
    closing ones, or the error event), to None when the client left first, or to the exception
    that broke it."""

    def __init__(self, tokenizer: RouterTokenizer, runs: list[Run], stops: list[list[str]],
                 source: EventSource, writer: BodyWriter):
        self._source = source
        self.writer = writer
        self.ended: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()
        self._runs = [RunTokens(tokenizer, run, stop) for run, stop in zip(runs, stops)]
        self._running = len(runs)
        try:
            opening = source.opening()
            if opening:
                writer.write(opening.encode())
        except BaseException as exc:
            self.ended.set_exception(exc)
            return
        for run in runs:
            run.listen(self)

    def on_events(self, run: Run, events: list[TokenEvent]) -> None:
        if self.ended.done():
            return
        try:
            reader = self._runs[run.index]
            batch = reader.take(events)
            text = self._source.tokens(run.index, batch) if batch else ""
            if reader.done:
                self._running -= 1
                if self._running == 0:
                    self.ended.set_result((text + self._source.closing()).encode())
                    return
            if text:
                self.writer.write(text.encode())
        except RouterError as exc:  # e.g. no group left to name a logprob's token
            self.on_run_error(run, exc)
        except BaseException as exc:  # raised where the response awaits its end
            self.ended.set_exception(exc)

    def client_left(self, _watcher: asyncio.Future) -> None:
        if not self.ended.done():
            self.ended.set_result(None)

    def on_run_error(self, run: Run, error: RouterError) -> None:
        """The first run to fail ends the stream (the response closes the others)."""
        if not self.ended.done():
            try:
                self.ended.set_result(self._source.failed(error).encode())
            except BaseException as exc:
                self.ended.set_exception(exc)


class BodyWriter:
    """Writes body chunks through the server's `send` from plain code, in order.

    `send` is a coroutine function, but a server's send returns at once unless the client reads
    too slowly (it then waits for the socket to drain). So each write starts `send` by hand and
    runs it up to its first wait: nearly always to its end, with no task. A write that does
    wait is finished by a task, and the writes behind it queue until it is done."""

    def __init__(self, send: Send):
        self._send = send
        self._queued: list[bytes] = []
        self._draining: asyncio.Task | None = None

    def write(self, data: bytes) -> None:
        if self._draining is not None:
            self._queued.append(data)
            return
        sending = self._send({"type": "http.response.body", "body": data, "more_body": True})
        try:
            waiting_on = sending.send(None)
        except StopIteration:
            return
        self._draining = asyncio.ensure_future(self._drain(_Resumed(sending, waiting_on)))

    async def drained(self) -> None:
        """Once every chunk written so far went to the server."""
        if self._draining is not None:
            await asyncio.shield(self._draining)

    async def _drain(self, started: Awaitable[None]) -> None:
        try:
            await started
            while self._queued:
                data, self._queued = b"".join(self._queued), []
                await self._send({"type": "http.response.body", "body": data,
                                  "more_body": True})
        finally:
            self._draining = None


class _Resumed:
    """Awaiting this finishes a coroutine that was started by hand and now waits on
    `waiting_on` (what its first send(None) gave): the rest of PEP 380's `await`."""

    __slots__ = ("_coroutine", "_waiting_on")

    def __init__(self, coroutine, waiting_on: Any):
        self._coroutine = coroutine
        self._waiting_on = waiting_on

    def __await__(self) -> Generator[Any, Any, Any]:
        waiting_on = self._waiting_on
        while True:
            try:
                value = yield waiting_on
            except BaseException as exc:  # cancelled while it waits: it gets the exception
                try:
                    waiting_on = self._coroutine.throw(exc)
                except StopIteration as stop:
                    return stop.value
                continue
            try:
                waiting_on = self._coroutine.send(value)
            except StopIteration as stop:
                return stop.value
