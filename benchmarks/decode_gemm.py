"""The linear layers of a decode step alone: each projection of a model config at the batch
sizes a decode step has, timed in a CUDA graph, with the weight bytes it reads over that time.

A decode step is memory-bound: at batch m its linear layers must read every weight once, so the
sum over a layer's projections against the measured copy bandwidth is the floor this prints
beside it. At prefill sizes (m in the thousands) the same products are compute-bound, and the
TFLOP/s it prints is what to hold against the measured matrix rate. Variants: torch's default
BLAS (cuBLAS), cuBLASLt (`torch.backends.cuda.preferred_blas_library`), and `inductor`: the
product compiled by torch.compile with max-autotune, which times Triton's GEMM templates against
cuBLAS for each shape and keeps the fastest (its table goes to stderr).

    python benchmarks/decode_gemm.py --config benchmarks/configs/llama-3.1-8b --batches 1,64,128
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F

from elementwise import timed_us
from offline import measure_ceilings


def projections(config: dict) -> dict[str, tuple[int, int, int]]:
    """name -> (in features, out features, how many per model)."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    layers = config["num_hidden_layers"]
    return {"qkv": (hidden, (heads + 2 * kv_heads) * head_dim, layers),
            "o": (heads * head_dim, hidden, layers),
            "gate_up": (hidden, 2 * inter, layers),
            "down": (inter, hidden, layers),
            "lm_head": (hidden, config["vocab_size"], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="benchmarks/configs/llama-3.1-8b")
    parser.add_argument("--batches", default="1,64,128,256")
    parser.add_argument("--blas", default="cublas,cublaslt")
    args = parser.parse_args()

    with open(os.path.join(args.config, "config.json")) as f:
        shapes = projections(json.load(f))
    dev = torch.device("cuda")
    # The copy bandwidth exactly as benchmarks/offline.py measures it for its floors.
    copy_bw = measure_ceilings(dev, torch.bfloat16).copy_bytes_per_s / 1e9
    print(f"{args.config}: copy bandwidth {copy_bw:.0f} GB/s (read + write)")
    weights = {name: torch.randn(n_out, n_in, dtype=torch.bfloat16, device=dev) * 0.02
               for name, (n_in, n_out, _) in shapes.items()}
    torch._dynamo.config.cache_size_limit = 64  # one compiled product per shape
    autotuned = torch.compile(F.linear, mode="max-autotune-no-cudagraphs", dynamic=False)
    for blas in args.blas.split(","):
        torch.backends.cuda.preferred_blas_library("cublas" if blas == "inductor" else blas)
        linear = autotuned if blas == "inductor" else F.linear
        for m in (int(b) for b in args.batches.split(",")):
            total_us = total_bytes = total_flops = 0.0
            parts = []
            for name, (n_in, n_out, count) in shapes.items():
                x = torch.randn(m, n_in, dtype=torch.bfloat16, device=dev)
                w = weights[name]
                us = timed_us(lambda: linear(x, w), calls=20, replays=10)
                nbytes = w.numel() * 2 + m * (n_in + n_out) * 2
                total_us += us * count
                total_bytes += nbytes * count
                flops = 2 * m * n_in * n_out
                total_flops += flops * count
                parts.append(f"{name} {us:6.1f} µs ({nbytes / us / 1e3:4.0f} GB/s, "
                             f"{flops / us / 1e6:3.0f} TFLOP/s)")
            print(f"  {blas:9s} m={m:4d}: {total_us / 1e3:6.2f} ms per step, "
                  f"{total_bytes / total_us / 1e3:5.0f} GB/s, {total_flops / total_us / 1e6:3.0f} "
                  f"TFLOP/s, floor "
                  f"{total_bytes / copy_bw / 1e6:5.2f} ms | " + "; ".join(parts))
    torch.backends.cuda.preferred_blas_library("cublas")


if __name__ == "__main__":
    main()
