"""Build, then warm up: what a shard process holds before it serves.

`build` loads this rank's slices of the model, sizes the KV budget (the smallest any rank can
hold) and allocates the cache. `warm_up` compiles and captures what steps will run, in
lockstep on every rank, and returns the model runner; rank 0 then times steps (which the other
ranks run with it, following its plans) to size the chunk bound. Each result is the next
step's constructor argument: nothing is patched into an object after it is built.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from shard import budget as budgets
from shard import decode_gemm as shard_decode_gemm
from shard import fused_mlp as shard_fused_mlp
from shard import loader
from shard.attention import select_backend
from shard.config import ShardConfig
from shard.cuda_graphs import DecodeGraphs, PiecewiseGraphs, parse_batch_sizes, parse_token_sizes
from shard.engine import Engine, ShardLimits, Stream
from shard.kv_cache import BlockAllocator, KVCache, blocks_for
from shard.metrics import ShardMetrics
from shard.ranks import Group, GroupExecutor, PlanChannel, gather, smallest
from shard.runner import Graphs, ModelRunner, agree
from shard.sampling import Sampler, SamplingParams
from shard.scheduler import Scheduler, Sequence, largest_within
from shard.source import resolve

log = logging.getLogger("shard")


@dataclass(slots=True)
class Built:
    """One rank's model, budget and KV cache, before warm-up."""

    config: ShardConfig
    group: Group
    device: torch.device
    dtype: torch.dtype
    attention: object  # shard.attention's backend
    loaded: loader.LoadedModel
    budget: budgets.Budget
    kv_cache: KVCache
    compiled: bool
    async_scheduling: bool

    @property
    def limits(self) -> ShardLimits:
        return ShardLimits(self.budget.max_input_tokens, self.budget.max_total_tokens,
                           self.config.max_batch_prefill_tokens, self.config.max_batch_size)

    def scheduler(self, step_tokens_while_decoding: int = 0) -> Scheduler:
        """A scheduler over the whole budget (rank 0's)."""
        allocator = BlockAllocator(self.budget.num_blocks, self.budget.block_size)
        return Scheduler(allocator, self.config.max_batch_size,
                         self.config.max_batch_prefill_tokens, self.budget.max_total_tokens,
                         step_tokens_while_decoding)


@dataclass(slots=True)
class Warm:
    """A warmed-up rank: its runner; on rank 0, how to run plans on every rank and the
    measured bound on steps beside decodes."""

    built: Built
    runner: ModelRunner
    executor: GroupExecutor | None  # rank 0 only
    step_tokens_while_decoding: int
    device_memory_bytes: list[int]  # each rank's CUDA memory after warm-up (0 on cpu)


