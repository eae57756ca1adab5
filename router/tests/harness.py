"""What the router's unit tests share: the queue and groups without HTTP, run against scripted
shard groups (fake_shard.py); the inputs admission takes; and a bounded wait."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import TypeVar

from starlette.requests import Request

from router.groups import ShardGroups
from router.queue import Dispatcher
from router.request import GenerationRequest
from router.state import RouterState
from router.telemetry import RequestTelemetry
from router.tests.fake_shard import FakeShard
from router.validation import Prepared
from sluice.v1 import generate_pb2 as pb

CLIENT_HOST = "127.0.0.9"  # the address every http_request comes from

T = TypeVar("T")


class Telemetry:
    """What a Run tells its request's telemetry, recorded."""

    def __init__(self):
        self.dispatched_to: list[str] = []
        self.tokens = 0

    def dispatched(self, uri: str, trace_context) -> None:
        self.dispatched_to.append(uri)

    def token(self) -> None:
        self.tokens += 1


class Router:
    """The router's queue and groups, without HTTP."""

    def __init__(self, *shards: FakeShard, failover_timeout_s: float = 5,
                 max_concurrent: int = 64):
        self.groups = ShardGroups(lambda: self.dispatcher.wake())
        self.dispatcher = Dispatcher(self.groups.all, max_concurrent, failover_timeout_s)
        self.groups.update("static", {s.address for s in shards})
        self._task = asyncio.create_task(self.dispatcher.run())
        self.settled: list[GenerationRequest] = []

    async def ready(self, count: int) -> None:
        await until(lambda: len(self.dispatcher.ready_groups()) == count)

    def submit(self, prompt: list[int], max_new_tokens: int, runs: int = 1) -> GenerationRequest:
        request = pb.Request(input_ids=prompt,
                             stopping=pb.StoppingParameters(max_new_tokens=max_new_tokens),
                             sampling=pb.SamplingParameters(seed=7, temperature=0.5))
        copies = []
        for _ in range(runs):
            copies.append(pb.Request())
            copies[-1].CopyFrom(request)
        generation = GenerationRequest(copies, Telemetry(), None, self.settled.append)
        self.dispatcher.submit(generation.runs)
        return generation

    def group(self, shard: FakeShard):
        return next(g for g in self.groups.all() if g.uri == shard.address)

    async def stop(self) -> None:
        self._task.cancel()
        await self.groups.stop()


async def until(condition: Callable[[], T], what: str | None = None, timeout_s: float = 5) -> T:
    """Poll `condition`, letting the event loop run between polls, until it returns something
    truthy, and return that; fail naming `what` (by default the condition's source line) once
    `timeout_s` has passed without it."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what or _source(condition)}")
        await asyncio.sleep(0.005)
    return value


def _source(condition: Callable) -> str:
    try:
        return inspect.getsource(condition).strip()
    except (OSError, TypeError):  # defined where no source file is (a REPL), or a builtin
        return repr(condition)


def scenario(test):
    """Run an async test with `count` fake shards started and stopped around it."""
    def run(count: int = 2, **router_args):
        async def main():
            shards = [await FakeShard().start() for _ in range(count)]
            router = Router(*shards, **router_args)
            try:
                await router.ready(count)
                await test(router, *shards)
            finally:
                await router.stop()
                for shard in shards:
                    await shard.stop()
        asyncio.run(main())
    return run


def http_request(state: RouterState) -> Request:
    telemetry = RequestTelemetry(state.metrics, "POST", "/generate", "req-1", {})
    return Request({"type": "http", "method": "POST", "path": "/generate", "headers": [],
                    "client": (CLIENT_HOST, 1234),
                    "state": {"telemetry": telemetry, "tenant": None}})


def prepared(prompt: list[int], max_new_tokens: int) -> Prepared:
    return Prepared(pb.Request(input_ids=prompt, stopping=pb.StoppingParameters(
        max_new_tokens=max_new_tokens)), [], None, len(prompt))
