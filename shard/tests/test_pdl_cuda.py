"""Programmatic dependent launch (shard/pdl.py): a kernel launched early waits for the one
before it. Collected only where a CUDA GPU is present (see conftest.py); run on the lent GPU.
"""

from __future__ import annotations

import pytest
import torch

from shard import gemv, pdl
from shard.paged_decode import PagedDecode
from shard.rotary_cache import rotary_into_cache

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def pdl_on():
    pdl.configure(True)  # conftest.py switches it off after each test


def test_pdl_is_on_for_hopper_and_later_only_when_switched_on():
    assert pdl.enabled(CUDA) == (torch.cuda.get_device_capability() >= (9, 0))
    assert not pdl.enabled(CUDA, pdl.MAX_ROWS + 1)  # measured slower at 2-16 rows
    assert not pdl.enabled(torch.device("cpu"))
    pdl.configure(False)
    assert not pdl.enabled(CUDA)


@pytest.mark.parametrize("rows", [1, 5])
def test_each_product_of_a_chain_reads_its_predecessors_output_not_a_stale_one(rows):
    """Six products, each reading the previous one's output: every other one with the
    residual add, the ones between of RMSNorm of their input (every program sums the squares
    of all of it, or, over 2-16 rows, takes the added product's sums of them). Captured in a
    CUDA graph and replayed on new inputs: with PDL every kernel starts before its
    predecessor ends, so a read before the wait would see the previous replay's values.
    Equal, bit for bit, to the same chain without PDL."""
    assert pdl.enabled(CUDA), "the lent GPUs are Hopper"
    inner = 4096
    gen = torch.Generator(device=CUDA).manual_seed(rows)
    weights = [(torch.randn(inner, inner, device=CUDA, generator=gen) / inner ** 0.5
                ).to(torch.bfloat16) for _ in range(6)]
    x = torch.empty(rows, inner, device=CUDA, dtype=torch.bfloat16)
    residual = torch.empty_like(x)

    def chain(use_pdl: bool) -> torch.Tensor:
        y, stream, squares = x, residual, None
        for i, weight in enumerate(weights):
            if i % 2:
                stream, squares = gemv.added_product(y, weight, stream, use_pdl=use_pdl)
                y = stream
            else:
                y = gemv.product(y, weight, False, norm_eps=1e-5 if i else None,
                                 squares=squares, use_pdl=use_pdl)
        return y

    outputs, graphs = {}, {}
    x.normal_(generator=gen), residual.normal_(generator=gen)
    for use_pdl in (True, False):
        chain(use_pdl)  # compiled before capture
        graphs[use_pdl] = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graphs[use_pdl]):
            outputs[use_pdl] = chain(use_pdl)
    for _ in range(5):
        x.normal_(generator=gen), residual.normal_(generator=gen)
        graphs[True].replay()
        graphs[False].replay()
        torch.cuda.synchronize()
        assert torch.equal(outputs[True], outputs[False])
        assert torch.equal(outputs[False], chain(False))  # the graphs replay this input


