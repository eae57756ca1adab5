"""The CUDA attention backends against the float64 reference, on the GPU.

Collected only where a CUDA GPU is present (the lent H100; never CI, which has no GPU, so
nothing here is skipped there): each backend that can run on this GPU gets every case.
"""

from __future__ import annotations

import functools

import pytest
import torch

from shard.attention import FlashAttention, TorchVarlenAttention, flash_unavailable, write_kv
from shard.tests.test_attention import (BATCHES, MIXED, attention_layer,
                                        check_against_reference, make_step, RaggedStep,
                                        random_batch, reference, relative_error, run_backend)

CUDA = torch.device("cuda")


def _backends() -> list:
    if not torch.cuda.is_available():
        return []
    # torch: decode rows through our Triton kernel, or through varlen_attn with the rest.
    found = [pytest.param(functools.partial(TorchVarlenAttention, "triton"), id="torch"),
             pytest.param(functools.partial(TorchVarlenAttention, "flash"), id="torch-varlen")]
    if flash_unavailable(CUDA) is None:  # decode rows through our Triton kernel, or FA4
        found.append(pytest.param(functools.partial(FlashAttention, "triton"), id="flash"))
        found.append(pytest.param(functools.partial(FlashAttention, "flash"), id="flash-fa4"))
    return found


BACKENDS = _backends()
# Llama-3-8B's (32, 8, 128) and SmolLM2's (9, 3, 64) head shapes.
HEADS = [pytest.param((32, 8, 128), id="h32-kv8-d128"), pytest.param((9, 3, 64), id="h9-kv3-d64")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("block_size", [16, 128])
@pytest.mark.parametrize("batch", list(BATCHES))
def test_cuda_paged_attention_matches_float64_reference(backend, heads, block_size, batch):
    for seed in range(2):
        sequences, num_decodes = BATCHES[batch]
        step = make_step(sequences, num_decodes, block_size, torch.bfloat16, seed,
                         heads=heads).to(CUDA)
        check_against_reference(step, 1e-2, f"seed {seed}", backend())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block_size", [16, 64])
def test_cuda_paged_attention_matches_float64_reference_on_random_ragged_batches(backend,
                                                                                 block_size):
    for seed in range(6):
        sequences, num_decodes = random_batch(seed)
        step = make_step(sequences, num_decodes, block_size, torch.bfloat16, seed,
                         heads=(32, 8, 128)).to(CUDA)
        check_against_reference(step, 1e-2, f"batch {sequences}", backend())


@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_new_keys_and_values_land_exactly_in_their_slots(backend):
    step = make_step(MIXED, 4, 16, torch.bfloat16, seed=3, heads=(32, 8, 128)).to(CUDA)
    _, k_cache, v_cache = run_backend(step, backend())
    expected_k, expected_v = step.k_cache.clone(), step.v_cache.clone()
    expected_k.view(-1, 8, 128)[step.layout.slot_mapping] = step.k
    expected_v.view(-1, 8, 128)[step.layout.slot_mapping] = step.v
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)


@pytest.mark.parametrize("decode", ["triton", "flash"])
@pytest.mark.parametrize("batch", list(BATCHES))
def test_flash_layers_after_the_first_replay_its_launch_with_their_own_tensors(batch, decode):
    """One step's metadata serves every layer: the first goes through FA4's interface, the
    others relaunch the kernel it chose. Each layer (its own q, K/V and cache) must get exactly
    what the interface gives it, and match the float64 reference. With the Triton decode
    kernel, FA4 sees only the prefill rows, and a decode-only step launches no FA4 at all."""
    if flash_unavailable(CUDA):
        pytest.fail(f"flash backend expected on this GPU: {flash_unavailable(CUDA)}")
    sequences, num_decodes = BATCHES[batch]
    backend = FlashAttention(decode)
    fa4_rows = decode == "flash" or num_decodes < len(sequences)
    base, *others = [make_step(sequences, num_decodes, 16, torch.bfloat16, seed,
                               heads=(32, 8, 128)).to(CUDA) for seed in range(3)]
    # Every layer: the base step's sequences and block tables, its own tensors.
    layers = [base] + [RaggedStep(base.layout, o.q, o.k, o.v, o.k_cache, o.v_cache,
                                  base.cached_lens, base.query_lens, base.tables) for o in others]
    meta = backend.prepare(base.layout)
    for i, step in enumerate(layers):
        k_cache, v_cache = step.k_cache.clone(), step.v_cache.clone()
        out = attention_layer(backend, step, k_cache, v_cache, meta)
        assert (meta.launch is not None) == (backend.replay and fa4_rows), \
            "the first layer recorded its launch"
        alone = run_backend(step, FlashAttention(decode))[0]  # fresh metadata: the interface
        assert torch.equal(out, alone), f"layer {i}"
        error = relative_error(out, reference(step))
        assert error < 1e-2, f"layer {i}: relative error {error}"
    assert backend.replay, "the recorded launch had the expected arguments"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("block_size", [16, 128])
