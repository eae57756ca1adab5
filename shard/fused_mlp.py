"""The MLP's gate/up product with SiLU(gate) × up in its epilogue (`--fused-mlp`).

Unfused, a prompt step writes the [T, 2 × intermediate] product of gate/up, then reads it back
to write SiLU(gate) × up [T, intermediate]: on the 8B model at 16,384 tokens that is 2.8 GB of
traffic per layer beside the products. quack's Hopper GEMM (quack-kernels, installed with
FlashAttention-4) applies the gate in the epilogue, from the float32 accumulator, and writes
only the gated half.

Two configurations of the product, by the step's row count (`fuses`):
- from MIN_TOKENS rows (prompt steps), quack's default: tiles of 128 x 192 in clusters of two
  along the rows;
- from MIN_ROWS (decode batches, small prompt steps), a configuration sized to the GPU: with
  128 rows or fewer, the default's cluster leaves half its CTAs without rows (8B shapes on the
  H200 at 128 rows: 109 µs per layer against cuBLAS's 73), so clusters of one, and the tile
  width whose tile count fills the SMs in whole waves (`sized_config`): 62 µs. Past 128 rows
  only in whole 128-row tiles: with a partly filled last tile it measured slower than cuBLAS
  (8B at 136 rows: 131 µs against 70; at 256: 97 against 108).
Elsewhere cuBLAS's product and a separate SiLU × up. Measured on the H200 with
`benchmarks/fused_mlp.py --configs`.
"""

from __future__ import annotations

import functools
import math

import torch

# Steps with fewer rows take cuBLAS and the compiled SiLU × up (the measured crossover).
MIN_ROWS = 96
# From here on, quack's default configuration, and any row count.
MIN_TOKENS = 1024
TILE_ROWS = 128  # the sized configuration's tile height
# Tile widths over the [gate; up] output features that quack's Hopper GEMM takes with a gated
# epilogue (multiples of 32); up to 192 as ping-pong warp groups, wider ones cooperative.
TILE_WIDTHS = (128, 160, 192, 224, 256)
PINGPONG_MAX_WIDTH = 192


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


def fuses(rows: int) -> bool:
    """Whether a step of `rows` rows takes the fused product (the module's docstring says why
    these)."""
    return rows >= MIN_TOKENS or (rows >= MIN_ROWS
                                  and (rows <= TILE_ROWS or rows % TILE_ROWS == 0))


def tile_width(out_features: int, sms: int) -> int:
    """The tile width whose count of 128-row tiles fills `sms` SMs best in whole waves (the
    widest among equals): 224 for Llama-3.1-8B's 28,672 gate/up features on 132 SMs (128
    tiles, one wave), 128 for Llama-3.2-1B's 16,384."""
    def filled(width: int) -> float:
        tiles = math.ceil(out_features / width)
        return tiles / (math.ceil(tiles / sms) * sms)
    return max(TILE_WIDTHS, key=lambda width: (filled(width), width))


@functools.cache
def sized_config(out_features: int, sms: int):
    """quack's configuration for MIN_ROWS..MIN_TOKENS rows: 128-row tiles of tile_width's
    width, one CTA per cluster (a cluster of two along the rows idles one at <= 128 rows)."""
    from quack.gemm_config import GemmConfig

    width = tile_width(out_features, sms)
    return GemmConfig(tile_m=TILE_ROWS, tile_n=width, pingpong=width <= PINGPONG_MAX_WIDTH,
                      cluster_m=1, cluster_n=1, is_dynamic_persistent=False)


def swiglu_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """SiLU(x W_gate^T) × (x W_up^T) for weight = [W_gate; W_up] ([2 I, H], as gate_up_proj
    stores it): [T, I]."""
    from quack.gemm_interface import gemm_act

    config = None  # quack's default
    if x.shape[0] < MIN_TOKENS:
        config = sized_config(weight.shape[0], sm_count(weight.device))
    # concat_layout: the weight's output features are [gate; up] halves, not interleaved pairs.
    # tuned=False: a fixed configuration, compiled once for any row count; autotuning would
    # time configurations again for every new row count, in the middle of serving.
    return gemm_act(x, weight.t(), activation="swiglu", concat_layout=("B",),
                    store_preact=False, tuned=False, config=config)[1]


def warm_up(weight: torch.Tensor) -> None:
    """Compile both configurations for this weight's shape (seconds each: not mid-serving)."""
    for rows in (MIN_ROWS, MIN_TOKENS):
        swiglu_linear(weight.new_zeros(rows, weight.shape[1]), weight)


@functools.cache
def sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count
