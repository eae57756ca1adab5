"""The linear layers of a decode step alone: each projection of a model config at the batch
sizes a decode step has, timed in a CUDA graph, with the weight bytes it reads over that time.

A decode step is memory-bound: at batch m its linear layers must read every weight once, so the
sum over a layer's projections against the measured copy bandwidth is the floor this prints
beside it. At prefill sizes (m in the thousands) the same products are compute-bound, and the
TFLOP/s it prints is what to hold against the measured matrix rate. Variants: torch's default
BLAS (cuBLAS), cuBLASLt (`torch.backends.cuda.preferred_blas_library`), and `inductor`: the
product compiled by torch.compile with max-autotune, which times Triton's GEMM templates against
cuBLAS for each shape and keeps the fastest (its table goes to stderr).

`--chain` times instead what a decode step really runs: every layer's products in order, each
layer with its own weights (so nothing stays in L2 between calls of one projection), with the
products named in `--split-k` (e.g. `o2,down2`) split along K: a batched product of the K
slices into float32 partials, then their sum (timed with and without it, since the sum can ride
in the elementwise stage that follows each product). With `--blas quack` (or `quack-parallel`)
the products are quack's Hopper GEMM (configuration from its own heuristic), and a split is
quack's in-kernel split-K (serial: the partials committed in order, or in arrival order).
`--quack-configs` times the chain with the named projections through quack's `gemm_act`
without an activation, pinned to a configuration (its `gemm` takes none), the rest cuBLAS:

    python benchmarks/decode_gemm.py --chain --batches 128 \
        --quack-configs "none;o=64x64p/1x1;down=64x64p/1x1,qkv=64x96p/1x1"

    python benchmarks/decode_gemm.py --config benchmarks/configs/llama-3.1-8b --batches 1,64,128
"""

from __future__ import annotations

import argparse
import json
import os
import re

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
    parser.add_argument("--chain", action="store_true",
                        help="time the step's products in order over every layer's weights")
    parser.add_argument("--split-k", default="",
                        help="with --chain: variants separated by ';', each a comma list of "
                             "projection + K slices, e.g. 'none;o2,down2' ('none' or '': no "
                             "product split)")
    parser.add_argument("--replays", type=int, default=5,
                        help="with --chain: graph replays timed (2 steps each); many replays "
                             "time the products under sustained load")
    parser.add_argument("--quack-configs", default="",
                        help="with --chain: variants separated by ';', each a comma list of "
                             "PROJECTION=CONFIG (fused_mlp.py's form, e.g. o=64x64p/1x1; "
                             "'none': all cuBLAS)")
    args = parser.parse_args()
    if args.chain and args.quack_configs:
        pinned_chain(args)
        return
    if args.chain:
        chain(args)
        return

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