def test_attention_reads_the_cache_its_predecessor_wrote():
    """The rotary kernel writes k and v into the cache and the decode kernel (then the merge)
    reads them, all launched early: a graph of both, replayed on new q/k/v, equals eager."""
    heads, kv_heads, dim, page, tokens = 32, 8, 128, 16, 300
    gen = torch.Generator(device=CUDA).manual_seed(0)
    blocks = -(-tokens // page)
    k_cache = torch.randn(blocks, page, kv_heads, dim, device=CUDA, generator=gen
                          ).to(torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    table = torch.arange(blocks, device=CUDA, dtype=torch.int32)[None]
    lens = torch.tensor([tokens], device=CUDA, dtype=torch.int32)
    positions = torch.tensor([tokens - 1], device=CUDA)
    slots = positions.clone()
    angles = torch.arange(4096, device=CUDA)[:, None] / 10000 ** (
        torch.arange(dim // 2, device=CUDA) / (dim // 2))
    cos, sin = angles.cos(), angles.sin()
    qkv = torch.empty(1, (heads + 2 * kv_heads) * dim, device=CUDA, dtype=torch.bfloat16)
    decode = PagedDecode(CUDA)

    def step() -> torch.Tensor:
        q = rotary_into_cache(qkv, positions, cos, sin, k_cache, v_cache, slots, heads,
                              kv_heads, dim)
        return decode(q, k_cache, v_cache, table, lens, torch.empty_like(q))

    qkv.normal_(generator=gen)
    step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for _ in range(5):
        qkv.normal_(generator=gen)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, step())


def test_a_replayed_step_reads_the_positions_slots_and_lengths_copied_in_before_it():
    """A layer's chain at one row, as the decode graph runs it: QKV with rotary writing the
    newest token's key and value, decode attention over the context (the merge after it) and
    the O product with the residual add. The kernels read the step's positions, slots,
    lengths and block table before their wait (pdl.py): copied into the graph's inputs before
    each replay, a new context length each time, every output equals, bit for bit, the same
    chain run eagerly without PDL on the same inputs and caches."""
    heads, kv_heads, dim, page, hidden = 32, 8, 64, 16, 2048
    gen = torch.Generator(device=CUDA).manual_seed(1)
    blocks = 64
    k_cache = torch.randn(blocks, page, kv_heads, dim, device=CUDA, generator=gen
                          ).to(torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    order = torch.randperm(blocks, device=CUDA, generator=gen).to(torch.int32)
    table = order[None].clone()
    lens = torch.ones(1, device=CUDA, dtype=torch.int32)
    positions = torch.zeros(1, device=CUDA, dtype=torch.long)
    slots = torch.zeros(1, device=CUDA, dtype=torch.long)
    angles = torch.arange(4096, device=CUDA)[:, None] / 10000 ** (
        torch.arange(dim // 2, device=CUDA) / (dim // 2))
    cos, sin = angles.cos(), angles.sin()
    qkv_weight = (torch.randn((heads + 2 * kv_heads) * dim, hidden, device=CUDA, generator=gen)
                  / hidden ** 0.5).to(torch.bfloat16)
    o_weight = (torch.randn(hidden, heads * dim, device=CUDA, generator=gen)
                / (heads * dim) ** 0.5).to(torch.bfloat16)
    x = torch.empty(1, hidden, device=CUDA, dtype=torch.bfloat16)
    residual = torch.empty_like(x)
    decode = PagedDecode(CUDA)

    def layer(k, v) -> tuple[torch.Tensor, torch.Tensor]:
        q = gemv.qkv_rotary(x, qkv_weight, positions, cos, sin, k, v, slots, heads, kv_heads,
                            dim)
        attended = decode(q, k, v, table, lens, torch.empty_like(q))
        return q, gemv.added_product(attended.view(1, heads * dim), o_weight, residual)[0]

    x.normal_(generator=gen), residual.normal_(generator=gen)
    layer(k_cache, v_cache)  # compiled before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = layer(k_cache, v_cache)
    for length in (1, 17, 300, 512, 1000, 64):
        position = length - 1
        block = int(order[position // page])
        positions.copy_(torch.tensor([position]))
        slots.copy_(torch.tensor([block * page + position % page]))
        lens.copy_(torch.tensor([length], dtype=torch.int32))
        x.normal_(generator=gen), residual.normal_(generator=gen)
        k_before, v_before = k_cache.clone(), v_cache.clone()
        graph.replay()
        pdl.configure(False)
        expected = layer(k_before, v_before)
        pdl.configure(True)
        torch.cuda.synchronize()
        assert torch.equal(captured[0], expected[0])  # the rotated queries
        assert torch.equal(k_cache, k_before) and torch.equal(v_cache, v_before)
        assert torch.equal(captured[1], expected[1])
