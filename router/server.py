"""The router process: the HTTP app on uvicorn, and its drain on SIGTERM.

When it listens it prints one JSON line on stdout, {"event": "ready", "service": "router",
"address": "HOST:PORT"}, so that --port 0 can be used and the chosen port learned. With
--workers N > 1 the process supervises N workers that share the port (router/workers.py), and
prints the line once all of them listen; each worker drains on its own.

On SIGTERM (or SIGINT) it drains: /health turns 503 so that Kubernetes stops sending traffic,
new requests get 503, requests in flight run to their end for up to --shutdown-grace seconds
(then end with an error, never silently), and the process exits 0. A second signal cuts the
grace short.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence

import uvicorn
import uvloop

from router import app as router_app
from router import config as router_config
from router import sse, workers
from router.errors import Draining
from router.state import RouterState
from sluice import logs, tracing

log = logging.getLogger("router")
# After the drain, what uvicorn gets to write the last responses and close connections.
_CLOSE_GRACE_S = 5


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        # uvicorn's handlers would close connections at once and re-raise the signal (exit
        # code -15); serve() drains first and exits 0.
        yield


async def drain(state: RouterState, grace_s: float, cut_short: asyncio.Event) -> None:
    """Refuse new work, let what is in flight finish within `grace_s`, then fail the rest."""
    state.draining = True
    dispatcher = state.dispatcher
    dispatcher.end_holding("the router is shutting down; retry on another replica")
    log.info("draining: %d requests in flight, up to %g s", dispatcher.in_flight, grace_s)
    deadline = time.monotonic() + grace_s
    while dispatcher.in_flight and time.monotonic() < deadline and not cut_short.is_set():
        await asyncio.sleep(0.05)
    if dispatcher.in_flight:
        failed = dispatcher.fail_all(Draining("the router shut down before the request ended "
                                              "(--shutdown-grace ran out)"))
        log.warning("drain grace over: %d requests ended with an error", failed)
    log.info("drained")


async def serve(config: router_config.RouterConfig, sock: socket.socket,
                worker: workers.Worker | None = None,
                listening: Callable[[], None] | None = None) -> None:
    """Serve on `sock` until a signal; `listening` is called once it accepts connections (a
    worker tells its parent), else the ready line is printed."""
    app = router_app.build(config, worker)
    # httptools: its chunk writes cost less CPU per streamed token than h11's state machine.
    server = _Server(uvicorn.Config(sse.raw_send_in_scope(app), http="httptools",
                                    log_level="warning", log_config=None, access_log=False,
                                    timeout_graceful_shutdown=_CLOSE_GRACE_S))
    signals = asyncio.Event()
    second_signal = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        (second_signal if signals.is_set() else signals).set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()  # start-up failed: raise its error
            return
        await asyncio.sleep(0.02)
    # What start-up built (modules, the app, the tokenizer) lives as long as the process: out
    # of the collector's sight, a full collection walks only what requests left behind.
    gc.freeze()
    if listening is not None:
        listening()
    else:
        address = workers.address_of(sock)
        log.info("router listening on http://%s", address)
        print(json.dumps({"event": "ready", "service": "router", "address": address}),
              flush=True)
    waiter = asyncio.create_task(signals.wait())
    await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if signals.is_set() and not task.done():
        await drain(app.state.router, config.shutdown_grace_s, second_signal)
        server.should_exit = True
    waiter.cancel()
    await task


def _run(config: router_config.RouterConfig, worker: workers.Worker | None,
         sock: socket.socket, listening: Callable[[], None] | None = None) -> None:
    provider = tracing.start(config.tracing)  # in each worker: its exporter thread
    try:
        # uvloop: its loop and transports in C take less CPU per streamed token.
        uvloop.run(serve(config, sock, worker, listening))
    finally:
        tracing.stop(provider)


def main(argv: Sequence[str] | None = None) -> None:
    config = router_config.parse(argv, os.environ)
    logs.configure(config.log_format)
    try:
        if config.workers == 1:
            _run(config, None, workers.bind(config.host, config.port, reuse_port=False))
        else:
            sys.exit(workers.supervise(
                config.host, config.port, config.workers,
                lambda worker, sock, listening: _run(config, worker, sock, listening)))
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", config.host, config.port, exc)
        sys.exit(2)
