"""--workers N: router processes that share the HTTP port, and one /metrics for all of them.

The parent process reserves the port, makes a folder for what the workers share (on /dev/shm
where it exists), forks the workers and supervises them: it forwards SIGTERM (each worker
drains), restarts a worker that dies, and prints the ready line once every worker listens.
Each worker binds the port with SO_REUSEPORT, so the kernel spreads connections over them, and
opens its own stream to every shard group: nothing else changes, routers are stateless.

What they share: the rate-limit buckets (router/shared_buckets.py), so per-key limits stay
exact; whether each has a ready shard group (a marker file per worker), so that /health on any
of them is green only once every worker can take a request (the kernel hands a connection to
any worker; one still connecting would answer 503); and their metrics. Each worker answers
its own metrics' text on a Unix socket in the shared folder; GET /metrics on any worker asks
the others and adds theirs to its own: counters and histograms summed, the queue and running
gauges summed, the shard groups' gauges as the answering worker sees them (every worker sees
the same groups; summing them would count each group once per worker).
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from router import shared_buckets
from router.discovery import uri

log = logging.getLogger(__name__)

SUMMED_GAUGES = frozenset({"sluice_router_queue_size", "sluice_router_running_requests"})
_PEER_TIMEOUT_S = 2.0
_RESTART_DELAY_S = 1.0  # between a worker's death and its replacement
_PR_SET_PDEATHSIG = 1


@dataclass(slots=True, frozen=True)
class Worker:
    """Which worker this process is, and where the workers meet."""

    index: int
    count: int
    directory: Path

    def metrics_socket(self, index: int) -> Path:
        return self.directory / f"metrics-{index}.sock"

    @property
    def buckets(self) -> Path:
        return self.directory / "ratelimit-buckets"

    def ready_marker(self, index: int) -> Path:
        return self.directory / f"ready-{index}"


def mark_ready(worker: Worker, ready: bool) -> None:
    """Tell the other workers whether this one has a ready shard group. A folder that cannot
    take the marker costs only readiness (logged), never the stream that changed."""
    marker = worker.ready_marker(worker.index)
    try:
        if ready:
            marker.touch()
        else:
            marker.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("router worker %d: readiness marker %s: %s", worker.index, marker, exc)


def unready(worker: Worker) -> list[int]:
    """The workers that have no ready shard group (this one included, if so)."""
    return [i for i in range(worker.count) if not worker.ready_marker(i).exists()]


def bind(host: str, port: int, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def address_of(sock: socket.socket) -> str:
    return uri(*sock.getsockname()[:2])


# -- the parent ----------------------------------------------------------------------------------
def supervise(host: str, port: int, count: int,
              run_worker: Callable[[Worker, socket.socket, Callable[[], None]], None]) -> int:
    """Start `count` workers on one port and keep them running until SIGTERM; exit code."""
    # The parent holds the port bound, not listening: connections go to the workers only.
    reserved = bind(host, port, reuse_port=True)
    port = reserved.getsockname()[1]
    shm = Path("/dev/shm")
    directory = Path(tempfile.mkdtemp(prefix="sluice-router-",
                                      dir=shm if shm.is_dir() else None))
    shared_buckets.create(directory)
    context = multiprocessing.get_context("fork")  # before any thread, channel or event loop
    ready = context.Queue()
    stop = {"signals": 0}

    def on_signal(signum, frame) -> None:
        stop["signals"] += 1
        for process in processes.values():
            if process.is_alive():
                os.kill(process.pid, signal.SIGTERM)

    def start(index: int) -> multiprocessing.Process:
        worker = Worker(index, count, directory)
        process = context.Process(target=_worker_main, name=f"router worker {index}",
                                  args=(worker, host, port, run_worker, ready), daemon=False)
        process.start()
        return process

    processes = {i: start(i) for i in range(count)}
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    try:
        listening = 0
        while listening < count:
            if not stop["signals"] and any(not p.is_alive() for p in processes.values()):
                log.error("a router worker exited while starting")
                on_signal(signal.SIGTERM, None)
                return 2
            try:
                ready.get(timeout=0.2)
                listening += 1
            except Exception:  # queue.Empty, or an interrupted wait
                pass
        address = address_of(reserved)
        log.info("router listening on http://%s with %d workers", address, count)
        print(json.dumps({"event": "ready", "service": "router", "address": address}),
              flush=True)
        code = 0
        while True:
            time.sleep(0.2)
            for index, process in list(processes.items()):
                if process.is_alive():
                    continue
                if stop["signals"]:
                    code = code or (process.exitcode or 0)
                    continue
                log.error("router worker %d exited with code %s; starting it again", index,
                          process.exitcode)
                # Not ready until the new one has connected (a killed one left its marker).
                Worker(index, count, directory).ready_marker(index).unlink(missing_ok=True)
                time.sleep(_RESTART_DELAY_S)
                processes[index] = start(index)
            if stop["signals"] and not any(p.is_alive() for p in processes.values()):
                return code
    finally:
        reserved.close()
        shutil.rmtree(directory, ignore_errors=True)


def _worker_main(worker: Worker, host: str, port: int, run_worker, ready) -> None:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    sock = bind(host, port, reuse_port=True)
    try:
        run_worker(worker, sock, lambda: ready.put(worker.index))
    except KeyboardInterrupt:
        pass
    sys.exit(0)


# -- metrics across workers ------------------------------------------------------------------
async def serve_metrics(worker: Worker, text: Callable[[], bytes]) -> asyncio.AbstractServer:
    """Answer this worker's metrics on its socket: the text, then the connection closes."""
    path = worker.metrics_socket(worker.index)
    path.unlink(missing_ok=True)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(text())
        await writer.drain()
        writer.close()

    return await asyncio.start_unix_server(answer, path=str(path))


