"""Scale to zero (--hold-without-groups): a request that arrives while no shard group is ready
waits for one instead of getting 503.

It waits before validation, since the tokenizer and the limits come from a group's Info. While
it waits it counts in sluice_router_queue_size (what the shard autoscaler reads to start the
first group) and toward --max-concurrent-requests (429 beyond). It waits at most
--request-timeout from its arrival, the same deadline that then bounds its queue wait and
generation: past it, 503. A client that disconnects meanwhile is let go (499). When the router
drains (SIGTERM), held requests end at once with 503, so that their clients retry elsewhere.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from router.errors import ClientDisconnected, ShardUnavailable
from router.queue import Dispatcher
from router.state import RouterState
from router.streaming import disconnected
from router.telemetry import RequestTelemetry

Endpoint = Callable[[Request], Awaitable[Response]]


def until_group_ready(endpoint: Endpoint) -> Endpoint:
    """`endpoint`, whose requests first wait for a ready group when none is."""
    async def held(request: Request) -> Response:
        state: RouterState = request.app.state.router
        if not state.dispatcher.ready_groups():
            await wait_for_group(state, request)
        return await endpoint(request)
    return held


async def wait_for_group(state: RouterState, request: Request) -> None:
    """Hold `request` until a group is ready; raise ShardUnavailable when its time is up first,
    ClientDisconnected when its client leaves first, Draining when the router drains."""
    telemetry: RequestTelemetry = request.state.telemetry
    timeout_s = state.config.request_timeout_s
    with state.dispatcher.holding():
        try:
            ready = await _ready_before(state.dispatcher, request, telemetry.started_s + timeout_s)
        finally:
            telemetry.held()
    if not ready:
        raise ShardUnavailable(f"no shard group became ready within {timeout_s:g} s "
                               f"(--request-timeout)")


async def _ready_before(dispatcher: Dispatcher, request: Request, deadline_s: float) -> bool:
    """True once a group is ready, False if `deadline_s` (perf_counter) comes first."""
    try:
        # Read now: then the only message left to receive is the client's disconnect.
        await request.body()
    except ClientDisconnect:
        raise ClientDisconnected("the client disconnected while sending its request") from None
    ready = asyncio.ensure_future(dispatcher.group_ready())
    gone = asyncio.ensure_future(disconnected(request.receive))
    left_s = max(deadline_s - time.perf_counter(), 0)
    try:
        done, _ = await asyncio.wait({ready, gone}, timeout=left_s,
                                     return_when=asyncio.FIRST_COMPLETED)
    finally:
        ready.cancel()
        gone.cancel()
    if gone in done:
        raise ClientDisconnected("the client disconnected while waiting for a shard group")
    if ready in done:
        ready.result()  # raises Draining if the router drains
        return True
    return False