def build(config: ShardConfig, group: Group, device: torch.device) -> Built:
    dtype = _dtype(config.dtype, device)
    if device.type == "cuda":
        # The host's tensors per step are small: more threads only add wake-ups (on the
        # H100's 16 cores, a 4,096-element CPU gather took ~1 ms across threads).
        torch.set_num_threads(1)
    attention = select_backend(config.attention, device, config.decode_attention)
    source = resolve(config.model, config.revision)
    log.info("loading %s from %s on %s (%s), rank %d of %d", source.model_id, source.path,
             device, dtype, group.rank, group.world_size)
    compiled = wanted(config.compile, device)
    fused_rotary = wanted(config.fused_rotary, device)
    if fused_rotary and device.type != "cuda":
        raise ValueError("--fused-rotary on needs a CUDA device (it is a Triton kernel)")
    gemv = wanted(config.gemv, device)
    if gemv and device.type != "cuda":
        raise ValueError("--gemv on needs a CUDA device (its kernels are Triton's)")
    _configure_pdl(config.pdl, device)
    fused_mlp = _quack_wanted("--fused-mlp", config.fused_mlp, device, dtype,
                              "SiLU x up stays a separate pass")
    decode_gemm = _quack_wanted("--decode-gemm", config.decode_gemm, device, dtype,
                                "decode batches' products stay on cuBLAS")
    loaded = loader.load(source, group.tp, device, dtype, attention, config.load_format,
                         config.quantize, compiled, fused_rotary, fused_mlp, decode_gemm, gemv)
    log.info("weights: %s; quantization: %s; elementwise stages %s; rotary and cache write %s; "
             "SiLU x up %s; decode batches' products %s%s", dtype, loaded.quantization,
             "compiled" if compiled else "eager", "fused" if fused_rotary else "separate",
             "in the gate/up product (steps that shard/fused_mlp.py's fuses names)"
             if fused_mlp else "a separate pass",
             f"in quack's narrow tiles at {shard_decode_gemm.MIN_ROWS}-"
             f"{shard_decode_gemm.MAX_ROWS} rows (shard/decode_gemm.py)"
             if decode_gemm else "on cuBLAS",
             ", at 1-16 rows in Triton matrix-vector kernels (shard/gemv.py)%s" % (
                 ", the residual adds and norms inside them (norms folded)"
                 if loaded.model.layers[0].folded_norms else "") if gemv else "")
    peak = 0
    if device.type == "cuda":
        peak = budgets.profile_peak_bytes(loaded.model, attention, config, dtype, device)
        log.info("weights + largest step: %.2f GiB at peak", peak / 2**30)
    budget = budgets.size(config, loaded.config, dtype,
                          budgets.kv_cache_bytes(config, device, peak), group.world_size)
    # Every rank holds a slice of every token: the group's budget is what the fullest holds.
    num_blocks = smallest(budget.num_blocks, group)
    if num_blocks != budget.num_blocks:
        budget = budgets.Budget(num_blocks, budget.block_size, budget.max_input_tokens,
                                min(budget.max_total_tokens, num_blocks * budget.block_size))
    log.info("KV-cache budget: %d tokens (%d blocks of %d)", budget.total_tokens,
             budget.num_blocks, budget.block_size)
    # One block more than the budget: the scratch block that CUDA-graph padding writes to.
    kv_cache = KVCache(loaded.config, group.world_size, budget.num_blocks + 1, budget.block_size,
                       dtype, device)
    return Built(config, group, device, dtype, attention, loaded, budget, kv_cache, compiled,
                 wanted(config.async_scheduling, device))


def warm_up(built: Built, channel: PlanChannel | None) -> Warm:
    """Compile and capture everything a step may run, on every rank together; then (rank 0)
    run short requests through the whole step path, which the other ranks follow: compiling
    mid-run would stall every running request for seconds. Workers return before that part
    and follow rank 0's plans from then on (shard/ranks.py)."""
    config, model = built.config, built.loaded.model
    # Every layer's products have layer 0's shapes.
    attn, mlp = model.layers[0].self_attn, model.layers[0].mlp
    ops = mlp.ops
    products = [proj.weight for proj in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj,
                                         mlp.down_proj) if proj.weight is not None]
    gated = mlp.gate_up_proj.weight if mlp.fuses_gate else None
    if ops.fused_mlp and gated is not None:
        shard_fused_mlp.warm_up(gated)
    if ops.decode_gemm:
        shard_decode_gemm.warm_up(products)
    if ops.gemv:
        from shard import gemv as shard_gemv  # imports Triton: CUDA only
        rotary = ((attn.qkv_proj.weight, model.rotary.cos, model.rotary.sin, attn.num_heads,
                   attn.num_kv_heads, attn.head_dim) if attn.fuses_rotary else None)
        shard_gemv.warm_up(products, gated, rotary, folded=model.layers[0].folded_norms)
        if model.lm_head.compute_weight is None:  # the LM head's product (ops.head_linear)
            shard_gemv.warm_up([model.lm_head.weight], None)
    sampler = None
    if built.group.rank == 0:
        sampler = Sampler(built.loaded.config.vocab_size, config.max_batch_size, built.device,
                          built.compiled)
    graphs = _capture_graphs(built, sampler.greedy_stage if sampler is not None else None)
    if built.compiled:
        # The budget's profile compiled the stages for eager steps of one size; a second makes
        # the token count dynamic (steps past the largest graph bucket run eagerly).
        budgets.eager_forward(model, built.attention, min(24, built.budget.max_input_tokens),
                              config, built.dtype, built.device)
        if sampler is not None:
            sampler.warm_up(built.dtype)
    runner = ModelRunner(model, built.kv_cache, built.attention, built.group.tp, built.device,
                         config.max_batch_size,
                         blocks_for(built.budget.max_total_tokens, built.budget.block_size),
                         built.budget.block_size, sampler, graphs,
                         config.last_layer_rows == "sampled")
    # Per-rank device memory (weights, KV cache, graphs), reported by rank 0's metrics.
    device_memory = gather(torch.cuda.memory_reserved(built.device)
                           if built.device.type == "cuda" else 0, built.group)
    if built.group.rank != 0:
        return Warm(built, runner, None, 0, device_memory)
    executor = GroupExecutor(runner, channel)
    calibration = _Calibration(built, executor)
    calibration.run_alone([min(16, built.budget.max_input_tokens)], max_new_tokens=2)
    return Warm(built, runner, executor, calibration.bound_steps_while_decoding(), device_memory)


