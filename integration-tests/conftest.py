"""Real processes on loopback: shard groups, routers and `sluice serve`, on OS-chosen ports.

Each process announces {"event": "ready", "address": ...} on stdout once it listens; the
fixtures wait for that line, keep draining the output, and stop the process afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from shard.tests.tiny_model import write_tiny_model

STARTUP_TIMEOUT_S = 300


class Service:
    def __init__(self, argv: list[str], env: dict[str, str] | None = None):
        self.argv = argv
        self.process = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
            env={**os.environ, **(env or {})})
        self.output: list[str] = []
        self.address = self._wait_ready()
        threading.Thread(target=self._drain, daemon=True).start()

    def _wait_ready(self) -> str:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        for line in self.process.stdout:
            self.output.append(line)
            if line.startswith("{"):
                event = json.loads(line)
                if event.get("event") == "ready":
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


def sluice(*args: str) -> list[str]:
    return [sys.executable, "-m", "sluice", *args]


def start_shard(model: str | None = None, *flags: str) -> Service:
    argv = sluice("shard", "--port", "0", "--num-threads", "1", *flags)
    return Service(argv + (["--model", model] if model else []))


def start_router(*shards: Service, flags: tuple[str, ...] = ()) -> Service:
    argv = sluice("router", "--port", "0", *flags)
    for shard in shards:
        argv += ["--shard-uri", shard.address]
    router = Service(argv)
    wait_healthy(router.url)
    return router


def wait_healthy(url: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not become healthy")


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


@pytest.fixture(scope="module")
def smollm2_serve() -> Iterator[Service]:
    """`sluice serve` with the embedded default model, as `make run` starts it."""
    serve = Service(sluice("serve", "--port", "0", "--num-threads", "2"))
    yield serve
    serve.stop()
