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
