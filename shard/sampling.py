"""Turn one step's logits into tokens: penalties, temperature, top-k/top-p/typical-p, seeds.

Vectorized over the batch: per-request parameters become small tensors, never a Python loop
over the vocabulary. Random draws come from a counter-based hash of (seed, position, token id),
so a seeded request samples the same tokens whatever batch it runs in, on any device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from shard.models.ops import compile_stage

_MASK32 = 0xFFFFFFFF


@dataclass(slots=True, frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0
                or self.presence_penalty != 0.0)


@dataclass(slots=True)
class SampleOutput:
    tokens: torch.Tensor  # [S] int64
    logprobs: torch.Tensor  # [S] float32: of the chosen tokens
    top_ids: torch.Tensor | None  # [S, n] most likely tokens, when some request asked for them
    top_logprobs: torch.Tensor | None
    # [S, 2 + 2n] float64, what the step reports (token ids are exact in float64): token,
    # logprob, n top ids, n top logprobs. The greedy stage writes it itself (compiled: in the
    # kernels that compute the token and its logprob, no conversions after them).
    reported: torch.Tensor


def greedy(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The argmax of each row and its log-softmax, without the [S, vocab] float32 log-softmax:
    log p = logit - logsumexp(logits); and both as the step reports them ([S, 2] float64)."""
    return _with_logprobs(logits, logits.argmax(-1))


# Inputs per partial argmax in `greedy_in_chunks`: Inductor reduces a row's argmax in one
# program, which at one row over a 128k vocabulary took 22-30 µs of an H100's decode step (a
# split logsumexp beside it: 2 µs a kernel).
GREEDY_CHUNK = 1024


