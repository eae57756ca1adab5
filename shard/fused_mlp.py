"""The MLP's gate/up product with SiLU(gate) × up in its epilogue (`--fused-mlp`).

Unfused, a prompt step writes the [T, 2 × intermediate] product of gate/up, then reads it back
to write SiLU(gate) × up [T, intermediate]: on the 8B model at 16,384 tokens that is 2.8 GB of
traffic per layer beside the products. quack's Hopper GEMM (quack-kernels, installed with
FlashAttention-4) applies the gate in the epilogue, from the float32 accumulator, and writes
only the gated half.

Only for steps of at least MIN_TOKENS rows: at decode batches cuBLAS's product is faster
(H200, 8B shapes, 128 rows: 147 µs per layer's MLP against 110). Measured in
docs/benchmarks.md (`benchmarks/fused_mlp.py`).
"""

from __future__ import annotations

import torch

# Steps with fewer rows take cuBLAS and the compiled SiLU × up (the measured crossover).
MIN_TOKENS = 1024


def unavailable(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the fused gate/up cannot run here, or None when it can."""
    if device.type != "cuda":
        return "the fused MLP is a CUDA kernel (quack's Hopper GEMM)"
    if torch.cuda.get_device_capability(device)[0] < 9:
        return "quack's GEMM needs compute capability 9.0+"
    if dtype not in (torch.bfloat16, torch.float16):
        return f"quack's GEMM takes bfloat16 or float16, not {dtype}"
    try:
        from quack.gemm_interface import gemm_act  # noqa: F401
        # The epilogue library fingerprints the code its epilogues call when imported, and
        # fails there (TypeError) where the CUTLASS DSL is not under a site-packages folder
        # (e.g. pip install --target elsewhere): found now, not in the first large step.
        import quack.epilogue.library  # noqa: F401
    except Exception as exc:  # not installed, or a CUTLASS DSL it cannot load
        return f"quack (pip install quack-kernels, with flash-attn-4) is not importable: {exc}"
    return None


def swiglu_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """SiLU(x W_gate^T) × (x W_up^T) for weight = [W_gate; W_up] ([2 I, H], as gate_up_proj
    stores it): [T, I]."""
    from quack.gemm_interface import gemm_act

    # concat_layout: the weight's output features are [gate; up] halves, not interleaved pairs.
    # tuned=False: quack's default configuration, compiled once for any row count; autotuning
    # would time configurations again for every new row count, in the middle of serving.
    return gemm_act(x, weight.t(), activation="swiglu", concat_layout=("B",),
                    store_preact=False, tuned=False)[1]
