"""The model runner: the same code on every tensor-parallel rank.

It takes a step's plan (shard/plan.py), builds the step's tensors, runs the forward (a decode
graph, piecewise graphs or eagerly: one layer loop, LlamaForCausalLM.run) and ends the step
with the same sampled tokens on every rank. Rank 0 samples and broadcasts its tokens to the
others (one collective of S ids), which need no sampling parameters and no sampler state.
Only rank 0 copies the results to the host for the engine.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

from shard import batch as step_batch
from shard.cuda_graphs import DecodeGraphs, PiecewiseGraphs
from shard.kv_cache import KVCache
from shard.parallel import TensorParallel
from shard.plan import StepPlan
from shard.sampling import Sampler

log = logging.getLogger(__name__)

# Prompt rows scored per LM-head call: bounds the [rows, vocab] float32 logits it holds.
_PROMPT_SLICE_ROWS = 256


@dataclass(slots=True)
class Graphs:
    """What warm-up captured (on CUDA): decode-only steps whole, steps with prefill chunks in
    pieces around attention."""

    decode: DecodeGraphs | None = None
    piecewise: PiecewiseGraphs | None = None


@dataclass(slots=True)
class StepOutput:
    """A launched step's results on their way to rank 0's host."""

    host: torch.Tensor  # [S, 2 + 2 n] float64: token, its logprob, n top ids, n top logprobs
    top_n: int
    ready: torch.cuda.Event | None  # recorded after the copy; None on CPU
    # (logprobs [R], and with top-n: top logprobs [R, n], top ids [R, n]) of the prompt rows
    # the plan scored, on the device; None when it scored none.
    prompt_scores: tuple[torch.Tensor, ...] | None


class ModelRunner:
    """One rank's model, KV cache and step tensors. `sampler` is rank 0's alone."""

    def __init__(self, model, kv_cache: KVCache, attention, tp: TensorParallel,
                 device: torch.device, max_batch_size: int, max_blocks: int, block_size: int,
                 sampler: Sampler | None, graphs: Graphs, sampled_rows_only: bool):
        self.model = model
        self.kv_cache = kv_cache
        self.attention = attention
        self.tp = tp
        self.device = device
        self.block_size = block_size
        self.sampler = sampler
        self.graphs = graphs
        # --last-layer-rows sampled: the last layer's output projection and MLP only for rows
        # whose logits the step reads (LlamaForCausalLM.run).
        self.sampled_rows_only = sampled_rows_only
        # Block table of each slot, written once at admission: steps read rows by slot.
        self.block_tables = torch.zeros(max_batch_size, max_blocks, dtype=torch.int32)
        # Each slot's latest sampled token, where the next step's decode reads it (the decode
        # graphs' own: they read it too).
        self.last_tokens = (graphs.decode.last_tokens if graphs.decode is not None else
                            torch.zeros(max_batch_size, dtype=torch.long, device=device))

    def execute(self, plan: StepPlan) -> StepOutput | None:
        """Queue the step's forward and sampling, and (rank 0) the copy of its results to the
        host. Inference tensors throughout, as in warm-up: compiled stages guard on the kind of
        tensor too, and a new kind would compile again mid-run."""
        with torch.inference_mode():
            batch = self.prepare(plan)
            num_samples = batch.sample_rows.shape[0]
            graphed = self._graphed(batch)
            logits, hidden = self._forward(batch, num_samples, graphed)
            scores = None
            if batch.prompt_rows is not None:  # only requests that asked for them
                scores = self._score_prompt(hidden, batch.prompt_rows, plan)
            if not num_samples:  # prompt chunks that end no prompt
                return self._output(torch.zeros(0, 2, dtype=torch.float64), 0, scores)
            sampling = plan.sampling
            kept = False  # whether the step's tokens are in last_tokens already
            if self.sampler is None:  # another rank: rank 0's tokens
                tokens = self.tp.broadcast(torch.empty(num_samples, dtype=torch.long,
                                                       device=self.device))
            else:
                decode = self.graphs.decode
                kept = (graphed and decode.picks_greedy
                        and self.sampler.takes_greedy(sampling.params, sampling.top_n))
                if kept:  # what the sampler would run, in a graph that keeps the tokens too
                    out = decode.greedy(num_samples)
                else:
                    out = self.sampler(logits, sampling.params, plan.slots[plan.samples.bool()],
                                       batch.sample_positions, sampling.top_n)
                tokens = self.tp.broadcast(out.tokens)
            if not kept:
                self.last_tokens.index_copy_(0, batch.sample_slots, tokens)
            if self.sampler is None:
                return None
            # Everything the step reports travels in one float64 tensor: one transfer, one wait.
            return self._output(out.reported, sampling.top_n, scores)

    def prepare(self, plan: StepPlan) -> step_batch.StepBatch:
        """The plan's admissions taken in (block tables, rank 0's sampler), and its tensors."""
        self._admit(plan)
        decode = self.graphs.decode
        if decode is not None and plan.num_prefills == 0 and decode.fits(plan.num_decodes):
            return step_batch.build_staged(plan, self.block_tables,
                                           decode.staging_for(plan.num_decodes))
        return step_batch.build(plan, self.block_tables, self.block_size, self.device,
                                self.last_tokens)

    def _admit(self, plan: StepPlan) -> None:
        if not plan.admitted_slots.shape[0]:
            return
        offset = 0
        for slot, count in zip(plan.admitted_slots.tolist(), plan.admitted_counts.tolist()):
            self.block_tables[slot, :count] = plan.admitted_blocks[offset:offset + count]
            offset += count
        if self.sampler is not None:
            for a in plan.sampling.admitted:
                self.sampler.admit(a.slot, a.sampling, a.prompt, a.resumed_tokens)

    def _forward(self, batch: step_batch.StepBatch, num_samples: int, graphed: bool
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Logits of the step's sampling rows (the model's dtype: the sampler upcasts), and the
        hidden states of every row when the step scores prompt rows. `graphed`: _graphed's."""
        if graphed:
            return self.graphs.decode.replay(batch), None  # decode only: no prompt rows to score
        piecewise = self.graphs.piecewise
        meta = self.attention.prepare(batch.layout)
        # Prompt logprobs read every prompt row: those steps keep all of them.
        rows = (batch.sample_rows if self.sampled_rows_only and batch.prompt_rows is None
                else None)
        if piecewise is not None and piecewise.fits(batch.input_ids.shape[0]):
            hidden = piecewise.run(batch, meta, rows)
        else:
            hidden = self.model(batch.input_ids, batch.positions, self.kv_cache.layers, meta,
                                rows)
        if not num_samples:
            return None, hidden
        if rows is not None:  # hidden holds the sampling rows alone, in their order
            return self.model.compute_logits(hidden), None
        return self.model.compute_logits(hidden[batch.sample_rows]), hidden

    def _graphed(self, batch: step_batch.StepBatch) -> bool:
        """Whether the step runs a decode graph: decodes only, as many as the graphs take."""
        decode = self.graphs.decode
        return (decode is not None and batch.layout.num_decodes == batch.input_ids.shape[0]
                and decode.fits(batch.layout.num_decodes))

    def _score_prompt(self, hidden: torch.Tensor, rows: torch.Tensor, plan: StepPlan
                      ) -> tuple[torch.Tensor, ...] | None:
        """Logprobs of the prompt tokens the step's scored rows predict (rank 0; the other
        ranks take part in the LM head's collectives and keep nothing).

        Unlike sampled tokens', they are the model's raw distribution (no penalty, no
        temperature), as TGI reports them. Rows go through the LM head in slices so that a long
        prompt never holds [prompt, vocab] logits at once."""
        sampling = plan.sampling
        parts = []
        # The step's targets in one copy from pinned memory (batch.to_device says why).
        targets = (None if sampling is None else
                   step_batch.to_device(self.device, sampling.prompt_targets)[0])
        for lo in range(0, rows.shape[0], _PROMPT_SLICE_ROWS):
            part = rows[lo:lo + _PROMPT_SLICE_ROWS]
            logits = self.model.compute_logits(hidden[part])
            if sampling is None:
                continue
            logprobs = logits.float().log_softmax(-1)
            chosen = logprobs.gather(1, targets[lo:lo + part.shape[0], None]).squeeze(1)
            top_n = sampling.prompt_top_n
            parts.append((chosen, *logprobs.topk(top_n, dim=-1)) if top_n else (chosen,))
        if sampling is None:
            return None
        return tuple(torch.cat(columns) for columns in zip(*parts))

    def _output(self, packed: torch.Tensor, top_n: int,
                scores: tuple[torch.Tensor, ...] | None) -> StepOutput | None:
        if self.sampler is None:
            return None
        ready = None
        if self.device.type == "cuda":
            host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            host.copy_(packed, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        else:
            host = packed
        return StepOutput(host, top_n, ready, scores)


def agree(ok: bool, group) -> bool:
    """Whether every rank of `group` says ok (one all-reduce on the host's group; True alone).
    Ranks decide together where one rank's failure would leave the others waiting in a
    collective: graph capture, for one."""
    if group is None:
        return ok
    flag = torch.tensor([0 if ok else 1], dtype=torch.int32)
    dist.all_reduce(flag, group=group)
    return int(flag) == 0
