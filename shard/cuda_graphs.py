"""CUDA graphs: one replay instead of ~15 kernel launches per layer.

Decode steps: a decode-only step of n sequences runs the graph captured for the smallest batch
size >= n, attention included, from reading its input tokens to the logits. Its tensors arrive
from the host padded to that size, straight into the graph's inputs (batch.Staging); rows n..
of the padded batch decode a dummy token whose K/V land in a scratch block that belongs to no
request, with a context of one token. Graphs need attention metadata of fixed shape: the
backends whose decode rows read the pages in place provide it (flash; torch with Triton decode
rows).

Steps with prefill chunks (piecewise): their attention depends on the chunks' lengths, so it
stays outside, and what lies between two attention calls (one layer's output projection, MLP
and the next layer's norm, QKV, rotary and K/V write) is captured per token-count bucket, as
vLLM does. The dense rows past the step's T tokens are padding (their K/V go to the scratch
block); attention sees only the T real rows, ragged as ever. Without this, every layer of an
eager step pays ~0.6 ms of Python (compiled-stage wrappers, launches) on the host, which on a
small model is more than its kernels take.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
from collections.abc import Callable

import torch

from shard.attention import StepLayout
from shard.batch import Staging, StepBatch
from shard.models.llama import Activations
from shard.sampling import SampleOutput

log = logging.getLogger(__name__)


def _parse_sizes(spec: str, flag: str, auto: Callable[[], list[int]]) -> list[int]:
    """'0', 'none' or '' → none; 'auto' → auto(); else a comma-separated list of sizes."""
    spec = spec.strip()
    if spec in ("", "0", "none"):
        return []
    if spec == "auto":
        return auto()
    sizes = sorted({int(part) for part in spec.split(",") if part.strip()})
    if any(size < 1 for size in sizes):
        raise ValueError(f"{flag}: sizes must be positive, got {spec!r}")
    return sizes


def parse_batch_sizes(spec: str, max_batch_size: int) -> list[int]:
    """'auto' → 1, 2, 4, 8 then steps of 8..32, and max_batch_size; never above it."""
    def auto() -> list[int]:
        candidates = [1, 2, 4] + list(range(8, 64, 8)) + list(range(64, 256, 16)) + list(
            range(256, 1025, 32))
        return sorted(set(candidates) | {max_batch_size})

    return [size for size in _parse_sizes(spec, "--cuda-graphs", auto) if size <= max_batch_size]


# Piecewise graphs pay where the host's ~0.5 ms of Python per eager layer is not hidden behind
# the layer's own GPU work. Measured on the H100 with 4,352-token buckets:
# Llama-3.2-1B's 4,096-token steps (0.5 TFLOP of matrix products per layer) ran 17% faster in
# graphs, Llama-3.1-8B's (1.8 TFLOP per layer) 4% slower, from the padding. Past 2,048 tokens,
# `auto` captures only while a layer's matrix products stay under this:
GRAPHED_LAYER_FLOPS = 0.8e12


def parse_token_sizes(spec: str, largest_step: int, layer_flops_per_token: float = 0.0
                      ) -> list[int]:
    """'auto' → 16..256 in powers of two, then steps of 128, up to the first size that holds
    `largest_step` tokens; past 2048 only while a layer's matrix products
    (`layer_flops_per_token` each token) stay under GRAPHED_LAYER_FLOPS.

    A step runs padded to its bucket, and the padding rows cost what real ones do: with steps
    of 256 past 1,024, the 1B model's 4,096-token chunks beside ~120 decodes ran ~3% padding
    (measured: its steps with prefill 0.54-0.57 s against 0.53-0.55 with steps of 128)."""
    def auto() -> list[int]:
        candidates = [16, 32, 64, 128, 256] + list(range(384, max(2048, largest_step) + 128,
                                                         128))
        sizes = []
        for size in candidates:
            if size > 2048 and size * layer_flops_per_token > GRAPHED_LAYER_FLOPS:
                break
            sizes.append(size)
            if size >= largest_step:
                break
        return sizes

    return _parse_sizes(spec, "--cuda-graph-tokens", auto)


def _capture(pieces: list[Callable[[], None]], pool, device: torch.device,
             warmups: int) -> list[torch.cuda.CUDAGraph]:
    """One graph per piece, in one memory pool; each piece first runs `warmups` times on a side
    stream, so that kernels compile and the allocator settles outside the capture. Called in
    inference mode (the graph classes' constructors)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    graphs = []
    with torch.cuda.stream(side):
        for _ in range(warmups):
            for piece in pieces:
                piece()
    torch.cuda.current_stream(device).wait_stream(side)
    with _collector_paused():
        for piece in pieces:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                piece()
            graphs.append(graph)
    return graphs


@contextlib.contextmanager
def _collector_paused():
    """No garbage collection while capturing. A graph left in a reference cycle (as a dropped
    runtime leaves its graphs) is destroyed when Python's cycle collector runs, which may be in
    the middle of a capture: destroying a graph is not permitted while a stream captures, and
    it invalidates the capture ("operation failed due to a previous error during capture";
    seen on the H200 in the GPU tests). torch.cuda.graph no longer collects before capturing
    (only under torch.compiler.config.force_cudagraph_gc), and collecting here would cost a
    full collection per bucket (~0.2-1 s each, dozens of buckets): the collector only waits
    until the captures are done."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class DecodeGraphs:
    """`greedy` (rank 0's Sampler.greedy_stage): each size also gets a graph of the greedy
    pick over its logits, for the steps whose rows all take it (Sampler.takes_greedy). Out of
    a graph the pick is 5-7 kernels of ~2 µs each, and the GPU idles ~2-3 µs before each:
    on the H100 the 1B's batch-1 step spent ~60 µs outside its 1.08 ms graph."""

    # Static buffers as inference tensors, like every tensor a step makes: compiled stages
    # guard on the kind of tensor too, and must meet only the kind they met in warm-up.
    @torch.inference_mode()
    def __init__(self, model, kv_cache, attention, batch_sizes: list[int], max_blocks: int,
                 block_size: int, scratch_block: int, device: torch.device,
                 max_batch_size: int, greedy: Callable | None = None):
        self.model = model
        self.kv_cache = kv_cache
        self.batch_sizes = sorted(batch_sizes)
        largest = self.batch_sizes[-1]
        # Each slot's latest sampled token (the runner's, ModelRunner.last_tokens): a step's
        # graph reads its input tokens from it, and its greedy graph writes their picks. One
        # slot more, the padding rows' (batch.Staging).
        self.last_tokens = torch.zeros(max_batch_size + 1, dtype=torch.long, device=device)
        self.input_ids = torch.zeros(largest, dtype=torch.long, device=device)
        # Graphs hold raw pointers: every tensor a capture reads must stay referenced here.
        self.cu_seqlens_q = torch.arange(largest + 1, dtype=torch.int32, device=device)
        self.staging = {size: Staging.allocate(size, max_blocks, scratch_block, block_size,
                                               max_batch_size, self.input_ids,
                                               self.cu_seqlens_q, device)
                        for size in self.batch_sizes}
        self._metadata = []
        # One output buffer for all graphs (each graph's own would cost vocab x size each).
        self.logits = torch.empty(largest, model.config.vocab_size,
                                  dtype=next(model.parameters()).dtype, device=device)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.batch_sizes):  # the largest first: the others reuse its pool
            staged = self.staging[size]
            layout = StepLayout(size, list(range(size + 1)), [1] * size,
                                staged.cu_seqlens_q[:size + 1], staged.seqused_k,
                                staged.block_table, staged.slot_mapping, block_size)
            meta = attention.prepare(layout)
            self._metadata.append(meta)

            def decode(size=size, meta=meta, staged=staged):
                torch.index_select(self.last_tokens, 0, staged.sample_slots,
                                   out=self.input_ids[:size])
                hidden = model(self.input_ids[:size], staged.positions, kv_cache.layers, meta)
                model.compute_logits(hidden, out=self.logits[:size])

            self._graphs[size] = _capture([decode], pool, device, warmups=2)[0]
        # size -> (tokens, their logprobs, the report) as the greedy graph of that size writes
        # them: held here, so no other graph of the pool reuses their memory.
        self._picked: dict[int, tuple[torch.Tensor, ...]] = {}
        self._greedy_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        if greedy is not None:
            def pick(size: int) -> None:
                self._picked[size] = greedy(self.logits[:size])
                self.last_tokens.index_copy_(0, self.staging[size].sample_slots,
                                             self._picked[size][0])

            self._greedy_graphs = dict(zip(self.batch_sizes, _capture(
                [functools.partial(pick, size) for size in self.batch_sizes], pool, device,
                warmups=2)))
        log.info("captured CUDA graphs for decode batch sizes %s%s", self.batch_sizes,
                 " (and their greedy picks)" if greedy is not None else "")

    def fits(self, num_decodes: int) -> bool:
        return 1 <= num_decodes <= self.batch_sizes[-1]

    def staging_for(self, num_decodes: int) -> Staging:
        """Where a step of that many decodes sends its tensors (batch.build_staged)."""
        return self.staging[next(s for s in self.batch_sizes if s >= num_decodes)]

    def replay(self, batch: StepBatch) -> torch.Tensor:
        """Logits [n, vocab] of a decode-only step of n sequences, built into its staging."""
        n = batch.layout.num_decodes
        size = next(s for s in self.batch_sizes if s >= n)
        assert batch.positions.data_ptr() == self.staging[size].positions.data_ptr(), \
            "a decode graph's step is built into its staging (ModelRunner.prepare)"
        self._graphs[size].replay()
        return self.logits[:n]

    @property
    def picks_greedy(self) -> bool:
        """Whether greedy() may follow replay(): the greedy graphs were captured."""
        return bool(self._greedy_graphs)

    def greedy(self, n: int) -> SampleOutput:
        """The greedy pick over the logits replay() just wrote for n sequences, as the Sampler
        gives it (Sampler.greedy_stage), its tokens already in last_tokens; rows n.. of the
        size's padding are picked too, kept in the padding slot, and dropped."""
        size = next(s for s in self.batch_sizes if s >= n)
        self._greedy_graphs[size].replay()
        tokens, chosen, reported = self._picked[size]
        return SampleOutput(tokens[:n], chosen[:n], None, None, reported[:n])


class PiecewiseGraphs:
    """Steps with prefill chunks, up to the largest token bucket: L + 1 graphs per bucket
    around the L attention calls, which run eagerly on the real rows.

    Steps that read only their sampling rows (LlamaForCausalLM.forward's `rows`) end instead
    with a tail graph per row bucket (`row_sizes`): those rows of the last layer's attention
    output and residual, gathered, through its output projection, MLP and the final norm. It
    reads the same static buffers whatever the token bucket, so one set serves them all."""

    @torch.inference_mode()  # static buffers as inference tensors (DecodeGraphs says why)
    def __init__(self, model, kv_cache, attention, token_sizes: list[int], scratch_slot: int,
                 device: torch.device, row_sizes: list[int] = ()):
        self.model = model
        self.kv_cache = kv_cache
        self.attention = attention
        self.token_sizes = sorted(token_sizes)
        self.scratch_slot = scratch_slot
        largest = self.token_sizes[-1]
        attn = model.layers[0].self_attn
        dtype = next(model.parameters()).dtype
        # Static buffers: the graphs read and write these addresses at every replay.
        self.input_ids = torch.zeros(largest, dtype=torch.long, device=device)
        self.positions = torch.zeros(largest, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((largest,), scratch_slot, dtype=torch.long, device=device)
        self.q = torch.zeros(largest, attn.num_heads, attn.head_dim, dtype=dtype, device=device)
        self.attended = torch.zeros_like(self.q)
        self.residual = torch.zeros(largest, model.config.hidden_size, dtype=dtype,
                                    device=device)
        self.hidden = torch.zeros_like(self.residual)
        self._graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}
        pool = torch.cuda.graph_pool_handle()
        num_pieces = len(model.layers) + 1
        for size in reversed(self.token_sizes):  # the largest first: the others reuse its pool
            buffers = self._activations(size)
            pieces = [functools.partial(model.piece, i, buffers) for i in range(num_pieces)]
            self._graphs[size] = _capture(pieces, pool, device, warmups=1)
        self.row_sizes = sorted(row_sizes)
        self.rows = torch.zeros(max(self.row_sizes, default=0), dtype=torch.long, device=device)
        self.tail_hidden = torch.zeros_like(self.residual[:len(self.rows)])
        self._tails = dict(zip(reversed(self.row_sizes), _capture(
            [functools.partial(self._tail, n) for n in reversed(self.row_sizes)], pool, device,
            warmups=1)))
        log.info("captured piecewise CUDA graphs for steps of up to %s tokens (%d graphs each; "
                 "tails for %s sampling rows)", self.token_sizes, num_pieces, self.row_sizes)

    def _activations(self, n: int) -> Activations:
        """The static buffers' first n rows, as the model's pieces read and write them."""
        return Activations(self.input_ids[:n], self.positions[:n], self.slot_mapping[:n],
                           self.kv_cache.layers, q=self.q[:n], attended=self.attended[:n],
                           residual=self.residual[:n], hidden=self.hidden[:n], static=True)

    def _tail(self, n: int) -> None:
        """The last layer past attention and the final norm, on the n rows named in self.rows
        (of the whole buffers: one tail serves every token bucket)."""
        whole = self._activations(self.token_sizes[-1])
        self.tail_hidden[:n].copy_(self.model.tail(whole, self.rows[:n]))

    def fits(self, num_tokens: int) -> bool:
        return num_tokens <= self.token_sizes[-1]

    def run(self, batch: StepBatch, meta, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states [T, hidden] of the step's T tokens, final norm applied; with `rows`,
        only those rows', in that order (as LlamaForCausalLM.forward). A view of a static
        buffer, valid until the next step's replay."""
        t = batch.input_ids.shape[0]
        size = next(s for s in self.token_sizes if s >= t)
        self.input_ids[:t].copy_(batch.input_ids)
        self.positions[:t].copy_(batch.positions)
        self.slot_mapping[:t].copy_(batch.layout.slot_mapping)
        if size > t:  # padding rows write their K/V to the scratch block, nowhere else
            self.slot_mapping[t:size].fill_(self.scratch_slot)
        graphs, layers = self._graphs[size], self.kv_cache.layers

        def attend(index: int) -> None:  # on the real rows only, ragged as ever
            self.attention.attend(self.q[:t], *layers[index], meta, out=self.attended[:t])

        def tail(chosen: torch.Tensor) -> torch.Tensor:
            n = chosen.shape[0]
            graph = self._tails.get(next((s for s in self.row_sizes if s >= n), None))
            if graph is None:  # more rows than the largest tail
                graphs[-1].replay()
                return self.hidden[chosen]
            # Rows n.. of the bucket gather whatever rows an earlier step named (all within
            # the buffers): read, never returned.
            self.rows[:n].copy_(chosen)
            graph.replay()
            return self.tail_hidden[:n]

        return self.model.run(self._activations(t), attend, rows,
                              piece=lambda index: graphs[index].replay(), tail=tail)
