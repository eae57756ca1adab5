"""Our Triton kernels against their references: on the GPU where there is one, else on the CPU
under Triton's interpreter (conftest.py sets TRITON_INTERPRET=1 before Triton loads), so that
every CI run checks the same kernel code the GPU runs.

The interpreter computes in NumPy, which has no bfloat16 (its bfloat16 results are garbage), so
on the CPU the kernels run in float32 and float16, and on fewer shapes (each case takes
seconds there): their indexing, masks, splits and merge are what these cases check; the GPU
adds bfloat16 and the full grid of shapes.
"""

from __future__ import annotations

import pytest
import torch

from shard.attention import TorchVarlenAttention, write_kv
from shard.paged_decode import PagedDecode
from shard.rotary_cache import rotary_into_cache
from shard.tests.test_attention import (DECODES_ONLY, check_against_reference, make_step,
                                        reference, relative_error)

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
# Llama-3-8B's (32, 8, 128) and SmolLM2's (9, 3, 64) head shapes, then odd ones.
DECODE_HEADS = ([(32, 8, 128), (9, 3, 64), (12, 4, 96), (8, 1, 64), (4, 4, 128)] if ON_GPU
                else [(9, 3, 64), (12, 4, 96), (8, 1, 64)])
DECODE_SPLITS = [1, 2, 8, 32] if ON_GPU else [1, 8]
DECODE_DTYPE, DECODE_TOLERANCE = (torch.bfloat16, 1e-2) if ON_GPU else (torch.float32, 1e-5)
ROTARY_HEADS = [(32, 8, 128), (9, 3, 64), (14, 2, 80)]
ROTARY_DTYPES = ([torch.bfloat16, torch.float16, torch.float32] if ON_GPU
                 else [torch.float16, torch.float32])
# The rotary kernel runs one program per token, the same code for each: 37 tokens check the
# grid and the scattered slots as well as 300 do, which on the GPU add the size of a real step.
ROTARY_TOKENS = [1, 37, 300] if ON_GPU else [1, 37]
# Contexts of the decode kernel's cases: up to 700 tokens on the GPU; on the CPU up to 200,
# still past 8 splits' share of 16-token pages (some splits empty, others several pages).
DECODE_LONGEST = 700 if ON_GPU else 200


def _ids(heads):
    return [f"h{h}-kv{kv}-d{d}" for h, kv, d in heads]


@pytest.mark.parametrize("heads", DECODE_HEADS, ids=_ids(DECODE_HEADS))
@pytest.mark.parametrize("block_size", [16, 5])
@pytest.mark.parametrize("splits", DECODE_SPLITS)
def test_triton_decode_kernel_matches_float64_reference_at_every_split(heads, block_size,
                                                                       splits):
    """The kernel alone, over contexts of 1 to DECODE_LONGEST tokens (some shorter than a
    split's share, leaving splits empty), any head dim and GQA group, pages of any size."""
    gen = torch.Generator().manual_seed(11)
    sequences = [(int(c), 1) for c in torch.randint(0, DECODE_LONGEST, (13,), generator=gen)]
    sequences += [(0, 1), (63, 1), (64, 1), (127, 1)]
    step = make_step(sequences, len(sequences), block_size, DECODE_DTYPE, 11,
                     heads=heads).to(DEVICE)
    k_cache, v_cache = step.k_cache.clone(), step.v_cache.clone()
    write_kv(k_cache, v_cache, step.layout.slot_mapping, step.k, step.v)
    out = torch.full_like(step.q, float("nan"))
    PagedDecode(DEVICE)(step.q, k_cache, v_cache, step.layout.block_table,
                        step.layout.seqused_k, out, num_splits=splits)
    ref = reference(step)
    for i, (cached, _) in enumerate(sequences):
        error = relative_error(out[i], ref[i])
        assert error < DECODE_TOLERANCE, f"sequence {i} ({cached + 1} tokens): error {error}"


