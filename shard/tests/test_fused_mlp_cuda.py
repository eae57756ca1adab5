"""--fused-mlp's product (quack's GEMM with SiLU(gate) × up in its epilogue) against float64.

Collected only where a CUDA GPU is present (see conftest.py); run on the lent GPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shard.fused_mlp import swiglu_linear, unavailable

CUDA = torch.device("cuda")


@pytest.mark.parametrize("hidden, intermediate", [(256, 512), (2048, 8192), (4096, 14336)])
@pytest.mark.parametrize("rows", [1, 7, 100, 1023, 1024, 4097])
def test_fused_gate_up_matches_a_float64_reference(hidden, intermediate, rows):
    assert unavailable(CUDA, torch.bfloat16) is None, unavailable(CUDA, torch.bfloat16)
    gen = torch.Generator(device=CUDA).manual_seed(rows)
    x = torch.randn(rows, hidden, device=CUDA, generator=gen).to(torch.bfloat16)
    # [gate; up] stacked on the output features, as gate_up_proj stores them; the scale of a
    # real checkpoint (1/sqrt(hidden)), so the gate's inputs span SiLU's bend.
    weight = (torch.randn(2 * intermediate, hidden, device=CUDA, generator=gen)
              / hidden ** 0.5).to(torch.bfloat16)
    got = swiglu_linear(x, weight)
    assert got.shape == (rows, intermediate) and got.dtype == torch.bfloat16
    products = x.double() @ weight.double().t()
    expected = F.silu(products[:, :intermediate]) * products[:, intermediate:]
    # One bfloat16 rounding of the output: relative error ~2e-3 (the unfused path rounds the
    # products too before SiLU, ~6e-3).
    error = ((got.double() - expected).norm() / expected.norm()).item()
    assert error < 1e-2, error


def test_fused_mlp_is_unavailable_for_float32_with_the_reason():
    assert unavailable(CUDA, torch.float32) == "quack's GEMM takes bfloat16 or float16, not " \
        "torch.float32"
