"""`sluice shard`: one shard group (rank 0, which starts the others), served over gRPC.

Start-up: start the other ranks, build, warm up, then listen. When it is ready it prints one
JSON line on stdout, {"event": "ready", "service": "shard", "address": "HOST:PORT"}, so a
supervisor can use --port 0 and learn the port the OS chose.

Stop: SIGTERM drains (--shutdown-grace), then the ranks stop and the process exits 0. A
failure of the group (a rank dies or hangs, the engine thread ends) makes it NOT_SERVING, ends
every stream with UNAVAILABLE and exits non-zero.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence as Seq
from dataclasses import dataclass

import grpc
import torch
from grpc_health.v1 import health_pb2_grpc

import sluice
from shard import config as shard_config
from shard import loader, ranks, runtime
from shard.engine import Engine
from shard.models.llama import split_error
from shard.servicer import Health, TextGenerationServicer
from shard.source import ModelNotFound, resolve
from sluice import logs, tracing
from sluice.v1 import generate_pb2 as pb
from sluice.v1 import generate_pb2_grpc as pb_grpc

log = logging.getLogger("shard")
# After a failure, what the orderly part (streams ended, server stopped) may take before the
# process exits regardless.
_FAILURE_EXIT_S = 5.0


def info(warm: runtime.Warm, engine: Engine) -> pb.InfoResponse:
    built = warm.built
    tok = built.loaded.tokenizer
    return pb.InfoResponse(
        model_id=built.loaded.source.model_id,
        model_dtype=str(built.dtype).removeprefix("torch."),
        device_type=built.device.type,
        attention_backend=built.attention.name,
        num_shards=built.group.world_size,
        block_size=built.budget.block_size,
        max_batch_total_tokens=built.budget.total_tokens,
        max_batch_prefill_tokens=built.config.max_batch_prefill_tokens,
        prefill_chunk_tokens=engine.scheduler.step_tokens_while_decoding,
        max_input_tokens=built.budget.max_input_tokens,
        max_total_tokens=built.budget.max_total_tokens,
        max_batch_size=built.config.max_batch_size,
        free_budget_tokens=engine.allocator.free_tokens,
        tokenizer=pb.Tokenizer(tokenizer_json=tok.tokenizer_json,
                               chat_template=tok.chat_template, bos_token=tok.bos_token,
                               eos_token=tok.eos_token, eos_token_ids=tok.eos_token_ids),
        version=sluice.__version__,
        vocab_size=built.loaded.config.vocab_size,
        quantization=built.loaded.quantization,
    )


def listen_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Failure:
    """The group's one way to fail, from any thread: before serving, exit at once; while
    serving, wake `serve`, which reports it to health and streams and returns 1."""

    def __init__(self, workers: ranks.Workers | None,
                 hard_exit: Callable[[int, ranks.Workers | None], None] | None = None):
        """hard_exit(code, workers): how the process ends when the orderly part hangs."""
        self.workers = workers
        self._hard_exit = hard_exit or _exit_now
        self.reason: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None
        self._lock = threading.Lock()

    def serving(self, loop: asyncio.AbstractEventLoop, event: asyncio.Event) -> None:
        self._loop, self._event = loop, event

    def __call__(self, reason: str) -> None:
        with self._lock:
            if self.reason is not None:
                return
            self.reason = reason
            if self.workers is not None:  # a failed collective: name the rank behind it
                self.reason = self.workers.death(timeout_s=1.0) or reason
        log.error("shard group failed: %s", self.reason)
        if self._loop is None:
            self._hard_exit(1, self.workers)
            return
        # A hang (the engine thread stuck in a collective) must not keep the process alive.
        timer = threading.Timer(_FAILURE_EXIT_S, self._hard_exit, (1, self.workers))
        timer.daemon = True
        timer.start()
        self._loop.call_soon_threadsafe(self._event.set)


def _exit_now(code: int, workers: ranks.Workers | None) -> None:
    if workers is not None:
        workers.kill()
    logging.shutdown()
    sys.stdout.flush()
    os._exit(code)


@dataclass(slots=True)
class Started:
    """Rank 0 of a started, warmed-up group, with its engine (not yet running): what `serve`
    serves, and what benchmarks and tests drive step by step."""

    warm: runtime.Warm
    engine: Engine
    failure: Failure

    @property
    def built(self) -> runtime.Built:
        return self.warm.built

    def info(self) -> pb.InfoResponse:
        return info(self.warm, self.engine)

    def stop_ranks(self) -> None:
        """End the other ranks (their step loops, then their processes)."""
        self.warm.executor.stop()
        if self.failure.workers is not None:
            self.failure.workers.stop(self.built.config.rank_timeout_s)


def start(config: shard_config.ShardConfig, argv: list[str]) -> Started:
    """Start the other ranks (with `argv`, this process's own command line), build and warm up
    every rank. Raises ValueError or ModelNotFound for what cannot start."""
    workers = None
    try:
        device = _device(config.device, 0)
        world_size = _num_shard(config.num_shard, device)
        if world_size > 1:
            # Say what cannot split before starting anything (loading repeats the check).
            error = split_error(loader.read_config(resolve(config.model, config.revision)),
                                world_size)
            if error:
                raise ValueError(error)
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # the ranks share one host
            store = ranks.create_store(world_size)
            workers = ranks.Workers(argv, world_size, store.port, os.environ)
            failure = Failure(workers)
            workers.watch(failure)
            group = ranks.join(ranks.RankSetup(0, world_size, "127.0.0.1", store.port), device,
                               store)
        else:
            failure, group = Failure(None), ranks.alone()
        built = runtime.build(config, group, device)
        warm = runtime.warm_up(built, ranks.PlanChannel(group) if world_size > 1 else None)
    except BaseException:
        if workers is not None:
            workers.kill()
        raise
    engine = runtime.serving_engine(warm, config.metrics_port is not None,
                                    workers.pids if workers else {}, failure)
    return Started(warm, engine, failure)


async def serve(started: Started) -> int:
    """Serve until SIGINT/SIGTERM (drain, then 0) or a failure of the group (1)."""
    warm, engine, failure = started.warm, started.engine, started.failure
    built = warm.built
    config = built.config
    metrics = engine.metrics
    server = grpc.aio.server(options=[("grpc.max_send_message_length", 64 << 20),
                                      ("grpc.max_receive_message_length", 64 << 20)])
    servicer = TextGenerationServicer(engine, lambda: info(warm, engine),
                                      config.tracing.enabled)
    pb_grpc.add_TextGenerationServicer_to_server(servicer, server)
    health = Health()
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    port = server.add_insecure_port(listen_address(config.host, config.port))
    await server.start()
    stop, failed = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    # Before the ready line: a signal right after it must drain, not interrupt.
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    failure.serving(loop, failed)
    engine.start()
    if built.group.world_size > 1:
        ranks.Watchdog(lambda: engine.busy_since, config.rank_timeout_s, failure)
    await health.set(True)
    address = listen_address(config.host, port)
    log.info("shard serving %s on %s (%d rank%s)", built.loaded.source.model_id, address,
             built.group.world_size, "s" if built.group.world_size > 1 else "")
    ready = {"event": "ready", "service": "shard", "address": address}
    if metrics is not None:
        metrics_port = metrics.serve(config.host, config.metrics_port)
        ready["metrics_address"] = listen_address(config.host, metrics_port)
        log.info("shard metrics on http://%s/metrics", ready["metrics_address"])
    print(json.dumps(ready), flush=True)

    waits = [asyncio.ensure_future(e.wait()) for e in (stop, failed)]
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for wait in waits:
        wait.cancel()
    await health.set(False)
    if not failed.is_set():
        await _drain(engine, config.shutdown_grace_s, failed)
    if failed.is_set():
        servicer.fail(f"shard group failed: {failure.reason}")
        await server.stop(1.0)
        return 1
    await server.stop(1.0)
    engine.stop()
    started.stop_ranks()
    return 0


async def _drain(engine: Engine, grace_s: float, failed: asyncio.Event) -> None:
    """Stop taking requests; let the running ones finish within grace_s; hand the rest back
    (retryable errors: routers resume them on other groups)."""
    log.info("shard draining: up to %g s for running requests", grace_s)
    engine.drain()
    deadline = asyncio.get_running_loop().time() + grace_s
    while not engine.idle and not failed.is_set():
        if asyncio.get_running_loop().time() >= deadline:
            log.warning("shard drain: grace period over; handing running requests back")
            engine.drain(hand_over=True)
            break
        await asyncio.sleep(0.05)
    # The hand-over's responses leave on the next engine iteration: give them a moment.
    for _ in range(100):
        if engine.idle:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)


def _device(name: str, rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA device")
    if name == "cuda":
        torch.cuda.set_device(rank)
        return torch.device("cuda", rank)
    return torch.device(name)


def _num_shard(setting: int | None, device: torch.device) -> int:
    """--num-shard: auto is every visible CUDA device (1 on cpu)."""
    if device.type != "cuda":
        return setting or 1
    visible = torch.cuda.device_count()
    if setting is not None and setting > visible:
        raise ValueError(f"--num-shard {setting}: only {visible} CUDA device(s) are visible "
                         "(one rank per GPU)")
    return setting or visible


def main(argv: Seq[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    config = shard_config.parse(argv, os.environ)
    logs.configure(config.log_format)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    try:
        started = start(config, argv)
    except (ModelNotFound, ValueError) as exc:
        log.error("cannot start: %s", exc)
        sys.exit(2)
    provider = tracing.start(config.tracing)
    try:
        code = asyncio.run(serve(started))
    finally:
        tracing.stop(provider)
    if code:
        _exit_now(code, started.failure.workers)
