"""Real processes on loopback: shard groups, routers and `sluice serve`, on OS-chosen ports.

Each process announces {"event": "ready", "address": ...} on stdout once it listens; the
fixtures wait for that line, keep draining the output, and stop the process afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import grpc
import httpx
import pytest

from shard.tests.tiny_model import write_tiny_model
from sluice.v1 import generate_pb2 as pb
from sluice.v1 import generate_pb2_grpc as pb_grpc

STARTUP_TIMEOUT_S = 300

T = TypeVar("T")


def wait_until(condition: Callable[[], T], what: str, timeout_s: float, interval_s: float = 0.05,
               report: Callable[[], object] | None = None) -> T:
    """Poll `condition` until it returns something truthy, and return that; fail naming `what`
    (and what `report` returns then, if given) once `timeout_s` has passed without it."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        if time.monotonic() > deadline:
            seen = f" (seen: {report()!r})" if report is not None else ""
            raise AssertionError(f"not within {timeout_s} s: {what}{seen}")
        time.sleep(interval_s)
    return value


class Service:
    def __init__(self, argv: list[str], env: dict[str, str] | None = None,
                 new_session: bool = False):
        """new_session: a process group of its own (and of its children), for signals sent to
        the whole group, as a terminal's Ctrl-C is."""
        self.argv = argv
        self.process = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
            env={**os.environ, **(env or {})}, start_new_session=new_session)
        self.output: list[str] = []
        self.ready: dict = {}  # the ready line: address, and the shard's metrics_address
        self.address = self._wait_ready()
        threading.Thread(target=self._drain, daemon=True).start()

    def _wait_ready(self) -> str:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        for line in self.process.stdout:
            self.output.append(line)
            if line.startswith("{"):
                event = json.loads(line)
                if event.get("event") == "ready":
                    self.ready = event
                    return event["address"]
            if time.monotonic() > deadline:
                break
        self.stop()
        raise RuntimeError(f"{self.argv} did not start:\n{''.join(self.output[-40:])}")

    def _drain(self) -> None:
        for line in self.process.stdout:
            self.output.append(line)

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def log_lines(self) -> list[dict]:
        """What it logged so far as JSON objects (its other output skipped)."""
        lines = []
        for line in list(self.output):
            if line.startswith("{"):
                try:
                    lines.append(json.loads(line))
                except ValueError:
                    pass
        return lines


SERVICE_LINES_ON_FAILURE = 60


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A failing test (or fixture) shows the last lines of every service it used: a process's
    own log says why it answered as it did (a group lost, a stream ended), which the client's
    error alone does not."""
    report = yield
    if report.failed:
        for name, value in getattr(item, "funcargs", {}).items():
            if isinstance(value, Service):
                tail = "".join(value.output[-SERVICE_LINES_ON_FAILURE:])
                report.sections.append((f"{name}: its last output ({' '.join(value.argv[2:4])})",
                                        tail))
    return report


def sluice(*args: str) -> list[str]:
    return [sys.executable, "-m", "sluice", *args]


# A KV budget the tests' requests fit many times over: a CPU shard's default (2 GiB of cache,
# zeroed at start) takes seconds to allocate on the 2-core CI machine, in every process.
TEST_BUDGET = ("--max-batch-total-tokens", "16384")


def start_shard(model: str | None = None, *flags: str,
                env: dict[str, str] | None = None) -> Service:
    budget = () if "--max-batch-total-tokens" in flags else TEST_BUDGET
    argv = sluice("shard", "--port", "0", "--num-threads", "1", *budget, *flags)
    return Service(argv + (["--model", model] if model else []), env)


def start_router(*shards: Service, flags: tuple[str, ...] = (),
                 env: dict[str, str] | None = None) -> Service:
    """A router in front of `shards`; one worker process unless `flags` say otherwise (the
    default, one per core, is tested in test_workers.py)."""
    argv = sluice("router", "--port", "0", "--workers", "1", *flags)
    for shard in shards:
        argv += ["--shard-uri", shard.address]
    router = Service(argv, env)
    wait_healthy(router.url)
    return router


def shard_info(shard: Service) -> pb.InfoResponse:
    with grpc.insecure_channel(shard.address) as channel:
        return pb_grpc.TextGenerationStub(channel).Info(pb.InfoRequest(), timeout=10)


def wait_for_free_budget(shard: Service, expected: int, timeout_s: float = 10) -> int:
    """The shard's free budget once it is `expected`, or whatever it is after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while (free := shard_info(shard).free_budget_tokens) != expected:
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    return free


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Redis:
    """A real redis-server on a free loopback port, without persistence."""

    def __init__(self) -> None:
        for _ in range(3):  # the free port may be taken before redis-server binds it
            self.port = free_port()
            self.process = subprocess.Popen(
                ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and self.process.poll() is None:
                try:
                    with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                        return
                except OSError:
                    time.sleep(0.05)
            self.stop()
        raise RuntimeError("redis-server did not start")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


@pytest.fixture
def redis_server() -> Iterator[Redis]:
    server = Redis()
    yield server
    server.stop()


def wait_healthy(url: str, timeout_s: float = 60) -> None:
    def healthy() -> bool:
        try:
            return httpx.get(f"{url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False
    wait_until(healthy, f"{url}/health answers 200", timeout_s, interval_s=0.1)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="module")
def tiny_stack(tiny_model) -> Iterator[tuple[Service, Service]]:
    """A shard group serving the tiny random model, and a router in front of it."""
    shard = start_shard(str(tiny_model))
    router = start_router(shard)
    yield shard, router
    router.stop()
    shard.stop()


@pytest.fixture(scope="session")
def smollm2_serve() -> Iterator[Service]:
    """`sluice serve` with the embedded default model, as `make run` starts it; one for the
    session (the modules that use it only send requests, and each start costs ~9 s)."""
    serve = Service(sluice("serve", "--port", "0", "--num-threads", "2", *TEST_BUDGET))
    yield serve
    serve.stop()