async def _peer_text(path: Path) -> str | None:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)),
                                                _PEER_TIMEOUT_S)
        try:
            return (await asyncio.wait_for(reader.read(), _PEER_TIMEOUT_S)).decode()
        finally:
            writer.close()
    except (OSError, asyncio.TimeoutError) as exc:
        log.warning("router worker metrics at %s did not answer (%s): left out", path, exc)
        return None


async def all_metrics(worker: Worker, own: bytes) -> bytes:
    """Every worker's metrics as one router's: this worker's first (its shard-group view)."""
    others = await asyncio.gather(*(_peer_text(worker.metrics_socket(i))
                                    for i in range(worker.count) if i != worker.index))
    return merge([own.decode()] + [t for t in others if t is not None])


class _Families:
    def __init__(self, families):
        self._families = families

    def collect(self):
        return self._families


def merge(texts: list[str]) -> bytes:
    """Prometheus texts of several workers as one: counters and histograms summed, the gauges
    in SUMMED_GAUGES summed, the other gauges from the first text."""
    families: dict[str, tuple] = {}
    for position, text in enumerate(texts):
        for family in text_string_to_metric_families(text):
            if family.name not in families:
                families[family.name] = (family, {(s.name, tuple(sorted(s.labels.items()))): s
                                                  for s in family.samples})
                continue
            summed = family.type in ("counter", "histogram") or family.name in SUMMED_GAUGES
            if not summed:
                continue
            samples = families[family.name][1]
            for s in family.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                known = samples.get(key)
                samples[key] = s if known is None else known._replace(
                    value=known.value + s.value)
    merged = []
    for family, samples in families.values():
        # A histogram's series of one label set stay together, in their order, whichever
        # worker brought them first.
        groups: dict[tuple, list] = {}
        for (_, labels), sample in samples.items():
            groups.setdefault(tuple(kv for kv in labels if kv[0] != "le"), []).append(sample)
        family.samples = [sample for group in groups.values() for sample in group]
        merged.append(family)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(merged))
    return generate_latest(registry)
