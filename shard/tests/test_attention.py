"""The torch attention backend against a float64 reference of the same paged attention.

Each case is one ragged step: decodes with different context lengths, then prefill chunks with
and without earlier cached context, over pages handed out in a shuffled order. The reference
attends densely, per sequence, to its whole context (cached tokens + this step's new ones), with
a causal mask and GQA by repeating each key/value head.
"""

from __future__ import annotations

import builtins
from dataclasses import dataclass

import pytest
import torch

from shard.attention import StepLayout, TorchAttention, flash_unavailable, write_kv
from shard.kv_cache import blocks_for

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 4, 2, 16


@dataclass
class RaggedStep:
    layout: StepLayout
    q: torch.Tensor  # [T, Hq, D]
    k: torch.Tensor  # [T, Hkv, D]
    v: torch.Tensor
    k_cache: torch.Tensor  # [num_blocks, block_size, Hkv, D], before the step
    v_cache: torch.Tensor
    cached_lens: list[int]  # tokens of each sequence already in the cache before the step
    query_lens: list[int]
    tables: list[list[int]]  # the blocks of each sequence, in position order

    @property
    def heads(self) -> tuple[int, int, int]:
        """(query heads, key/value heads, head dim)."""
        return self.q.shape[1], self.k.shape[1], self.q.shape[2]

    def to(self, device: torch.device) -> "RaggedStep":
        layout = self.layout
        moved = StepLayout(layout.num_decodes, layout.query_starts, layout.context_lens,
                           layout.cu_seqlens_q.to(device), layout.seqused_k.to(device),
                           layout.block_table.to(device), layout.slot_mapping.to(device),
                           layout.block_size)
        return RaggedStep(moved, self.q.to(device), self.k.to(device), self.v.to(device),
                          self.k_cache.to(device), self.v_cache.to(device), self.cached_lens,
                          self.query_lens, self.tables)


# (cached tokens before the step, new tokens): decodes first, then prefill chunks.
MIXED = [(0, 1), (6, 1), (32, 1), (49, 1), (0, 9), (20, 6), (15, 1), (0, 1), (3, 17)]
DECODES_ONLY = [(40, 1), (0, 1), (16, 1), (5, 1)]
PREFILLS_ONLY = [(0, 23), (11, 5), (0, 2), (31, 16)]
BATCHES = {"mixed": (MIXED, 4), "decodes_only": (DECODES_ONLY, 4),
           "prefills_only": (PREFILLS_ONLY, 0)}


def random_batch(seed: int) -> tuple[list[tuple[int, int]], int]:
    """0-5 decodes with contexts of 1-70 tokens, then 0-4 prefill chunks of 1-30 tokens after
    0-40 cached ones (at least one sequence)."""
    gen = torch.Generator().manual_seed(1000 + seed)

    def draw(low, high):
        return int(torch.randint(low, high + 1, (1,), generator=gen))

    num_decodes, num_prefills = draw(0, 5), draw(0, 4)
    if num_decodes + num_prefills == 0:
        num_prefills = 1
    decodes = [(draw(0, 69), 1) for _ in range(num_decodes)]
    prefills = [(draw(0, 40) * draw(0, 1), draw(1, 30)) for _ in range(num_prefills)]
    return decodes + prefills, num_decodes


