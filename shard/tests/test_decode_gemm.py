"""--decode-gemm's choices that need no GPU: the tile width sized to the SMs, and which products
take quack's narrow tiles. The product itself is tested against float64 on the GPU
(test_decode_gemm_cuda.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shard import decode_gemm
from shard.attention import TorchAttention
from shard.models.llama import LlamaForCausalLM
from shard.models.ops import Ops
from shard.parallel import TensorParallel
from shard.tests.test_llama_matches_transformers import paged_logits
from shard.tests.tiny_model import tiny_config


@pytest.mark.parametrize("features, sms, width", [
    (4096, 132, 64),     # Llama-3.1-8B's O and down on an H100 SXM or H200: 128 tiles
    (6144, 132, 96),     # its QKV: 128 tiles
    (2048, 132, 32),     # Llama-3.2-1B's O and down
    (3072, 132, 48),     # its QKV
    (4096, 114, 80),     # the 8B's O on an H100 PCIe: 104 tiles of 57 columns' pairs
    (576, 132, 32),      # SmolLM2-135M: never narrower than MIN_WIDTH
    (8448, 132, 128),    # the widest that fits one wave
    (8449, 132, None),   # wider: cuBLAS
    (28672, 132, None),  # the 8B's gate/up (--fused-mlp's)
])
def test_tile_width_fills_one_wave_with_two_rows_of_tiles(features, sms, width):
    assert decode_gemm.tile_width(features, sms) == width
    if width is not None:
        assert 2 * -(-features // width) <= sms


def test_narrow_tiles_take_products_of_min_to_max_rows_that_fit_one_wave():
    """The rule, whatever its measured bounds: MIN_ROWS..MAX_ROWS rows (the decode graphs that
    fill both row tiles of a cluster) and outputs narrow enough for one wave; else cuBLAS."""
    low, high = decode_gemm.MIN_ROWS, decode_gemm.MAX_ROWS
    taken = [rows for rows in range(1, 4 * high) if decode_gemm.takes(rows, 4096, 132)]
    assert taken == list(range(low, high + 1))
    assert not any(decode_gemm.takes(rows, 8449, 132) for rows in range(low, high + 1))


def test_in_range_products_return_what_the_narrow_tiles_compute(monkeypatch):
    monkeypatch.setattr(decode_gemm, "sm_count", lambda device: 132)
    monkeypatch.setattr(decode_gemm, "config", lambda features, sms: ("config", features, sms))
    product = torch.randn(decode_gemm.MAX_ROWS, 64)
    calls = []

    def narrow_tiles(x, weight, gemm_config):
        calls.append((x, weight, gemm_config))
        return product

    monkeypatch.setattr(decode_gemm, "narrow_tiles", narrow_tiles)
    x, w = torch.randn(decode_gemm.MAX_ROWS, 16), torch.randn(64, 16)
    assert decode_gemm.linear(x, w) is product
    [(x_in, w_in, gemm_config)] = calls
    assert x_in is x and w_in is w and gemm_config == ("config", 64, 132)


def test_every_projection_of_a_decode_sized_step_runs_in_narrow_tiles(monkeypatch):
    """A model built with the narrow-tile product sends every product of a step of
    MIN_ROWS..MAX_ROWS rows through quack's tiles, each with its own layer's weight, and steps
    of other row counts to cuBLAS untouched; with the product computed to its contract (x W^T,
    here in float64) the logits are the plain model's."""
    config = tiny_config(num_layers=2, max_position_embeddings=512)
    taken = []

    def narrow_tiles(x, weight, gemm_config):  # x W^T, in float64: not F.linear's arithmetic
        taken.append((x.shape[0], weight, gemm_config))
        return (x.double() @ weight.double().T).to(x.dtype)

    monkeypatch.setattr(decode_gemm, "sm_count", lambda device: 132)
    monkeypatch.setattr(decode_gemm, "narrow_tiles", narrow_tiles)
    monkeypatch.setattr(decode_gemm, "config", lambda features, sms: ("config", features, sms))
    torch.manual_seed(0)
    plain = LlamaForCausalLM(config, TensorParallel(), TorchAttention(),
                             Ops.build(compiled=False))
    for p in plain.parameters():
        torch.nn.init.normal_(p, std=0.2)
    narrow = LlamaForCausalLM(config, TensorParallel(), TorchAttention(),
                              Ops.build(compiled=False, decode_gemm=True))
    narrow.load_state_dict(plain.state_dict())
    # The tiny model's products all fit one wave: QKV (64 outputs), O (32), gate/up (96, through
    # the same product while --fused-mlp is off) and down (32).
    weights = [w for layer in narrow.layers for w in (
        layer.self_attn.qkv_proj.weight, layer.self_attn.o_proj.weight,
        layer.mlp.gate_up_proj.weight, layer.mlp.down_proj.weight)]
    low, high = decode_gemm.MIN_ROWS, decode_gemm.MAX_ROWS
    for rows in (17, low - 1, low, (low + high) // 2, high, high + 1):
        taken.clear()
        prompt = torch.randint(3, 64, (rows,), generator=torch.Generator().manual_seed(rows))
        got = paged_logits(narrow, prompt, [], block_size=16, max_prefill_tokens=rows)
        want = paged_logits(plain, prompt, [], block_size=16, max_prefill_tokens=rows)
        if low <= rows <= high:
            assert [n for n, _, _ in taken] == [rows] * len(weights), rows
            assert all(w_in is w for (_, w_in, _), w in zip(taken, weights)), rows
            assert [c for _, _, c in taken] == [("config", w.shape[0], 132) for w in weights]
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        else:
            assert taken == [], rows
            assert torch.equal(got, want), rows


def test_a_bias_a_batched_input_or_outputs_past_one_wave_stay_on_f_linear(monkeypatch):
    monkeypatch.setattr(decode_gemm, "sm_count", lambda device: 132)
    monkeypatch.setattr(decode_gemm, "config", lambda features, sms: None)
    monkeypatch.setattr(decode_gemm, "narrow_tiles", lambda *args: pytest.fail("narrow tiles"))
    x, w, b = torch.randn(128, 16), torch.randn(64, 16), torch.randn(64)
    assert torch.equal(decode_gemm.linear(x, w, b), F.linear(x, w, b))
    assert torch.equal(decode_gemm.linear(x[None], w), F.linear(x[None], w))
    wide = torch.randn(8449, 16)  # two rows of tiles of MAX_WIDTH would not fit one wave
    assert torch.equal(decode_gemm.linear(x, wide), F.linear(x, wide))
