"""The shard group's gRPC server: Info, the Generate stream and grpc.health.v1.

Start-up order: load weights, size the budget, warm up, then listen. When it is ready it prints
one JSON line on stdout, {"event": "ready", "service": "shard", "address": "HOST:PORT"}, so a
supervisor can use --port 0 and learn the port the OS chose.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Sequence as Seq

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

import sluice
from shard import budget as budgets
from shard import config as shard_config
from shard import decode_gemm as shard_decode_gemm
from shard import fused_mlp as shard_fused_mlp
from shard import loader
from shard.attention import select_backend
from shard.cuda_graphs import (DecodeGraphs, PiecewiseGraphs, parse_batch_sizes,
                               parse_token_sizes)
from shard.engine import Engine, Limits, Stream
from shard.kv_cache import BlockAllocator, KVCache, blocks_for
from shard.parallel import TensorParallel
from shard.sampling import SamplingParams
from shard.scheduler import Sequence, largest_within
from shard.source import ModelNotFound, resolve
from shard.tracing import SequenceTrace
from sluice import logs, tracing
from sluice.v1 import generate_pb2 as pb
from sluice.v1 import generate_pb2_grpc as pb_grpc

log = logging.getLogger("shard")
SERVICE_NAME = "sluice.v1.TextGeneration"


class _Discard(Stream):
    """Where the warm-up request's tokens go."""

    def send(self, response: pb.GenerateResponse) -> None:
        pass


class _RouterStream(Stream):
    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue[pb.GenerateResponse | None] = asyncio.Queue()

    def send(self, response: pb.GenerateResponse) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, response)


