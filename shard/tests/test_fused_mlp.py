"""--fused-mlp's choices that need no GPU: the tile width sized to the SMs, which steps take the
fused product, and how the MLP uses it. The product itself is tested against float64 on the GPU
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


def test_fused_steps_are_decode_batches_up_to_one_tile_whole_tiles_and_prompt_steps():
    """The rule, whatever its measured thresholds: below MIN_ROWS cuBLAS; up to one tile of
    TILE_ROWS, every row count; past it, whole tiles only (a partly filled last tile measured
    slower than cuBLAS); from MIN_TOKENS, every row count."""
    low, tile, prompt = fused_mlp.MIN_ROWS, fused_mlp.TILE_ROWS, fused_mlp.MIN_TOKENS
    fused = [rows for rows in range(1, prompt + 3 * tile) if fused_mlp.fuses(rows)]
    whole_tiles = list(range(2 * tile, prompt, tile))
    assert fused == (list(range(low, tile + 1)) + whole_tiles
                     + list(range(prompt, prompt + 3 * tile)))


def _mlps(swiglu_linear) -> tuple[LlamaMLP, LlamaMLP]:
    """(the separate MLP, the same weights with `swiglu_linear` as the fused product)."""
    config = tiny_config()
    torch.manual_seed(0)
    separate = LlamaMLP(config, TensorParallel(), Ops.build(compiled=False))
    torch.nn.init.normal_(separate.gate_up_proj.weight)
    torch.nn.init.normal_(separate.down_proj.weight)
    fused = LlamaMLP(config, TensorParallel(),
                     dataclasses.replace(separate.ops, swiglu_linear=swiglu_linear))
    fused.load_state_dict(separate.state_dict())
    return separate, fused


def test_a_fused_step_sends_the_gated_product_of_gate_up_to_down_and_others_stay_separate():
    """In a step that fuses, the MLP calls the fused product once with the step's rows and the
    gate/up weight ([gate; up], as swiglu_linear's contract says), and down reads exactly what it
    returned; any other step never calls it and is the separate MLP, bit for bit."""
    calls, returned = [], []

    def swiglu_linear(x, weight):  # the contract, in float64 from the two halves named apart
        calls.append((x, weight))
        gate, up = weight.double().chunk(2, dim=0)
        out = (F.silu(x.double() @ gate.T) * (x.double() @ up.T)).to(x.dtype)
        returned.append(out)
        return out

    separate, fused = _mlps(swiglu_linear)
    assert fused.fuses_gate and not separate.fuses_gate
    down_inputs = []
    fused.down_proj.register_forward_pre_hook(lambda module, args: down_inputs.append(args[0]))
    tile = fused_mlp.TILE_ROWS
    for rows in (fused_mlp.MIN_ROWS - 1, fused_mlp.MIN_ROWS, tile, tile + 1, 2 * tile,
                 fused_mlp.MIN_TOKENS + 7):
        calls.clear(), returned.clear(), down_inputs.clear()
        x = torch.randn(rows, 32)
        got, want = fused(x), separate(x)
        if fused_mlp.fuses(rows):
            [(x_in, weight)] = calls
            assert x_in is x and weight is fused.gate_up_proj.weight, rows
            assert down_inputs[0] is returned[0], rows
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        else:
            assert calls == [], rows
            assert torch.equal(got, want), rows