def test_cuda_decode_batch_filling_the_gpu_matches_float64_reference(backend, heads,
                                                                     block_size):
    """48 decodes, more (sequence, KV head) tiles than the GPU has SMs, through the flash
    backend's 64-row decode tile."""
    gen = torch.Generator().manual_seed(7)
    sequences = [(int(c), 1) for c in torch.randint(0, 300, (48,), generator=gen)]
    step = make_step(sequences, 48, block_size, torch.bfloat16, 7, heads=heads).to(CUDA)
    check_against_reference(step, 1e-2, "48 decodes", backend())


@pytest.mark.parametrize("heads", HEADS + [pytest.param((12, 4, 96), id="h12-kv4-d96"),
                                           pytest.param((8, 1, 64), id="h8-kv1-d64"),
                                           pytest.param((4, 4, 128), id="h4-kv4-d128")])
@pytest.mark.parametrize("block_size", [16, 5])
@pytest.mark.parametrize("splits", [1, 2, 8, 32])
def test_triton_decode_kernel_matches_float64_reference_at_every_split(heads, block_size,
                                                                       splits):
    """The kernel alone, over contexts of 1 to 700 tokens (some shorter than a split's share,
    leaving splits empty), any head dim and GQA group, pages of any size."""
    from shard.paged_decode import PagedDecode

    gen = torch.Generator().manual_seed(11)
    sequences = [(int(c), 1) for c in torch.randint(0, 700, (13,), generator=gen)]
    sequences += [(0, 1), (63, 1), (64, 1), (127, 1)]
    step = make_step(sequences, len(sequences), block_size, torch.bfloat16, 11,
                     heads=heads).to(CUDA)
    k_cache, v_cache = step.k_cache.clone(), step.v_cache.clone()
    write_kv(k_cache, v_cache, step.layout.slot_mapping, step.k, step.v)
    out = torch.full_like(step.q, float("nan"))
    PagedDecode(CUDA)(step.q, k_cache, v_cache, step.layout.block_table, step.layout.seqused_k,
                      out, num_splits=splits)
    ref = reference(step)
    for i, (cached, _) in enumerate(sequences):
        error = relative_error(out[i], ref[i])
        assert error < 1e-2, f"sequence {i} ({cached + 1} tokens): relative error {error}"


def test_triton_decode_splits_fill_the_gpu_from_the_batch_alone():
    from shard.paged_decode import PagedDecode

    kernel = PagedDecode(CUDA)
    sms = torch.cuda.get_device_properties(CUDA).multi_processor_count
    for batch in (1, 2, 3, 8, 16, 64, 256):
        splits = kernel.splits_for(batch, 8)
        assert splits & (splits - 1) == 0 and 1 <= splits <= 32
        assert batch * 8 * splits >= sms or splits == 32, batch
        assert splits == 1 or batch * 8 * splits // 2 < sms, batch


def _rotary_case(heads, tokens, dtype, seed):
    """qkv of `tokens` tokens at scattered positions, cos/sin tables, caches of random
    contents and a slot per token in shuffled order."""
    num_heads, num_kv_heads, head_dim = heads
    g = torch.Generator(device=CUDA).manual_seed(seed)
    qkv = torch.randn(tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=g,
                      device=CUDA).to(dtype)
    angles = torch.rand(4096, head_dim // 2, generator=g, device=CUDA) * 100
    positions = torch.randint(0, 4096, (tokens,), generator=g, device=CUDA)
    caches = [torch.randn(64, 16, num_kv_heads, head_dim, generator=g, device=CUDA).to(dtype)
              for _ in range(2)]
    slots = torch.randperm(64 * 16, generator=g, device=CUDA)[:tokens]
    return qkv, positions, angles.cos(), angles.sin(), caches, slots


@pytest.mark.parametrize("heads", HEADS + [pytest.param((14, 2, 80), id="h14-kv2-d80")])
@pytest.mark.parametrize("tokens", [1, 37, 300])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32],
                         ids=["bf16", "fp16", "fp32"])
def test_fused_rotary_writes_what_rotary_then_index_copy_write(heads, tokens, dtype):
    """The Triton kernel of --fused-rotary against the separate stages it replaces (eager
    ops.rotary, then write_kv): v bit-exact, q and k within one rounding of the dtype (the
    kernel may fuse a multiply-add that eager rounds twice), every other slot untouched."""
    from shard.models.ops import rotary, rotary_then_write
    from shard.rotary_cache import rotary_into_cache

    num_heads, num_kv_heads, head_dim = heads
    qkv, positions, cos, sin, caches, slots = _rotary_case(heads, tokens, dtype, seed=tokens)
    expected = [c.clone() for c in caches]
    expected_q = rotary_then_write(rotary)(qkv, positions, cos, sin, *expected, slots, *heads)
    # Into a buffer with rows to spare, as the piecewise graphs give it: only its rows change.
    buffer = torch.full((tokens + 2, num_heads, head_dim), 5.0, dtype=dtype, device=CUDA)
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
    others = torch.ones(64 * 16, dtype=torch.bool, device=CUDA)
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