def serving_engine(warm: Warm, with_metrics: bool = False, worker_pids: dict[int, int] = {},
                   on_failure: Callable[[str], None] = lambda reason: None) -> Engine:
    """Rank 0's engine over the warmed-up ranks: what serving runs (shard/server.py)."""
    built = warm.built
    scheduler = built.scheduler(warm.step_tokens_while_decoding)
    metrics = None
    if with_metrics:
        metrics = ShardMetrics(scheduler.allocator, scheduler, worker_pids,
                               warm.device_memory_bytes)
    return Engine(warm.executor.execute, scheduler, built.limits,
                  built.loaded.config.vocab_size, built.loaded.tokenizer.eos_token_ids,
                  built.async_scheduling, metrics, errors_are_fatal=built.group.world_size > 1,
                  on_failure=on_failure)


class _Discard(Stream):
    """Where the warm-up requests' tokens go."""

    def send(self, response) -> None:
        pass


class _Calibration:
    """Rank 0's warm-up requests, through an engine of their own (their steps are not traffic:
    no metrics), over the same runner and budget as the serving engine."""

    def __init__(self, built: Built, executor: GroupExecutor):
        self.built = built
        self.piecewise = executor.runner.graphs.piecewise
        self.engine = Engine(executor.execute, built.scheduler(), built.limits,
                             built.loaded.config.vocab_size, (), built.async_scheduling)

    def run_alone(self, prompt_lens: list[int], max_new_tokens: int) -> float:
        """Run requests with prompts of these lengths (random ids) to their end while nothing
        else runs, and return the wall time of the first step, the one that prefills them."""
        sink, vocab = _Discard(), self.built.loaded.config.vocab_size
        self.engine.submit(sink, [
            Sequence(request_id=i, stream=sink, prompt=torch.randint(vocab, (n,)),
                     sampling=SamplingParams(), max_new_tokens=max_new_tokens, ignore_eos=True)
            for i, n in enumerate(prompt_lens)])
        self._synchronize()
        started = time.perf_counter()
        self.engine.run_iteration()
        self._synchronize()  # with async scheduling the step is still running
        seconds = time.perf_counter() - started
        while not self.engine.scheduler.idle:
            self.engine.run_iteration()
        while not self.engine.idle:  # the last step's tokens, still in flight
            self.engine.run_iteration()
        return seconds

    def _synchronize(self) -> None:
        if self.built.device.type == "cuda":
            torch.cuda.synchronize(self.built.device)

    def bound_steps_while_decoding(self) -> int:
        """Tokens a step that carries decodes may hold (0: no bound): the largest step size
        that runs within --prefill-chunk-ms, timed here on steps of prompt tokens alone."""
        config, device = self.built.config, self.built.device
        setting = config.prefill_chunk_ms
        if setting == "auto":
            # A CPU prefills so slowly that chunks within 40 ms would starve prompts.
            ms = 40.0 if device.type == "cuda" else 0.0
        else:
            ms = float(setting)
        largest = config.max_batch_prefill_tokens
        # Below ~256 rows a step costs about what a decode step costs (its weights are read
        # once either way): smaller chunks would buy no latency. Graph buckets run unpadded.
        candidates = (self.piecewise.token_sizes if self.piecewise is not None
                      else range(256, largest, 256))
        sizes = [s for s in candidates if 256 <= s < largest and self._fits_alone(s)] + [largest]
        if not ms or len(sizes) == 1 or not self._fits_alone(largest):
            return 0
        measured = {}

        def seconds(tokens: int) -> float:
            # The best of two: a step alone, without the decodes' KV reads beside it.
            measured[tokens] = min(self.run_alone(self._prompts_of(tokens), 1)
                                   for _ in range(2))
            return measured[tokens]

        bound = largest_within(ms / 1e3, sizes, seconds)
        log.info("steps beside decodes: %s within %g ms (measured: %s)",
                 f"at most {bound} tokens" if bound else "unbounded", ms,
                 ", ".join(f"{n} tokens {t * 1e3:.1f} ms" for n, t in sorted(measured.items())))
        return bound

    def _prompts_of(self, tokens: int) -> list[int]:
        """Prompt lengths, each within max_input_tokens, that add up to `tokens`."""
        longest = self.built.budget.max_input_tokens
        return [longest] * (tokens // longest) + ([tokens % longest] if tokens % longest else [])

    def _fits_alone(self, tokens: int) -> bool:
        prompts = self._prompts_of(tokens)
        blocks = sum(blocks_for(n + 1, self.built.budget.block_size) for n in prompts)
        return (len(prompts) <= self.built.config.max_batch_size
                and blocks <= self.built.budget.num_blocks)


def _capture_graphs(built: Built, greedy: Callable | None) -> Graphs:
    """Their memory comes out of what --cuda-memory-fraction leaves beside the KV cache.
    Piecewise graphs under every CUDA backend (attention runs between them); decode graphs
    where the backend's decode metadata has a fixed shape, with rank 0's greedy pick
    (`greedy`) after them. Several ranks capture together,
    their collectives inside the graphs; if any rank's capture fails, every rank turns graphs
    off (one log line) rather than leave the others waiting in a collective."""
    if built.device.type != "cuda":
        return Graphs()
    config, model, budget = built.config, built.loaded.model, built.budget
    scratch_block = budget.num_blocks  # the KV cache's one block past the budget
    sizes = parse_batch_sizes(config.cuda_graphs, config.max_batch_size)
    layer = model.layers[0]
    layer_flops = 2 * sum(p.numel() for p in layer.parameters() if p.dim() == 2)
    token_sizes = parse_token_sizes(config.cuda_graph_tokens,
                                    config.max_batch_prefill_tokens + config.max_batch_size,
                                    layer_flops)
    graphs, error = Graphs(), None
    try:
        if sizes and built.attention.decode_graphs:
            graphs.decode = DecodeGraphs(
                model, built.kv_cache, built.attention, sizes,
                blocks_for(budget.max_total_tokens, budget.block_size), budget.block_size,
                scratch_block=scratch_block, device=built.device,
                max_batch_size=config.max_batch_size, greedy=greedy)
        if token_sizes:
            # A step samples at most one row per sequence: its tails take the decode sizes.
            graphs.piecewise = PiecewiseGraphs(
                model, built.kv_cache, built.attention, token_sizes,
                scratch_slot=scratch_block * budget.block_size, device=built.device,
                row_sizes=sizes if config.last_layer_rows == "sampled" else [])
    except RuntimeError as exc:
        if built.group.world_size == 1:
            raise
        error = exc
    if not agree(error is None, built.group.host_group):
        log.warning("CUDA graphs off: capturing them failed on %s (%s)",
                    "this rank" if error else "another rank", error)
        return Graphs()
    return graphs


def wanted(setting: str, device: torch.device) -> bool:
    """An auto|on|off flag whose auto means on for CUDA (--compile, --fused-rotary,
    --async-scheduling)."""
    return setting == "on" or (setting == "auto" and device.type == "cuda")


def _configure_pdl(setting: str, device: torch.device) -> None:
    """--pdl: auto means on CUDA devices of compute capability 9.0+; on insists. A process-wide
    switch (shard/pdl.py): the kernels it governs are called deep inside the model."""
    if device.type != "cuda":
        if setting == "on":
            raise ValueError("--pdl on needs a CUDA device of compute capability 9.0 or later")
        return
    from shard import pdl  # imports Triton: CUDA only

    if setting == "on" and not pdl.capable(device):
        raise ValueError("--pdl on needs a CUDA device of compute capability 9.0 or later "
                         "(and Triton 3.4+)")
    pdl.configure(setting != "off" and pdl.capable(device))
    log.info("programmatic dependent launch: %s", "on, for steps of %d row(s)" % pdl.MAX_ROWS
             if pdl.enabled(device) else "off")


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


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)
