"""Decode batches' QKV, O and down products through quack's GEMM in narrow tiles (`--decode-gemm`).

At a decode batch of ~128 rows these products only stream their weights, and what they reach
depends on how many SMs share the stream. cuBLAS's choices on the H200 for Llama-3.1-8B at 128
rows left it short: QKV 16.3 µs, O 13.4 µs, down 36.5 µs per layer (2.3-2.8 TB/s on QKV and O,
and split-K plus a reduction for down). quack's Hopper GEMM pinned to tiles of 64 rows in
clusters of two along the rows (the two row tiles share one load of each weight tile, multicast)
and the narrowest width whose two rows of tiles still fit in one wave of the SMs (`tile_width`:
64 for 4,096 output features on 132 SMs, 128 tiles) took 15.8, 11.5 and 33.4 µs: a whole step's
products 4.22 -> 4.02 ms on the 8B, 0.81 -> 0.74 ms on the 1B (benchmarks/decode_gemm.py
--chain --quack-configs, H200).

Only where measured to pay (`takes`): 112-128 rows (the decode graphs of 97-128 sequences pad to
those). At 96 rows the second row tile is half empty and the same configuration lost to cuBLAS
(8B down 44.2 µs against 36.4), as the fused gate/up's partly filled tiles did; and outputs too
wide for one wave of tiles of MAX_WIDTH (the gate/up, which --fused-mlp covers) stay on cuBLAS.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from shard.fused_mlp import sm_count

MIN_ROWS = 112
MAX_ROWS = 128
TILE_ROWS = 64
CLUSTER_ROWS = 2  # row tiles per cluster: MAX_ROWS / TILE_ROWS, so no CTA of a cluster idles
# Tile widths: multiples of 16 in this range (measured: 32, 48, 64 and 96 paid; a width that
# made two waves, e.g. 32 for the 8B's down, lost to cuBLAS: 47.8 µs against 36.5).
MIN_WIDTH, MAX_WIDTH, WIDTH_STEP = 32, 128, 16


def tile_width(out_features: int, sms: int) -> int | None:
    """The narrowest width whose CLUSTER_ROWS rows of tiles fit in one wave of `sms` SMs:
    64 for 4,096 output features on 132 SMs, 96 for 6,144 (the 8B's O, down; QKV), 32 and 48
    for the 1B's 2,048 and 3,072. None where that is wider than MAX_WIDTH (cuBLAS then)."""
    width = max(MIN_WIDTH, math.ceil(out_features / (sms // CLUSTER_ROWS) / WIDTH_STEP)
                * WIDTH_STEP)
    return width if width <= MAX_WIDTH else None


def takes(rows: int, out_features: int, sms: int) -> bool:
    """Whether a product of `rows` rows and `out_features` outputs runs here, not on cuBLAS."""
    return MIN_ROWS <= rows <= MAX_ROWS and tile_width(out_features, sms) is not None


@functools.cache
def config(out_features: int, sms: int):
    from quack.gemm_config import GemmConfig

    return GemmConfig(tile_m=TILE_ROWS, tile_n=tile_width(out_features, sms), pingpong=True,
                      cluster_m=CLUSTER_ROWS, cluster_n=1, is_dynamic_persistent=False)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
           ) -> torch.Tensor:
    """F.linear(x, weight, bias), through quack's narrow tiles where `takes` says so."""
    if bias is not None or x.dim() != 2:
        return F.linear(x, weight, bias)
    sms = sm_count(weight.device)
    if not takes(x.shape[0], weight.shape[0], sms):
        return F.linear(x, weight)
    return narrow_tiles(x, weight, config(weight.shape[0], sms))


def narrow_tiles(x: torch.Tensor, weight: torch.Tensor, gemm_config) -> torch.Tensor:
    """x W^T by quack's GEMM in `gemm_config`."""
    from quack.gemm_interface import gemm_act

    # tuned=False: the pinned configuration, compiled once per shape for any row count.
    return gemm_act(x, weight.t(), activation=None, store_preact=False, tuned=False,
                    config=gemm_config)[1]


def warm_up(weights: list[torch.Tensor]) -> None:
    """Compile the product for each weight shape that takes it (seconds each: not mid-serving)."""
    for weight in weights:
        linear(weight.new_zeros(MIN_ROWS, weight.shape[1]), weight)