def greedy_in_chunks(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`greedy` as it compiles: the argmax in two steps, each chunk of GREEDY_CHUNK inputs then
    the best chunk (the first of equal maxima either way, as argmax), a few passes over the
    logits as they are."""
    rows, vocab = logits.shape
    chunks = -(-vocab // GREEDY_CHUNK)
    padded = F.pad(logits, (0, chunks * GREEDY_CHUNK - vocab), value=float("-inf"))
    best, where = padded.view(rows, chunks, GREEDY_CHUNK).max(-1)
    chunk = best.argmax(-1, keepdim=True)
    return _with_logprobs(logits, chunk.squeeze(1) * GREEDY_CHUNK
                          + where.gather(1, chunk).squeeze(1))


def _with_logprobs(logits: torch.Tensor, tokens: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    upcast = logits.float()
    chosen = upcast.gather(1, tokens[:, None]).squeeze(1) - upcast.logsumexp(-1)
    return tokens, chosen, torch.stack((tokens.double(), chosen.double()), 1)


class Sampler:
    """Samples for the sequences of a step; keeps token counts for the penalized ones.

    A step of greedy rows only, without penalties or top-n (offline runs, most benchmarks) takes
    `greedy`, or compiled (`--compile`) `greedy_in_chunks`: that reads the logits in their own
    dtype, where the general path makes float32 copies and a full log-softmax over [S, vocab]:
    on the H100 that took a 1B decode step at batch ~225 from 3.83 to 3.62 ms."""

    def __init__(self, vocab_size: int, max_batch_size: int, device: torch.device,
                 compiled: bool = False):
        self.vocab_size = vocab_size
        self.max_batch_size = max_batch_size
        self.device = device
        self._greedy = compile_stage(greedy_in_chunks) if compiled else greedy
        # Allocated on first use: most deployments never ask for penalties.
        self._prompt_seen: torch.Tensor | None = None  # [slots, vocab] bool
        self._output_counts: torch.Tensor | None = None  # [slots, vocab] int32

    def admit(self, slot: int, params: SamplingParams, prompt: torch.Tensor,
              resumed_tokens: int = 0) -> None:
        """A sequence took `slot`. In a continuation the prompt's last `resumed_tokens` were
        generated before (on another shard group): they count as generated, so the penalties
        are what they would have been there."""
        if not params.penalized:
            return
        if self._output_counts is None:
            shape = (self.max_batch_size, self.vocab_size)
            self._prompt_seen = torch.zeros(shape, dtype=torch.bool, device=self.device)
            self._output_counts = torch.zeros(shape, dtype=torch.int32, device=self.device)
        original = prompt.shape[0] - resumed_tokens
        self._prompt_seen[slot].zero_()
        # index_fill_, not `seen[slot, ids] = True`: that sends the True from pageable memory,
        # which waits for all queued GPU work.
        self._prompt_seen[slot].index_fill_(0, _on(prompt[:original], self.device), True)
        self._output_counts[slot].zero_()
        if resumed_tokens:
            generated = _on(prompt[original:], self.device)
            self._output_counts[slot].index_add_(
                0, generated, torch.ones_like(generated, dtype=torch.int32))

    def warm_up(self, dtype: torch.dtype) -> None:
        """Compile the greedy stage before serving: for one row, then (automatic dynamic shapes)
        for any number of rows. Compiling mid-run would stall a step for seconds."""
        with torch.inference_mode():  # as the engine calls it: the guards check the mode
            for rows in (1, 2):
                self._greedy(torch.zeros(rows, self.vocab_size, dtype=dtype, device=self.device))

    @property
    def greedy_stage(self) -> Callable:
        """logits [S, vocab] -> (tokens, their logprobs, the report [S, 2] float64): what a step
        that takes_greedy runs (the decode graphs capture it)."""
        return self._greedy

    def takes_greedy(self, params: list[SamplingParams], top_n: int) -> bool:
        """Whether a step of sequences with these parameters runs greedy_stage alone: all
        greedy, none penalized, no top-n."""
        return (not top_n and all(p.greedy for p in params)
                and not (self._output_counts is not None and any(p.penalized for p in params)))

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams],
                 slots: list[int] | torch.Tensor, positions: list[int], top_n: int
                 ) -> SampleOutput:
        """logits [S, vocab] (the model's dtype, or float32) for S sequences; slots: theirs (on
        the host); positions: index of each new token."""
        if self.takes_greedy(params, top_n):
            tokens, chosen, reported = self._greedy(logits)
            return SampleOutput(tokens, chosen, None, None, reported)
        dev = logits.device
        penalized = self._output_counts is not None and any(p.penalized for p in params)
        all_greedy = all(p.greedy for p in params)
        logits = logits.float()
        if penalized:  # only then do the slots travel to the device
            rows = _on(slots, dev)
            logits = self._penalize(logits, params, rows)
        if all_greedy:
            logprobs = logits.log_softmax(-1)
            tokens = logits.argmax(-1)
        else:
            temps = _on([p.temperature or 1.0 for p in params], dev)
            logprobs = (logits / temps[:, None]).log_softmax(-1)
            sampled = (_filter(logprobs, params) + _gumbel(params, positions, self.vocab_size,
                                                           dev)).argmax(-1)
            greedy = _on([p.greedy for p in params], dev)
            tokens = torch.where(greedy, logits.argmax(-1), sampled)
        if penalized:
            self._output_counts.index_put_((rows, tokens), torch.ones_like(tokens, dtype=torch.int32),
                                           accumulate=True)
        chosen = logprobs.gather(1, tokens[:, None]).squeeze(1)
        parts = [tokens[:, None], chosen[:, None]]
        top_ids = top_logprobs = None
        if top_n:
            top_logprobs, top_ids = logprobs.topk(top_n, dim=-1)
            parts += [top_ids, top_logprobs]
        return SampleOutput(tokens, chosen, top_ids, top_logprobs,
                            torch.cat([p.double() for p in parts], dim=1))

    def _penalize(self, logits, params, rows):
        dev = logits.device
        counts = self._output_counts[rows]
        seen = self._prompt_seen[rows] | (counts > 0)
        rep = _on([p.repetition_penalty for p in params], dev)[:, None]
        # As in transformers: seen tokens' positive logits shrink, negative ones grow.
        logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
        freq = _on([p.frequency_penalty for p in params], dev)[:, None]
        presence = _on([p.presence_penalty for p in params], dev)[:, None]
        return logits - freq * counts - presence * (counts > 0)


def _on(values: list | torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small per-step tensor on `device` (from a list, or a host tensor). On CUDA it travels
    from pinned memory without blocking: a plain copy from pageable memory would wait for all
    queued GPU work."""
    tensor = values if isinstance(values, torch.Tensor) else torch.tensor(values)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor


def _filter(logprobs: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """logprobs with tokens outside each row's top-k, top-p and typical-p sets at -inf."""
    dev = logprobs.device
    vocab = logprobs.shape[-1]
    needs_sort = any(p.top_p < 1.0 or p.typical_p < 1.0 for p in params)
    k_values = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    if not needs_sort and all(k == vocab for k in k_values):
        return logprobs
    ks = _on(k_values, dev)
    if not needs_sort:  # top-k alone: a partial sort suffices (its width known on the host)
        top = logprobs.topk(max(k_values), dim=-1).values
        kth = top.gather(1, (ks.clamp(max=top.shape[1]) - 1)[:, None])
        return logprobs.masked_fill(logprobs < kth, float("-inf"))
    top_ps = _on([p.top_p for p in params], dev)[:, None]
    sorted_lp, order = logprobs.sort(dim=-1, descending=True)
    # top-k by value, as the partial-sort path above: tokens tied with the k-th all stay.
    drop = sorted_lp < sorted_lp.gather(1, ks[:, None] - 1)
    # top-p on what top-k left: keep the smallest prefix whose mass reaches p (always the first).
    # Rows without top-p skip it: the cumulative sum's rounding must not cut their tail.
    probs = sorted_lp.masked_fill(drop, float("-inf")).softmax(-1)
    drop |= ((probs.cumsum(-1) - probs) > top_ps) & (top_ps < 1.0)
    drop[:, 0] = False
    if any(p.typical_p < 1.0 for p in params):
        # Typical-p last, on what top-k and top-p left, renormalized: transformers' order.
        drop |= _typical_drop(sorted_lp.masked_fill(drop, float("-inf")).log_softmax(-1), params)
    return logprobs.scatter(1, order, sorted_lp.masked_fill(drop, float("-inf")))


def _typical_drop(logprobs, params):
    """Typical-p (Meister et al.) as transformers does it: True for tokens outside the set."""
    dev = logprobs.device
    masses = _on([p.typical_p for p in params], dev)[:, None]
    probs = logprobs.exp()
    entropy = -(logprobs.nan_to_num(neginf=0.0) * probs).sum(-1, keepdim=True)
    surprise_gap = (-logprobs - entropy).abs()
    gap_sorted, gap_order = surprise_gap.sort(dim=-1)
    cum = probs.gather(1, gap_order).cumsum(-1)
    last = (cum < masses).sum(-1, keepdim=True).clamp(max=logprobs.shape[-1] - 1)
    keep_gap = gap_sorted <= gap_sorted.gather(1, last)
    keep = torch.zeros_like(keep_gap).scatter(1, gap_order, keep_gap)
    keep |= (masses >= 1.0)
    return ~keep


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finalizer on int64 tensors holding 32-bit values (products wrap)."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _MASK32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _MASK32
    return x ^ (x >> 16)


def _gumbel(params: list[SamplingParams], positions: list[int], vocab: int,
            device: torch.device) -> torch.Tensor:
    """Gumbel noise [S, vocab], a pure function of (seed, position, token id)."""
    lo = _on([p.seed & _MASK32 for p in params], device)
    hi = _on([(p.seed >> 32) & _MASK32 for p in params], device)
    pos = _on(positions, device)
    key = _mix32(_mix32(lo ^ _mix32(hi ^ 0x5BD1E995)) ^ pos)
    token_key = (torch.arange(vocab, device=device) * 0x9E3779B1) & _MASK32
    bits = _mix32(key[:, None] ^ token_key[None, :]) >> 8  # 24 uniform bits
    uniform = (bits.float() + 0.5) * (1.0 / (1 << 24))
    return -torch.log(-torch.log(uniform))