def make_step(sequences: list[tuple[int, int]], num_decodes: int, block_size: int,
              dtype: torch.dtype, seed: int, fill_unused: float = 0.0,
              block_zero_unused: bool = False,
              heads: tuple[int, int, int] = (NUM_HEADS, NUM_KV_HEADS, HEAD_DIM)) -> RaggedStep:
    """A random step; unused cache slots hold `fill_unused`, cached context holds random K/V."""
    NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = heads  # noqa: N806 (the module's names, per step)
    gen = torch.Generator().manual_seed(seed)
    cached_lens = [c for c, _ in sequences]
    query_lens = [n for _, n in sequences]
    needed = [blocks_for(c + n, block_size) for c, n in sequences]
    num_blocks = sum(needed) + 3  # a few blocks belong to no one
    order = torch.randperm(num_blocks, generator=gen).tolist()
    if block_zero_unused:  # block 0 is what a padded read of a block table finds
        order.remove(0)
        order.append(0)
    tables, used = [], 0
    for n in needed:
        tables.append(order[used:used + n])
        used += n
    width = max(needed)
    block_table = torch.zeros(len(sequences), width, dtype=torch.int32)
    for i, t in enumerate(tables):
        block_table[i, :len(t)] = torch.tensor(t, dtype=torch.int32)

    shape = (num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM)
    k_cache = torch.full(shape, fill_unused, dtype=dtype)
    v_cache = torch.full(shape, fill_unused, dtype=dtype)
    for t, c in zip(tables, cached_lens):
        slots = slots_of(t, range(c), block_size)
        k_cache.view(-1, NUM_KV_HEADS, HEAD_DIM)[slots] = torch.randn(
            c, NUM_KV_HEADS, HEAD_DIM, generator=gen).to(dtype)
        v_cache.view(-1, NUM_KV_HEADS, HEAD_DIM)[slots] = torch.randn(
            c, NUM_KV_HEADS, HEAD_DIM, generator=gen).to(dtype)

    total = sum(query_lens)
    q = torch.randn(total, NUM_HEADS, HEAD_DIM, generator=gen).to(dtype)
    k = torch.randn(total, NUM_KV_HEADS, HEAD_DIM, generator=gen).to(dtype)
    v = torch.randn(total, NUM_KV_HEADS, HEAD_DIM, generator=gen).to(dtype)
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    slot_mapping = torch.cat([slots_of(t, range(c, c + n), block_size)
                              for t, (c, n) in zip(tables, sequences)])
    context_lens = [c + n for c, n in sequences]
    layout = StepLayout(
        num_decodes=num_decodes, query_starts=starts, context_lens=context_lens,
        cu_seqlens_q=torch.tensor(starts, dtype=torch.int32),
        seqused_k=torch.tensor(context_lens, dtype=torch.int32),
        block_table=block_table, slot_mapping=slot_mapping, block_size=block_size)
    return RaggedStep(layout, q, k, v, k_cache, v_cache, cached_lens, query_lens, tables)


def slots_of(table: list[int], positions, block_size: int) -> torch.Tensor:
    return torch.tensor([table[p // block_size] * block_size + p % block_size for p in positions],
                        dtype=torch.long)


def reference(step: RaggedStep) -> torch.Tensor:
    """Dense causal softmax attention per sequence in float64, GQA by repeating kv heads."""
    NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = step.heads  # noqa: N806
    step = step.to(torch.device("cpu"))
    bs = step.layout.block_size
    flat_k = step.k_cache.double().view(-1, NUM_KV_HEADS, HEAD_DIM)
    flat_v = step.v_cache.double().view(-1, NUM_KV_HEADS, HEAD_DIM)
    group = NUM_HEADS // NUM_KV_HEADS
    outputs = []
    for i, (c, n) in enumerate(zip(step.cached_lens, step.query_lens)):
        rows = slice(step.layout.query_starts[i], step.layout.query_starts[i + 1])
        cached = slots_of(step.tables[i], range(c), bs)
        keys = torch.cat([flat_k[cached], step.k[rows].double()])  # [ctx, Hkv, D]
        values = torch.cat([flat_v[cached], step.v[rows].double()])
        keys = keys.repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, ctx, D]
        values = values.repeat_interleave(group, dim=1).transpose(0, 1)
        query = step.q[rows].double().transpose(0, 1)  # [Hq, n, D]
        scores = query @ keys.transpose(1, 2) / HEAD_DIM ** 0.5  # [Hq, n, ctx]
        q_pos = torch.arange(c, c + n)[:, None]
        scores = scores.masked_fill(torch.arange(c + n)[None, :] > q_pos, float("-inf"))
        outputs.append((scores.softmax(-1) @ values).transpose(0, 1))  # [n, Hq, D]
    return torch.cat(outputs)


def attention_layer(backend, step: RaggedStep, k_cache, v_cache, meta) -> torch.Tensor:
    """What a decoder layer does with the backend: store the new K/V, then attend."""
    write_kv(k_cache, v_cache, meta.slot_mapping, step.k, step.v)
    return backend.attend(step.q, k_cache, v_cache, meta)


def run_backend(step: RaggedStep, backend=None):
    k_cache, v_cache = step.k_cache.clone(), step.v_cache.clone()
    backend = backend or TorchAttention()
    out = attention_layer(backend, step, k_cache, v_cache, backend.prepare(step.layout))
    return out, k_cache, v_cache


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double().cpu() - ref).norm() / ref.norm()).item()


