"""One engine step's plan: what every rank needs to run it, packed into one int64 tensor.

Rank 0's engine makes it from the scheduler's Step. It crosses to the other ranks as that one
tensor (no pickled objects, nothing per sequence), and every rank's model runner builds the
same step tensors from it. What only rank 0 uses (sampling parameters, the targets of prompt
logprobs) rides beside it in `SamplingPlan`.

Layout: an 8-integer header, then per sequence of the step (decodes first, then prefill chunks)
its slot, first position, token count, whether it samples and how many of its rows score the
prompt; then the prefill chunks' token ids; then the step's admissions (slot, block count, and
the blocks of each, so that every rank's block tables match rank 0's).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shard.sampling import SamplingParams
from shard.scheduler import Sequence, Step

HEADER = 8
STEP, STOP = 1, 2
# Header fields.
_KIND, _DECODES, _PREFILLS, _PREFILL_TOKENS, _ADMITTED, _ADMITTED_BLOCKS, _LENGTH = range(7)


@dataclass(slots=True)
class Admission:
    """A sequence admitted since the last plan: rank 0's sampler state for it."""

    slot: int
    sampling: SamplingParams
    prompt: torch.Tensor  # [prompt_len] on the host
    resumed_tokens: int  # the prompt's last tokens that were generated (a continuation)


@dataclass(slots=True)
class SamplingPlan:
    """Rank 0's part of a plan: what sampling and prompt scoring need beside the tensor."""

    params: list[SamplingParams]  # one per sampling row, in row order
    top_n: int  # the most top-n alternatives any sampling row asked for
    admitted: list[Admission]
    prompt_targets: torch.Tensor | None  # [R]: the prompt token each scored row predicts
    prompt_top_n: int  # the most top-n alternatives a prompt-scoring sequence asked for


@dataclass(slots=True)
class StepPlan:
    packed: torch.Tensor  # [length] int64 on the host: what crosses to other ranks
    num_decodes: int
    num_prefills: int
    slots: torch.Tensor  # [B] per sequence
    starts: torch.Tensor  # [B] tokens already in its cache
    lengths: torch.Tensor  # [B] its tokens in this step (1 for a decode)
    samples: torch.Tensor  # [B] 1 where it samples a token this step
    scored: torch.Tensor  # [B] its rows that score prompt tokens (prompt logprobs)
    prefill_ids: torch.Tensor  # [P] the prefill chunks' token ids, in order
    admitted_slots: torch.Tensor  # [A]
    admitted_counts: torch.Tensor  # [A] blocks of each
    admitted_blocks: torch.Tensor  # [sum of counts]
    sampling: SamplingPlan | None = None  # rank 0 only

    @property
    def stop(self) -> bool:
        return self.num_decodes < 0

    @property
    def num_sequences(self) -> int:
        return self.num_decodes + self.num_prefills

    @classmethod
    def unpack(cls, packed: torch.Tensor, sampling: SamplingPlan | None = None) -> "StepPlan":
        head = packed[:HEADER].tolist()
        if head[_KIND] == STOP:
            empty = packed[:0]
            return cls(packed, -1, 0, *([empty] * 9))
        b = head[_DECODES] + head[_PREFILLS]
        a = head[_ADMITTED]
        cuts = [HEADER + b * i for i in range(6)]
        p_end = cuts[5] + head[_PREFILL_TOKENS]
        slots, starts, lengths, samples, scored = (packed[cuts[i]:cuts[i + 1]] for i in range(5))
        return cls(packed, head[_DECODES], head[_PREFILLS], slots, starts, lengths, samples,
                   scored, packed[cuts[5]:p_end], packed[p_end:p_end + a],
                   packed[p_end + a:p_end + 2 * a],
                   packed[p_end + 2 * a:p_end + 2 * a + head[_ADMITTED_BLOCKS]], sampling)


def stop_plan() -> StepPlan:
    """The plan that ends the other ranks' step loops."""
    packed = torch.zeros(HEADER, dtype=torch.long)
    packed[_KIND], packed[_LENGTH] = STOP, HEADER
    return StepPlan.unpack(packed)


def length_of(header: torch.Tensor) -> int:
    """A packed plan's whole length, from its header."""
    return int(header[_LENGTH])


def make(step: Step, admitted: list[Sequence]) -> StepPlan:
    """Rank 0: the plan of `step`, carrying the admissions since the last plan."""
    decodes, prefills = step.decodes, step.prefills
    seqs = decodes + [s for s, _ in prefills]
    lengths = [1] * len(decodes) + [n for _, n in prefills]
    # Decodes always sample; a prefill samples once its chunk reaches the end of the prompt.
    samples = [1] * len(decodes) + [int(s.num_cached + n == s.prompt_len) for s, n in prefills]
    scored = [0] * len(decodes) + [_scored_rows(s, n) for s, n in prefills]
    chunk_ids = [s.prompt[s.num_cached:s.num_cached + n] for s, n in prefills]
    prefill_tokens = sum(lengths) - len(decodes)
    blocks = [b for s in admitted for b in s.blocks]
    ints = [STEP, len(decodes), len(prefills), prefill_tokens, len(admitted), len(blocks), 0, 0]
    ints += [s.slot for s in seqs] + [s.num_cached for s in seqs] + lengths + samples + scored
    tail = [s.slot for s in admitted] + [len(s.blocks) for s in admitted] + blocks
    packed = torch.cat([torch.tensor(ints, dtype=torch.long), *chunk_ids,
                        torch.tensor(tail, dtype=torch.long)])
    packed[_LENGTH] = packed.shape[0]
    samplers = [s for s, sampled in zip(seqs, samples) if sampled]
    scoring = [(s, n) for (s, _), n in zip(prefills, scored[len(decodes):]) if n]
    targets = None
    if scoring:  # row j of a chunk starting at c predicts prompt token c + j + 1
        targets = torch.cat([s.prompt[s.num_cached + 1:s.num_cached + 1 + n] for s, n in scoring])
    sampling = SamplingPlan(
        params=[s.sampling for s in samplers],
        top_n=max((s.top_n_tokens for s in samplers), default=0),
        admitted=[Admission(s.slot, s.sampling, s.prompt, s.resumed_tokens) for s in admitted],
        prompt_targets=targets,
        prompt_top_n=max((s.top_n_tokens for s, _ in scoring), default=0))
    return StepPlan.unpack(packed, sampling)


def _scored_rows(seq: Sequence, chunk: int) -> int:
    """Rows of this chunk that score a prompt token: all but the prompt's last (whose logits
    predict the first generated token, which sampling scores)."""
    if not seq.prefill_logprobs:
        return 0
    return min(seq.num_cached + chunk, seq.prompt_len - 1) - seq.num_cached