def split_k_linear(x: torch.Tensor, w: torch.Tensor, slices: int, reduce: bool = True):
    """x @ w.T as `slices` products over K slices into float32 partials, summed if `reduce`."""
    m, k = x.shape
    n = w.shape[0]
    xs = x.view(m, slices, k // slices).transpose(0, 1)        # [s, m, k/s]
    ws = w.view(n, slices, k // slices).permute(1, 2, 0)       # [s, k/s, n]
    partial = torch.bmm(xs, ws, out_dtype=torch.float32)        # [s, m, n]
    return partial.sum(0, dtype=torch.float32).to(x.dtype) if reduce else partial


def quack_linear(parallel: bool):
    """x @ w.T by quack's GEMM, split along K in the kernel (`s` CTAs per output tile)."""
    from quack.gemm_config import SplitKMode
    from quack.gemm_interface import gemm

    mode = SplitKMode.PARALLEL if parallel else SplitKMode.SERIAL

    def linear(x: torch.Tensor, w: torch.Tensor, s: int = 1) -> torch.Tensor:
        return gemm(x, w.t(), tuned=False, split_k=s, split_k_mode=mode)
    return linear


ORDER = ["qkv", "o", "gate_up", "down"]  # a layer's products, as a decode step runs them


def chain_weights(config_path: str) -> tuple[dict, list[dict[str, torch.Tensor]]]:
    """The projections' shapes, and every layer's own weights for them (so nothing stays in
    L2 between calls of one projection)."""
    with open(os.path.join(config_path, "config.json")) as f:
        config = json.load(f)
    shapes = projections(config)
    return shapes, [{name: torch.randn(shapes[name][1], shapes[name][0], dtype=torch.bfloat16,
                                       device="cuda") * 0.02 for name in ORDER}
                    for _ in range(config["num_hidden_layers"])]


def step_us(product, weights, replays: int) -> float:
    """µs per step of every layer's products in order; product(name, weight)."""
    def step():
        for layer in weights:
            for name in ORDER:
                product(name, layer[name])
    return timed_us(step, calls=2, replays=replays)


def per_projection_us(product, weights, replays: int) -> dict[str, float]:
    """µs per call of each projection alone, over the layers' weights in turn."""
    times = {}
    for name in ORDER:
        def one():
            for layer in weights:
                product(name, layer[name])
        times[name] = timed_us(one, calls=2, replays=replays) / len(weights)
    return times


def pinned_chain(args) -> None:
    """The decode step's products in order, some through quack's GEMM pinned to a
    configuration (`--quack-configs`), each checked against cuBLAS first."""
    from quack.gemm_interface import gemm_act

    from fused_mlp import parse_config

    shapes, weights = chain_weights(args.config)
    layer_bytes = sum(w.numel() * 2 for w in weights[0].values())
    for m in (int(b) for b in args.batches.split(",")):
        inputs = {name: torch.randn(m, shapes[name][0], dtype=torch.bfloat16, device="cuda")
                  for name in ORDER}
        for variant in args.quack_configs.split(";"):
            pinned = {}
            for part in filter(None, variant.replace("none", "").split(",")):
                name, spec = part.split("=")
                pinned[name] = parse_config(spec, shapes[name][1])

            def product(name, w):
                if name in pinned:
                    return gemm_act(inputs[name], w.t(), activation=None, store_preact=False,
                                    tuned=False, config=pinned[name])[1]
                return F.linear(inputs[name], w)
            try:
                for name in pinned:
                    ref = F.linear(inputs[name], weights[0][name]).float()
                    err = (product(name, weights[0][name]).float() - ref).abs().max().item()
                    assert err <= 2e-2 * ref.abs().max().item(), (name, err)
                us = step_us(product, weights, args.replays)
                per_call = per_projection_us(product, weights, args.replays)
            except Exception as exc:  # a configuration quack rejects: say so, go on
                print(f"  m={m:4d} [{variant}]: failed: {repr(exc)[:300]}")
                continue
            print(f"  m={m:4d} [{variant or 'none'}]: {us / 1e3:.3f} ms per step "
                  f"({len(weights) * layer_bytes / us / 1e3:.0f} GB/s) | "
                  + "; ".join(f"{n} {t:.1f} µs" for n, t in per_call.items()))


def chain(args) -> None:
    shapes, weights = chain_weights(args.config)
    layers = len(weights)
    copy_bw = measure_ceilings(torch.device("cuda"), torch.bfloat16).copy_bytes_per_s / 1e9
    layer_bytes = sum(w.numel() * 2 for w in weights[0].values())
    floor_ms = layers * layer_bytes / copy_bw / 1e6
    print(f"{args.config}: copy bandwidth {copy_bw:.0f} GB/s; {layers} layers x "
          f"{layer_bytes / 1e6:.0f} MB of weights: floor {floor_ms:.3f} ms per step of these "
          f"products")
    for m in (int(b) for b in args.batches.split(",")):
        inputs = {name: torch.randn(m, shapes[name][0], dtype=torch.bfloat16, device="cuda")
                  for name in ORDER}
        quack = {blas: quack_linear(blas == "quack-parallel") for blas in args.blas.split(",")
                 if blas in ("quack", "quack-parallel")}
        # Check the split products against the plain one before timing them.
        for name in ORDER:
            w = weights[0][name]
            for s in (2, 4):
                if shapes[name][0] % s == 0:
                    ref = F.linear(inputs[name], w).float()
                    split_fns = [lambda: split_k_linear(inputs[name], w, s)] + [
                        lambda fn=fn: fn(inputs[name], w, s) for fn in quack.values()]
                    for fn in split_fns:
                        err = (fn().float() - ref).abs().max().item()
                        assert err <= 2e-2 * ref.abs().max().item(), (name, s, err)
        for blas in args.blas.split(","):
            if blas not in quack:
                torch.backends.cuda.preferred_blas_library(blas)
            for variant in args.split_k.split(";"):
                split = {}
                for part in filter(None, variant.replace("none", "").split(",")):
                    name, slices = re.fullmatch(r"([a-z_]+?)(\d+)", part).groups()
                    split[name] = int(slices)

                def product(name, w, reduce=True):
                    s = split.get(name, 1)
                    if blas in quack:
                        quack[blas](inputs[name], w, s)
                    elif s == 1:
                        F.linear(inputs[name], w)
                    else:
                        split_k_linear(inputs[name], w, s, reduce)
                us = step_us(product, weights, args.replays)
                without = ""
                if split and blas not in quack:  # our split's partials, their sum left out
                    unsummed = step_us(lambda n, w: product(n, w, reduce=False), weights,
                                       args.replays)
                    without = f", without the sums {unsummed / 1e3:.3f} ms"
                per_call = per_projection_us(product, weights, args.replays)
                print(f"  {blas:9s} m={m:4d} split [{variant or 'none'}]: {us / 1e3:.3f} ms per "
                      f"step ({layers * layer_bytes / us / 1e3:.0f} GB/s){without} | "
                      + "; ".join(f"{n} {t:.1f} µs" for n, t in per_call.items()))
    torch.backends.cuda.preferred_blas_library("cublas")


if __name__ == "__main__":
    main()
