"""--decode-gemm's product (quack's GEMM in 64-row tiles, clusters of two) against float64.

Collected only where a CUDA GPU is present (see conftest.py); run on the lent GPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shard import decode_gemm

CUDA = torch.device("cuda")


# (input, output features): Llama-3.1-8B's QKV, O, down; Llama-3.2-1B's QKV, O, down; the tiny
# test model's QKV.
@pytest.mark.parametrize("features", [(4096, 6144), (4096, 4096), (14336, 4096), (2048, 3072),
                                      (2048, 2048), (8192, 2048), (256, 512)])
@pytest.mark.parametrize("rows", [112, 120, 128])
def test_narrow_tiles_match_a_float64_reference(features, rows):
    inputs, outputs = features
    assert decode_gemm.takes(rows, outputs, decode_gemm.sm_count(CUDA))
    gen = torch.Generator(device=CUDA).manual_seed(rows)
    x = torch.randn(rows, inputs, device=CUDA, generator=gen).to(torch.bfloat16)
    weight = (torch.randn(outputs, inputs, device=CUDA, generator=gen)
              / inputs ** 0.5).to(torch.bfloat16)
    got = decode_gemm.linear(x, weight)
    assert got.shape == (rows, outputs) and got.dtype == torch.bfloat16 and got.is_contiguous()
    expected = x.double() @ weight.double().t()
    error = ((got.double() - expected).norm() / expected.norm()).item()
    assert error < 1e-2, error  # one bfloat16 rounding of the output: ~2e-3


@pytest.mark.parametrize("rows", [1, 96, 111, 129, 4096])
def test_other_row_counts_are_cublas_bit_for_bit(rows):
    x = torch.randn(rows, 4096, device=CUDA, dtype=torch.bfloat16)
    weight = torch.randn(4096, 4096, device=CUDA, dtype=torch.bfloat16)
    assert torch.equal(decode_gemm.linear(x, weight), F.linear(x, weight))