def check_against_reference(step: RaggedStep, tolerance: float, case: str, backend=None) -> None:
    out, _, _ = run_backend(step, backend)
    assert out.shape == step.q.shape and out.dtype == step.q.dtype
    ref = reference(step)
    error = relative_error(out, ref)
    assert error < tolerance, f"{case}: relative error {error}"
    # Per sequence too, so that one short sequence cannot hide in the batch's norm.
    starts = step.layout.query_starts
    for i in range(len(starts) - 1):
        rows = slice(starts[i], starts[i + 1])
        assert relative_error(out[rows], ref[rows]) < tolerance, f"{case}, sequence {i}"


@pytest.mark.parametrize("block_size", [16, 5, 1])
@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)],
                         ids=["float32", "bfloat16"])
def test_paged_attention_matches_float64_reference(block_size, batch, dtype, tolerance):
    for seed in range(3):
        sequences, num_decodes = BATCHES[batch]
        step = make_step(sequences, num_decodes, block_size, dtype, seed)
        check_against_reference(step, tolerance, f"seed {seed}")


@pytest.mark.parametrize("block_size", [16, 5, 1])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)],
                         ids=["float32", "bfloat16"])
def test_paged_attention_matches_float64_reference_on_random_ragged_batches(block_size, dtype,
                                                                            tolerance):
    for seed in range(8):
        sequences, num_decodes = random_batch(seed)
        step = make_step(sequences, num_decodes, block_size, dtype, seed)
        check_against_reference(step, tolerance, f"batch {sequences}, {num_decodes} decodes")


@pytest.mark.parametrize("garbage", [1e4, float("nan")], ids=["large", "nan"])
@pytest.mark.parametrize("block_size", [16, 5, 1])
@pytest.mark.parametrize("batch", list(BATCHES))
def test_attention_never_reads_cache_slots_outside_each_context(batch, block_size, garbage):
    """Unused pages and padding never reach the output, even when they hold NaN.

    Decodes are padded to the longest context of the step; the padded reads are masked, but
    masked softmax still multiplies the skipped values by 0, and 0 x NaN = NaN. Half of the
    cases leave block 0 (where zero-padded block tables point) to no sequence.
    """
    sequences, num_decodes = BATCHES[batch]
    for seed in range(6):
        spare = seed % 2 == 0
        clean = make_step(sequences, num_decodes, block_size, torch.float32, seed,
                          block_zero_unused=spare)
        dirty = make_step(sequences, num_decodes, block_size, torch.float32, seed,
                          fill_unused=garbage, block_zero_unused=spare)
        assert not spare or all(0 not in t for t in dirty.tables)
        out_clean, _, _ = run_backend(clean)
        out_dirty, _, _ = run_backend(dirty)
        assert torch.equal(out_dirty, out_clean), f"seed {seed}"
        assert relative_error(out_dirty, reference(dirty)) < 1e-5