@pytest.mark.parametrize("block_size", [16, 5])
def test_torch_backend_sends_decode_rows_through_the_triton_kernel(block_size):
    """The CUDA torch backend's decode rows (its prefill rows need varlen_attn, CUDA only, and
    are checked in test_attention_cuda.py): against the float64 reference."""
    backend = TorchVarlenAttention("flash")
    backend.decode = PagedDecode(DEVICE)  # what "auto" and "triton" pick on CUDA
    step = make_step(DECODES_ONLY, 4, block_size, DECODE_DTYPE, 6).to(DEVICE)
    meta = backend.prepare(step.layout)
    assert meta.num_decodes == 4 and meta.cu_seqlens_q is None
    check_against_reference(step, DECODE_TOLERANCE, "decodes", backend)


def _rotary_case(heads, tokens, dtype, seed):
    """qkv of `tokens` tokens at scattered positions, cos/sin tables, caches of random
    contents and a slot per token in shuffled order."""
    num_heads, num_kv_heads, head_dim = heads
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    qkv = torch.randn(tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=g,
                      device=DEVICE).to(dtype)
    angles = torch.rand(4096, head_dim // 2, generator=g, device=DEVICE) * 100
    positions = torch.randint(0, 4096, (tokens,), generator=g, device=DEVICE)
    caches = [torch.randn(64, 16, num_kv_heads, head_dim, generator=g, device=DEVICE).to(dtype)
              for _ in range(2)]
    slots = torch.randperm(64 * 16, generator=g, device=DEVICE)[:tokens]
    return qkv, positions, angles.cos(), angles.sin(), caches, slots


@pytest.mark.parametrize("heads", ROTARY_HEADS, ids=_ids(ROTARY_HEADS))
@pytest.mark.parametrize("tokens", ROTARY_TOKENS)
@pytest.mark.parametrize("dtype", ROTARY_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_fused_rotary_writes_what_rotary_then_index_copy_write(heads, tokens, dtype):
    """The Triton kernel of --fused-rotary against the separate stages it replaces (eager
    ops.rotary, then write_kv): v bit-exact, q and k within one rounding of the dtype (the
    kernel may fuse a multiply-add that eager rounds twice), every other slot untouched."""
    from shard.models.ops import rotary, rotary_then_write

    num_heads, num_kv_heads, head_dim = heads
    qkv, positions, cos, sin, caches, slots = _rotary_case(heads, tokens, dtype, seed=tokens)
    expected = [c.clone() for c in caches]
    expected_q = rotary_then_write(rotary)(qkv, positions, cos, sin, *expected, slots, *heads)
    # Into a buffer with rows to spare, as the piecewise graphs give it: only its rows change.
    buffer = torch.full((tokens + 2, num_heads, head_dim), 5.0, dtype=dtype, device=DEVICE)
    q = rotary_into_cache(qkv, positions, cos, sin, *caches, slots, *heads, out=buffer[:tokens])
    assert q.shape == (tokens, num_heads, head_dim) and q.data_ptr() == buffer.data_ptr()
    assert torch.equal(buffer[tokens:], torch.full_like(buffer[tokens:], 5.0))
    fresh = rotary_into_cache(qkv, positions, cos, sin, *[c.clone() for c in caches], slots,
                              *heads)
    assert torch.equal(fresh, q)
    # One rounding of a value, or of a product near a cancellation (values here are ~1-4).
    ulp = torch.finfo(dtype).eps
    torch.testing.assert_close(q, expected_q, rtol=ulp, atol=4 * ulp)
    torch.testing.assert_close(caches[0], expected[0], rtol=ulp, atol=4 * ulp)
    assert torch.equal(caches[1], expected[1])
    # Untouched slots bit-exact: only the step's slots may differ at all.
    others = torch.ones(64 * 16, dtype=torch.bool, device=DEVICE)
    others[slots] = False
    assert torch.equal(caches[0].view(-1, num_kv_heads, head_dim)[others],
                       expected[0].view(-1, num_kv_heads, head_dim)[others])
    # And against the float64 rotation itself.
    half = head_dim // 2
    x = qkv.double()[:, :num_heads * head_dim].view(tokens, num_heads, head_dim)
    c, s = cos.double()[positions][:, None], sin.double()[positions][:, None]
    exact = torch.cat((x[..., :half] * c - x[..., half:] * s,
                       x[..., half:] * c + x[..., :half] * s), dim=-1)
    assert relative_error(q, exact.cpu()) < 4 * ulp
