"""The CUDA attention backends against the float64 reference, on the GPU.

Collected only where a CUDA GPU is present (the lent H100; never CI, which has no GPU, so
nothing here is skipped there): each backend that can run on this GPU gets every case.
"""

from __future__ import annotations

import functools

import pytest
import torch

from shard.attention import FlashAttention, TorchVarlenAttention, flash_unavailable
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


def test_triton_decode_splits_fill_the_gpu_from_the_batch_alone():
    from shard.paged_decode import PagedDecode

    kernel = PagedDecode(CUDA)
    sms = torch.cuda.get_device_properties(CUDA).multi_processor_count
    for batch in (1, 2, 3, 8, 16, 64, 256):
        splits = kernel.splits_for(batch, 8)
        assert splits & (splits - 1) == 0 and 1 <= splits <= 32
        assert batch * 8 * splits >= sms or splits == 32, batch
        assert splits == 1 or batch * 8 * splits // 2 < sms, batch