@pytest.mark.parametrize("block_size", [16, 5, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_new_keys_and_values_land_exactly_in_their_slots(block_size, dtype):
    step = make_step(MIXED, 4, block_size, dtype, seed=3)
    _, k_cache, v_cache = run_backend(step)
    expected_k, expected_v = step.k_cache.clone(), step.v_cache.clone()
    expected_k.view(-1, NUM_KV_HEADS, HEAD_DIM)[step.layout.slot_mapping] = step.k
    expected_v.view(-1, NUM_KV_HEADS, HEAD_DIM)[step.layout.slot_mapping] = step.v
    # Bit-exact: the written slots hold the new K/V, every other slot is untouched.
    assert torch.equal(k_cache, expected_k)
    assert torch.equal(v_cache, expected_v)
    assert step.layout.slot_mapping.unique().numel() == step.layout.slot_mapping.numel()


def test_rotary_into_cache_puts_q_in_the_given_buffer_and_k_v_in_their_slots():
    """The separate stages behind Ops.rotary_into_cache (what the CPU runs): q rotated into the
    buffer given (the piecewise graphs' static one), k rotated and v as they came into their
    slots, the same values as ops.rotary and write_kv give."""
    from shard.models.ops import rotary, rotary_then_write

    heads, kv_heads, dim, tokens = 4, 2, 8, 5
    g = torch.Generator().manual_seed(4)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=g)
    angles = torch.rand(32, dim // 2, generator=g) * 10
    cos, sin = angles.cos(), angles.sin()
    positions = torch.tensor([0, 3, 31, 7, 7])
    slots = torch.tensor([9, 2, 14, 0, 5])
    caches = [torch.randn(4, 4, kv_heads, dim, generator=g) for _ in range(2)]
    expected_caches = [c.clone() for c in caches]
    q, k, v = rotary(qkv, positions, cos, sin, heads, kv_heads, dim)
    write_kv(*expected_caches, slots, k, v)
    buffer = torch.zeros(tokens + 3, heads, dim)
    got = rotary_then_write(rotary)(qkv, positions, cos, sin, *caches, slots, heads, kv_heads,
                                    dim, out=buffer[:tokens])
    assert got.data_ptr() == buffer.data_ptr() and torch.equal(buffer[:tokens], q)
    assert torch.equal(buffer[tokens:], torch.zeros(3, heads, dim))
    assert torch.equal(caches[0], expected_caches[0]) and torch.equal(caches[1],
                                                                      expected_caches[1])
    # Without a buffer: a fresh q, the same values.
    assert torch.equal(rotary_then_write(rotary)(qkv, positions, cos, sin, *caches, slots,
                                                 heads, kv_heads, dim), q)


def test_varlen_metadata_packs_every_context_slot_in_order():
    """What the CUDA torch backend gathers when varlen_attn takes every row (--decode-attention
    flash): each sequence's whole context, packed."""
    from shard.attention import TorchVarlenAttention

    step = make_step(MIXED, 4, 5, torch.float32, seed=4)
    meta = TorchVarlenAttention("flash").prepare(step.layout)
    assert meta.num_decodes == 0 and meta.first_row == 0 and meta.decode_table is None
    expected = torch.cat([slots_of(t, range(c + n), 5) for t, (c, n) in zip(step.tables, MIXED)])
    assert torch.equal(meta.context_slots, expected)
    assert torch.equal(meta.cu_seqlens_q, step.layout.cu_seqlens_q)
    assert meta.cu_seqlens_k.tolist() == [0] + torch.tensor(
        [c + n for c, n in MIXED]).cumsum(0).tolist()
    assert meta.max_context_len == max(c + n for c, n in MIXED)


def test_varlen_metadata_leaves_decode_rows_to_the_paged_kernel():
    """With the Triton kernel (CUDA only; here any callable stands in, since prepare never calls
    it) the decode rows keep their block tables and lengths, and varlen_attn gets only the
    prefill sequences: their query rows counted from the first of them, their contexts packed."""
    from shard.attention import TorchVarlenAttention

    backend = TorchVarlenAttention("flash")
    backend.decode = object()
    step = make_step(MIXED, 4, 5, torch.float32, seed=4)
    meta = backend.prepare(step.layout)
    assert meta.num_decodes == 4
    assert torch.equal(meta.decode_table, step.layout.block_table[:4])
    assert meta.decode_lens.tolist() == [c + 1 for c, _ in MIXED[:4]]
    prefills = MIXED[4:]
    assert meta.first_row == 4
    assert meta.cu_seqlens_q.tolist() == [0] + torch.tensor(
        [n for _, n in prefills]).cumsum(0).tolist()
    expected = torch.cat([slots_of(t, range(c + n), 5)
                          for t, (c, n) in zip(step.tables[4:], prefills)])
    assert torch.equal(meta.context_slots, expected)
    assert meta.cu_seqlens_k.tolist() == [0] + torch.tensor(
        [c + n for c, n in prefills]).cumsum(0).tolist()
    assert meta.max_context_len == max(c + n for c, n in prefills)
    # A decode-only step: nothing for varlen_attn at all.
    decodes = make_step(DECODES_ONLY, 4, 5, torch.float32, seed=5)
    meta = backend.prepare(decodes.layout)
    assert meta.num_decodes == 4 and meta.cu_seqlens_q is None and meta.context_slots is None


def test_a_flash_install_that_fails_to_import_is_a_reason_not_a_crash(monkeypatch):
    """A CUTLASS DSL without its CUDA libraries raises RuntimeError when FlashAttention-4 is
    imported: --attention auto must then fall back (a reason), as with no install at all."""
    real_import = builtins.__import__

    def broken(name, *args, **kwargs):
        if name == "flash_attn.cute":
            raise RuntimeError("No CTK flavor installed")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(builtins, "__import__", broken)
    assert flash_unavailable(torch.device("cuda")) == (
        "FlashAttention-4 (pip install flash-attn-4) is not importable: No CTK flavor installed")
