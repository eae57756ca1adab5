"""--fused-mlp's choices that need no GPU: the tile width sized to the SMs, and which steps take
the fused product. The product itself is tested against float64 on the GPU
(test_fused_mlp_cuda.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from shard import fused_mlp
from shard.models.llama import LlamaMLP
from shard.models.ops import Ops
from shard.parallel import TensorParallel
from shard.tests.tiny_model import tiny_config


@pytest.mark.parametrize("features, sms, width", [
    (28672, 132, 224),  # Llama-3.1-8B's gate/up on an H100 SXM or H200: 128 tiles, one wave
    (16384, 132, 128),  # Llama-3.2-1B: 128 tiles
    (57344, 132, 224),  # Llama-3.1-70B: 256 tiles, two waves
    (28672, 114, 256),  # 8B on an H100 PCIe: 112 tiles (as full as 224 tiles of 128, wider)
    (3072, 132, 128),   # SmolLM2-135M: fewer tiles than SMs whatever the width, so the most
])
def test_tile_width_fills_the_sms_in_whole_waves(features, sms, width):
    assert fused_mlp.tile_width(features, sms) == width


def test_steps_from_min_rows_take_the_fused_product():
    config = tiny_config()
    rows_fused = []

    def swiglu_linear(x, weight):  # quack's product in plain PyTorch: the same arithmetic
        rows_fused.append(x.shape[0])
        gate, up = F.linear(x, weight).chunk(2, dim=-1)
        return F.silu(gate) * up

    separate = LlamaMLP(config, TensorParallel(), Ops.build(compiled=False))
    torch.nn.init.normal_(separate.gate_up_proj.weight)
    torch.nn.init.normal_(separate.down_proj.weight)
    fused = LlamaMLP(config, TensorParallel(),
                     dataclasses.replace(separate.ops, swiglu_linear=swiglu_linear))
    fused.load_state_dict(separate.state_dict())
    assert fused.fuses_gate and not separate.fuses_gate
    # Past 128 rows only whole tiles of 128 (a partly filled one is slower than cuBLAS), and
    # any row count from MIN_TOKENS (quack's default configuration).
    for rows in (1, 95, 96, 128, 129, 200, 256, 300, 896, 1000, 1024, 1031):
        x = torch.randn(rows, 32)
        assert torch.equal(fused(x), separate(x))
    assert (fused_mlp.MIN_ROWS, fused_mlp.TILE_ROWS, fused_mlp.MIN_TOKENS) == (96, 128, 1024)
    assert rows_fused == [96, 128, 256, 896, 1024, 1031]
