"""Admission under the token budget and the plan of each engine step.

Requests wait in arrival order until their whole reservation (prompt + max_new_tokens, in
blocks) fits; a request is admitted exactly once and then runs to its end. Each step every
running sequence past its prompt decodes one token (unless its last allowed token is already
in flight), and prompts advance in chunks that share
`max_batch_prefill_tokens` (chunked prefill), oldest first. While sequences decode, a step may
hold fewer tokens in all (`step_tokens_while_decoding`, sized in warm-up from
`--prefill-chunk-ms`): every running stream waits for each step, so its length is their
inter-token latency.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from shard.kv_cache import BlockAllocator, blocks_for
from shard.sampling import SamplingParams
from shard.tracing import SequenceTrace


class State(enum.Enum):
    WAITING = "waiting"  # submitted, its reservation not yet taken
    RUNNING = "running"  # admitted: it holds a slot and its blocks
    ENDED = "ended"  # finished or cancelled; its slot and blocks are free again


@dataclass(slots=True, eq=False)
class Sequence:
    request_id: int
    stream: object  # the router stream that submitted it (engine-owned handle)
    prompt: torch.Tensor  # int64 token ids, on the host
    sampling: SamplingParams
    max_new_tokens: int
    ignore_eos: bool = False
    stop_token_ids: frozenset[int] = frozenset()
    top_n_tokens: int = 0
    # Also report the prompt's logprobs: gathered per prefill chunk on the device, sent at the end.
    prefill_logprobs: bool = False
    # A continuation after failover: the prompt's last resumed_tokens were generated on another
    # shard group; they count as generated for the frequency and presence penalties.
    resumed_tokens: int = 0
    prompt_logprobs: list[tuple[torch.Tensor, ...]] = field(default_factory=list)
    state: State = State.WAITING
    slot: int = -1  # row in the per-sequence tables while running
    blocks: list[int] = field(default_factory=list)
    num_cached: int = 0  # tokens whose K/V are in the cache
    num_generated: int = 0  # tokens emitted
    num_pending: int = 0  # tokens sampled by launched steps, not yet emitted (async scheduling)
    trace: SequenceTrace | None = None  # set when the request carries a trace context

    @property
    def prompt_len(self) -> int:
        return self.prompt.shape[0]

    @property
    def reserved_tokens(self) -> int:
        return self.prompt_len + self.max_new_tokens

    @property
    def prefilling(self) -> bool:
        return self.num_cached < self.prompt_len


@dataclass(slots=True)
class Step:
    decodes: list[Sequence]
    prefills: list[tuple[Sequence, int]]  # (sequence, chunk length)


class Scheduler:
    def __init__(self, allocator: BlockAllocator, max_batch_size: int, max_prefill_tokens: int,
                 max_total_tokens: int, step_tokens_while_decoding: int = 0):
        self.allocator = allocator
        self.max_prefill_tokens = max_prefill_tokens
        # Tokens a step that carries decodes may hold, decodes included; 0: no such bound.
        self.step_tokens_while_decoding = step_tokens_while_decoding
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self._free_slots = list(range(max_batch_size - 1, -1, -1))
        # Blocks one sequence may hold: the width of the model runner's block tables.
        self.max_blocks = blocks_for(max_total_tokens, allocator.block_size)

    @property
    def idle(self) -> bool:
        # Waiting requests are work too: when the last running ones end, the next step admits
        # them, so the engine must not sleep on its inbox.
        return not self.running and not self.waiting

    def rejection(self, seq: Sequence) -> str | None:
        """Why `seq` can never be admitted, or None."""
        needed = blocks_for(seq.reserved_tokens, self.allocator.block_size)
        if needed > self.max_blocks:
            return (f"prompt + max_new_tokens = {seq.reserved_tokens} tokens exceeds "
                    f"max_total_tokens ({self.max_blocks * self.allocator.block_size})")
        if needed > self.allocator.num_blocks:
            return (f"prompt + max_new_tokens = {seq.reserved_tokens} tokens exceeds the whole "
                    f"budget ({self.allocator.total_tokens} tokens)")
        return None

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def admit(self) -> list[Sequence]:
        """Admit waiting sequences, oldest first, while their reservation fits."""
        admitted = []
        while self.waiting and self._free_slots:
            seq = self.waiting[0]
            blocks = self.allocator.allocate(
                blocks_for(seq.reserved_tokens, self.allocator.block_size))
            if blocks is None:
                break  # strict arrival order: nobody overtakes the oldest waiting request
            self.waiting.popleft()
            seq.blocks = blocks
            seq.slot = self._free_slots.pop()
            seq.state = State.RUNNING
            self.running.append(seq)
            admitted.append(seq)
            if seq.trace is not None:
                seq.trace.admitted()
        return admitted

    def prefill_budget(self, num_decodes: int) -> int:
        """Prompt tokens a step may take beside `num_decodes` decodes."""
        cap = self.step_tokens_while_decoding
        if not num_decodes or not cap:
            return self.max_prefill_tokens
        # A quarter of the bound at least: prompts still advance beside a full batch of decodes.
        return min(self.max_prefill_tokens, max(cap - num_decodes, cap // 4))

    def advance(self, step: Step) -> None:
        """A launched step's tokens are in the cache (as far as later steps are concerned), and
        each of its samplers has one more token on the way."""
        for seq in step.decodes:
            seq.num_cached += 1
            seq.num_pending += 1
        for seq, n in step.prefills:
            seq.num_cached += n
            if not seq.prefilling:
                seq.num_pending += 1

    def schedule(self) -> Step | None:
        decodes, prefilling = [], []
        for seq in self.running:
            if seq.prefilling:
                prefilling.append(seq)
            # In flight already up to its last token: plan nothing past max_new_tokens.
            elif seq.num_generated + seq.num_pending < seq.max_new_tokens:
                decodes.append(seq)
        prefills = []
        budget = self.prefill_budget(len(decodes))
        for seq in prefilling:
            if budget <= 0:
                break
            chunk = min(seq.prompt_len - seq.num_cached, budget)
            prefills.append((seq, chunk))
            budget -= chunk
        if not decodes and not prefills:
            return None
        return Step(decodes, prefills)

    def release(self, seq: Sequence) -> None:
        """Forget a finished or cancelled sequence and return its blocks and slot."""
        if seq.trace is not None:
            seq.trace.ended(seq.num_generated)
        if seq.state is State.WAITING:
            self.waiting.remove(seq)
        else:
            self.running.remove(seq)
            self.allocator.release(seq.blocks)
            self._free_slots.append(seq.slot)
            seq.blocks, seq.slot = [], -1
        seq.state = State.ENDED


def largest_within(target_s: float, sizes: list[int], seconds: Callable[[int], float]) -> int:
    """The largest of `sizes` (ascending) whose step `seconds(size)` says takes at most
    target_s, by bisection (step time grows with its tokens); 0 when the largest one does (no
    bound needed), the smallest when none does."""
    if seconds(sizes[-1]) <= target_s:
        return 0
    best, lo, hi = sizes[0], 0, len(sizes) - 2
    while lo <= hi:
        mid = (lo + hi) // 2
        if seconds(sizes[mid]) <= target_s:
            best, lo = sizes[mid], mid + 1
        else:
            hi = mid - 1
    return best
