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


def test_products_of_112_to_128_rows_take_the_narrow_tiles(monkeypatch):
    """Every projection of a model built with the narrow-tile product calls it; those of
    112-128 rows (and not too wide) run in quack's tiles, the rest on cuBLAS, and the logits are
    those of plain F.linear."""
    config = tiny_config(num_layers=2, max_position_embeddings=512)
    taken = []

    def narrow_tiles(x, weight, gemm_config):  # quack's product in plain PyTorch
        taken.append((x.shape[0], weight.shape[0], gemm_config))
        return F.linear(x, weight)

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
    assert plain.layers[0].self_attn.ops.linear is F.linear
    assert narrow.layers[0].mlp.down_proj.product is decode_gemm.linear
    for rows in (17, 111, 112, 120, 128, 129):
        taken.clear()
        prompt = torch.randint(3, 64, (rows,), generator=torch.Generator().manual_seed(rows))
        got = paged_logits(narrow, prompt, [], block_size=16, max_prefill_tokens=rows)
        want = paged_logits(plain, prompt, [], block_size=16, max_prefill_tokens=rows)
        assert torch.equal(got, want), rows
        if rows in (112, 120, 128):  # per layer: QKV (16+8+8), O (32), gate/up (96), down (32)
            assert taken == [(rows, n, ("config", n, 132)) for n in (64, 32, 96, 32)] * 2
        else:
            assert taken == []
    assert (decode_gemm.MIN_ROWS, decode_gemm.MAX_ROWS) == (112, 128)


def test_a_bias_or_a_batched_input_stays_on_f_linear(monkeypatch):
    monkeypatch.setattr(decode_gemm, "sm_count", lambda device: 132)
    monkeypatch.setattr(decode_gemm, "narrow_tiles", lambda *args: pytest.fail("narrow tiles"))
    x, w, b = torch.randn(128, 16), torch.randn(64, 16), torch.randn(64)
    assert torch.equal(decode_gemm.linear(x, w, b), F.linear(x, w, b))
    assert torch.equal(decode_gemm.linear(x[None], w), F.linear(x[None], w))