class Runtime:
    """Everything a started shard holds: the engine and what Info reports about it."""

    def __init__(self, config: shard_config.ShardConfig):
        self.device = _device(config.device)
        self.dtype = _dtype(config.dtype, self.device)
        if self.device.type == "cuda":
            # The host's tensors per step are small: more threads only add wake-ups (on the
            # H100's 16 cores, a 4,096-element CPU gather took ~1 ms across threads).
            torch.set_num_threads(1)
        if config.num_shard != 1:
            raise ValueError("--num-shard > 1 needs the multi-rank runtime, which is not built "
                             "yet; the layers are tensor-parallel already")
        self.attention = select_backend(config.attention, self.device, config.decode_attention)
        source = resolve(config.model, config.revision)
        log.info("loading %s from %s on %s (%s)", source.model_id, source.path, self.device,
                 self.dtype)
        self.compiled = _wanted(config.compile, self.device)
        fused_rotary = _wanted(config.fused_rotary, self.device)
        if fused_rotary and self.device.type != "cuda":
            raise ValueError("--fused-rotary on needs a CUDA device (it is a Triton kernel)")
        fused_mlp = _quack_wanted("--fused-mlp", config.fused_mlp, self.device, self.dtype,
                                  "SiLU x up stays a separate pass")
        decode_gemm = _quack_wanted("--decode-gemm", config.decode_gemm, self.device,
                                    self.dtype, "decode batches' products stay on cuBLAS")
        self.loaded = loader.load(source, TensorParallel(), self.device, self.dtype,
                                  self.attention, config.load_format, config.quantize,
                                  self.compiled, fused_rotary, fused_mlp, decode_gemm)
        log.info("weights: %s; quantization: %s; elementwise stages %s; rotary and cache "
                 "write %s; SiLU x up %s; decode batches' products %s", self.dtype,
                 self.loaded.quantization, "compiled" if self.compiled else "eager",
                 "fused" if fused_rotary else "separate",
                 "in the gate/up product (steps that shard/fused_mlp.py's fuses names)"
                 if fused_mlp else "a separate pass",
                 f"in quack's narrow tiles at {shard_decode_gemm.MIN_ROWS}-"
                 f"{shard_decode_gemm.MAX_ROWS} rows (shard/decode_gemm.py)"
                 if decode_gemm else "on cuBLAS")
        peak = 0
        if self.device.type == "cuda":
            peak = budgets.profile_peak_bytes(self.loaded.model, self.attention, config,
                                              self.dtype, self.device)
            log.info("weights + largest step: %.2f GiB at peak", peak / 2**30)
        self.budget = budgets.size(config, self.loaded.config, self.dtype,
                                   budgets.kv_cache_bytes(config, self.device, peak))
        log.info("KV-cache budget: %d tokens (%d blocks of %d)", self.budget.total_tokens,
                 self.budget.num_blocks, self.budget.block_size)
        allocator = BlockAllocator(self.budget.num_blocks, self.budget.block_size)
        # One block more than the budget: the scratch block that CUDA-graph padding writes to.
        kv_cache = KVCache(self.loaded.config, 1, self.budget.num_blocks + 1,
                           self.budget.block_size, self.dtype, self.device)
        self.engine = Engine(
            self.loaded.model, kv_cache, allocator, self.attention,
            Limits(self.budget.max_input_tokens, self.budget.max_total_tokens,
                   config.max_batch_prefill_tokens, config.max_batch_size),
            self.loaded.tokenizer.eos_token_ids, self.device,
            with_metrics=config.metrics_port is not None,
            async_scheduling=_wanted(config.async_scheduling, self.device),
            compiled=self.compiled, sampled_rows_only=config.last_layer_rows == "sampled")
        self.config = config

    def warm_up(self) -> None:
        """Compile and capture everything a step may run, then run one short request through
        the whole step path before serving: compiling mid-run would stall every running
        request for seconds. Its steps are not traffic: they stay out of the metrics."""
        metrics, self.engine.metrics = self.engine.metrics, None
        try:
            # Every layer's products have layer 0's shapes.
            attn, mlp = self.loaded.model.layers[0].self_attn, self.loaded.model.layers[0].mlp
            if mlp.fuses_gate:
                shard_fused_mlp.warm_up(mlp.gate_up_proj.weight)
            if mlp.ops.linear is shard_decode_gemm.linear:
                shard_decode_gemm.warm_up([
                    proj.weight for proj in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj,
                                             mlp.down_proj) if proj.weight is not None])
            self._capture_graphs()
            if self.compiled:
                # The budget's profile compiled the stages for eager steps of one size; a
                # second makes the token count dynamic (steps past the largest graph bucket
                # run eagerly).
                budgets.eager_forward(self.loaded.model, self.attention,
                                      min(24, self.budget.max_input_tokens), self.config,
                                      self.dtype, self.device)
                self.engine.sampler.warm_up(self.dtype)
            self._run_alone([min(16, self.budget.max_input_tokens)], max_new_tokens=2)
            self.engine.scheduler.step_tokens_while_decoding = self._bound_steps_while_decoding()
        finally:
            self.engine.metrics = metrics

    def _run_alone(self, prompt_lens: list[int], max_new_tokens: int) -> float:
        """Run requests with prompts of these lengths (random ids) to their end while nothing
        else runs, and return the wall time of the first step, the one that prefills them."""
        sink, vocab = _Discard(), self.loaded.config.vocab_size
        self.engine.submit(sink, [
            Sequence(request_id=i, stream=sink, prompt=torch.randint(vocab, (n,)),
                     sampling=SamplingParams(), max_new_tokens=max_new_tokens, ignore_eos=True)
            for i, n in enumerate(prompt_lens)])
        self._synchronize()
        started = time.perf_counter()
        self.engine.step()
        self._synchronize()  # with async scheduling the step is still running
        seconds = time.perf_counter() - started
        while not self.engine.scheduler.idle:
            self.engine.step()
        return seconds

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _bound_steps_while_decoding(self) -> int:
        """Tokens a step that carries decodes may hold (0: no bound): the largest step size
        that runs within --prefill-chunk-ms, timed here on steps of prompt tokens alone."""
        setting = self.config.prefill_chunk_ms
        if setting == "auto":
            # A CPU prefills so slowly that chunks within 40 ms would starve prompts.
            ms = 40.0 if self.device.type == "cuda" else 0.0
        else:
            ms = float(setting)
        largest = self.config.max_batch_prefill_tokens
        # Below ~256 rows a step costs about what a decode step costs (its weights are read
        # once either way): smaller chunks would buy no latency. Graph buckets run unpadded.
        candidates = (self.engine.piecewise.token_sizes if self.engine.piecewise is not None
                      else range(256, largest, 256))
        sizes = [s for s in candidates if 256 <= s < largest and self._fits_alone(s)] + [largest]
        if not ms or len(sizes) == 1 or not self._fits_alone(largest):
            return 0
        measured = {}

        def seconds(tokens: int) -> float:
            # The best of two: a step alone, without the decodes' KV reads beside it.
            measured[tokens] = min(self._run_alone(self._prompts_of(tokens), 1)
                                   for _ in range(2))
            return measured[tokens]

        bound = largest_within(ms / 1e3, sizes, seconds)
        log.info("steps beside decodes: %s within %g ms (measured: %s)",
                 f"at most {bound} tokens" if bound else "unbounded", ms,
                 ", ".join(f"{n} tokens {t * 1e3:.1f} ms" for n, t in sorted(measured.items())))
        return bound

    def _prompts_of(self, tokens: int) -> list[int]:
        """Prompt lengths, each within max_input_tokens, that add up to `tokens`."""
        longest = self.budget.max_input_tokens
        return [longest] * (tokens // longest) + ([tokens % longest] if tokens % longest else [])

    def _fits_alone(self, tokens: int) -> bool:
        prompts = self._prompts_of(tokens)
        blocks = sum(blocks_for(n + 1, self.budget.block_size) for n in prompts)
        return (len(prompts) <= self.config.max_batch_size
                and blocks <= self.engine.allocator.num_blocks)

    def _capture_graphs(self) -> None:
        """Their memory comes out of what --cuda-memory-fraction leaves beside the KV cache.
        Piecewise graphs under every CUDA backend (attention runs between them); decode graphs
        where the backend's decode metadata has a fixed shape."""
        if self.device.type != "cuda":
            return
        config, model, kv_cache = self.config, self.loaded.model, self.engine.kv_cache
        scratch_block = self.budget.num_blocks  # the KV cache's one block past the budget
        sizes = parse_batch_sizes(config.cuda_graphs, config.max_batch_size)
        if sizes and self.attention.decode_graphs:
            self.engine.graphs = DecodeGraphs(
                model, kv_cache, self.attention, sizes,
                self.engine.scheduler.block_tables.shape[1], self.budget.block_size,
                scratch_block=scratch_block, device=self.device)
        layer = model.layers[0]
        layer_flops = 2 * sum(p.numel() for p in layer.parameters() if p.dim() == 2)
        token_sizes = parse_token_sizes(config.cuda_graph_tokens,
                                        config.max_batch_prefill_tokens + config.max_batch_size,
                                        layer_flops)
        if token_sizes:
            # A step samples at most one row per sequence: its tails take the decode sizes.
            self.engine.piecewise = PiecewiseGraphs(
                model, kv_cache, self.attention, token_sizes,
                scratch_slot=scratch_block * self.budget.block_size, device=self.device,
                row_sizes=sizes if self.engine.sampled_rows_only else [])

    def info(self) -> pb.InfoResponse:
        tok = self.loaded.tokenizer
        return pb.InfoResponse(
            model_id=self.loaded.source.model_id,
            model_dtype=str(self.dtype).removeprefix("torch."),
            device_type=self.device.type,
            attention_backend=self.attention.name,
            num_shards=self.config.num_shard,
            block_size=self.budget.block_size,
            max_batch_total_tokens=self.budget.total_tokens,
            max_batch_prefill_tokens=self.config.max_batch_prefill_tokens,
            prefill_chunk_tokens=self.engine.scheduler.step_tokens_while_decoding,
            max_input_tokens=self.budget.max_input_tokens,
            max_total_tokens=self.budget.max_total_tokens,
            max_batch_size=self.config.max_batch_size,
            free_budget_tokens=self.engine.allocator.free_tokens,
            tokenizer=pb.Tokenizer(tokenizer_json=tok.tokenizer_json,
                                   chat_template=tok.chat_template, bos_token=tok.bos_token,
                                   eos_token=tok.eos_token, eos_token_ids=tok.eos_token_ids),
            version=sluice.__version__,
            vocab_size=self.loaded.config.vocab_size,
            quantization=self.loaded.quantization,
        )


def _wanted(setting: str, device: torch.device) -> bool:
    """An auto|on|off flag whose auto means on for CUDA (--compile, --fused-rotary,
    --async-scheduling)."""
    return setting == "on" or (setting == "auto" and device.type == "cuda")


def _quack_wanted(flag: str, setting: str, device: torch.device, dtype: torch.dtype,
                  otherwise: str) -> bool:
    """--fused-mlp, --decode-gemm: auto means wherever quack's GEMM runs; on insists."""
    if setting == "off":
        return False
    reason = shard_fused_mlp.unavailable(device, dtype)
    if setting == "on" and reason:
        raise ValueError(f"{flag} on: {reason} (use {flag} off)")
    if reason and device.type == "cuda":
        log.info("%s auto: %s: %s", flag, otherwise, reason)
    return reason is None


def _device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA device")
    return torch.device(name)


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


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
    def __init__(self, runtime: Runtime):
        self.runtime = runtime

    async def Info(self, request: pb.InfoRequest, context) -> pb.InfoResponse:
        return self.runtime.info()

    async def Generate(self, request_iterator: AsyncIterator[pb.GenerateRequest],
                       context) -> AsyncIterator[pb.GenerateResponse]:
        engine = self.runtime.engine
        stream = _RouterStream(asyncio.get_running_loop())
        engine.open_stream(stream)
        reader = asyncio.create_task(self._read(request_iterator, stream))
        try:
            while (response := await stream.queue.get()) is not None:
                yield response
        finally:
            reader.cancel()
            engine.close_stream(stream)  # a router that goes away cancels all its requests

    async def _read(self, request_iterator, stream: _RouterStream) -> None:
        engine = self.runtime.engine
        try:
            async for message in request_iterator:
                if message.HasField("batch"):
                    traced = self.runtime.config.tracing.enabled
                    engine.submit(stream, [to_sequence(r, stream, traced)
                                           for r in message.batch.requests])
                elif message.HasField("cancel"):
                    engine.cancel(stream, list(message.cancel.ids))
        finally:
            stream.queue.put_nowait(None)  # the router closed its side: end the stream


def listen_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# After the drain: what the last responses get to reach the routers before the server stops.
_FLUSH_S = 1.0


async def drain(runtime: Runtime, health_servicer, grace_s: float) -> None:
    """SIGTERM: NOT_SERVING, no new work (routers are told at once and send it elsewhere),
    running requests get `grace_s` to finish, then the rest go back to their routers, which
    resume them on other groups."""
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    engine = runtime.engine
    engine.drain()
    log.info("draining: running requests get up to %g s (--shutdown-grace)", grace_s)
    deadline = time.monotonic() + grace_s
    while engine.busy and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if engine.busy:
        log.warning("drain grace over: handing the requests still running back to their routers")
        engine.give_back()
        await asyncio.sleep(_FLUSH_S)  # the engine thread sends the errors; let them out
    log.info("drained")


async def serve(runtime: Runtime) -> None:
    server = grpc.aio.server(options=[("grpc.max_send_message_length", 64 << 20),
                                      ("grpc.max_receive_message_length", 64 << 20)])
    pb_grpc.add_TextGenerationServicer_to_server(TextGenerationServicer(runtime), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    config = runtime.config
    port = server.add_insecure_port(listen_address(config.host, config.port))
    await server.start()
    runtime.engine.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    address = listen_address(config.host, port)
    log.info("shard serving %s on %s", runtime.loaded.source.model_id, address)
    ready = {"event": "ready", "service": "shard", "address": address}
    if runtime.engine.metrics is not None:
        metrics_port = runtime.engine.metrics.serve(config.host, config.metrics_port)
        ready["metrics_address"] = listen_address(config.host, metrics_port)
        log.info("shard metrics on http://%s/metrics", ready["metrics_address"])
    print(json.dumps(ready), flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shard stopping")
    await drain(runtime, health_servicer, config.shutdown_grace_s)
    await server.stop(_FLUSH_S)
    runtime.engine.stop()


def main(argv: Seq[str] | None = None) -> None:
    config = shard_config.parse(argv, os.environ)
    logs.configure(config.log_format)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    try:
        runtime = Runtime(config)
        runtime.warm_up()
    except (ModelNotFound, ValueError) as exc:
        log.error("cannot start: %s", exc)
        sys.exit(2)
    provider = tracing.start(config.tracing)
    try:
        asyncio.run(serve(runtime))
    finally:
        tracing.stop(provider)
