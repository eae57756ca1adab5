"""One decoder layer's MLP and residual adds as they run now, against quack's GEMMs with the
elementwise work in their epilogues (quack-kernels, a FlashAttention-4 dependency: CuTe DSL,
Hopper and newer).

Now: gate/up (cuBLAS), SiLU × up (compiled), down (cuBLAS), then add + RMSNorm reads the product
and the residual and writes both. Fused:
- `gemm_act(..., activation="swiglu")`: gate/up with SiLU(gate) × up in the epilogue, so the
  [T, 2 × intermediate] product is never written nor read back;
- `gemm_add_inplace`: down (and O) accumulate into the residual (beta=1), so the norm after
  reads one tensor and writes one (`addmm_` is the cuBLAS form of the same).

Each variant is timed as a CUDA graph of `--layers` layers with their own weights (nothing left
in L2 between layers), in a burst and held for `--held` replays (the board's power limit).

    python benchmarks/fused_mlp.py --tokens 128,4096,16384

With `--configs`, only the gate/up stage (product and SiLU × up), cuBLAS against quack's default
configuration and the pinned ones listed, e.g. at decode batches:

    python benchmarks/fused_mlp.py --tokens 64,128,256 --layers 32 \
        --configs 128x192p/1x1,128x224c/1x1,64x256p/2x1

With `--new-rows`, the host time of the shard's fused gate/up at row counts new to the process
(quack's plan caches key on the full shape), against repeated calls:

    python benchmarks/fused_mlp.py --new-rows --tokens 16477,16537,16595,4096,4097
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from elementwise import timed_us


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", default="128,4096,16384")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--held", type=int, default=40)
    parser.add_argument("--tuned", action="store_true",
                        help="also quack's autotuned configurations (compiles many kernels)")
    parser.add_argument("--configs", default="",
                        help="time the gate/up stage alone, with quack pinned to these "
                             "configurations: TILE_MxTILE_N then c (cooperative) or p (pingpong), "
                             "then /CLUSTER_MxCLUSTER_N, or 'sized' (the shard's choice for "
                             "decode batches); comma-separated")
    parser.add_argument("--new-rows", action="store_true",
                        help="host time of the shard's fused gate/up (shard.fused_mlp."
                             "swiglu_linear) at each of --tokens met for the first time, "
                             "against the same call repeated: quack's plan caches key on the "
                             "full shape, so a row count new to the process takes its cold path")
    args = parser.parse_args()
    if args.configs:
        gate_up_configs(args)
        return
    if args.new_rows:
        new_rows(args)
        return
    from quack.gemm_interface import gemm_act, gemm_add_inplace

    dev, bf16 = torch.device("cuda"), torch.bfloat16
    h, inter = args.hidden, args.intermediate
    gate_up = [torch.randn(2 * inter, h, dtype=bf16, device=dev) * 0.02
               for _ in range(args.layers)]
    down = [torch.randn(h, inter, dtype=bf16, device=dev) * 0.02 for _ in range(args.layers)]
    silu_mul = torch.compile(lambda gu: F.silu(gu[:, :inter]) * gu[:, inter:], fullgraph=True)

    def swiglu(x, w, tuned):
        return gemm_act(x, w.t(), activation="swiglu", concat_layout=("B",),
                        store_preact=False, tuned=tuned)[1]

    for t in (int(v) for v in args.tokens.split(",")):
        x = torch.randn(t, h, dtype=bf16, device=dev)
        residual = torch.randn(t, h, dtype=bf16, device=dev)
        ref_act = swiglu_reference(x, gate_up[0])  # correctness first
        scale = ref_act.abs().max().item()
        for tuned in (False, True) if args.tuned else (False,):
            start = time.perf_counter()
            act = swiglu(x, gate_up[0], tuned)
            torch.cuda.synchronize()
            first_s = time.perf_counter() - start
            err = (act.double() - ref_act).abs().max().item() / scale
            ours = silu_mul(F.linear(x, gate_up[0]))
            err_ours = (ours.double() - ref_act).abs().max().item() / scale
            print(f"  t={t}: quack swiglu tuned={tuned}: first call {first_s:.1f} s, max rel. "
                  f"error {err:.1e} (cuBLAS + SiLU × up: {err_ours:.1e})")
        act = silu_mul(F.linear(x, gate_up[0]))
        out = residual.clone()
        gemm_add_inplace(act, down[0].t(), out, tuned=False)
        ref = residual.double() + act.double() @ down[0].double().t()
        err = (out.double() - ref).abs().max().item() / ref.abs().max().item()
        print(f"  t={t}: quack gemm_add_inplace max rel. error {err:.1e}")

        def now():
            for gu, d in zip(gate_up, down):
                y = F.linear(silu_mul(F.linear(x, gu)), d)
                torch.add(y, residual)

        def fused(tuned):
            def run():
                for gu, d in zip(gate_up, down):
                    a = swiglu(x, gu, tuned)
                    gemm_add_inplace(a, d.t(), residual, tuned=tuned)
            return run

        def fused_act_only():
            for gu, d in zip(gate_up, down):
                y = F.linear(swiglu(x, gu, False), d)
                torch.add(y, residual)

        def addmm():
            for gu, d in zip(gate_up, down):
                residual.addmm_(silu_mul(F.linear(x, gu)), d.t())

        variants = {"now (cuBLAS, SiLU x up, cuBLAS, add)": now,
                    "quack swiglu, cuBLAS down, add": fused_act_only,
                    "cuBLAS, SiLU x up, addmm_ down": addmm,
                    "quack swiglu + gemm_add_inplace, untuned": fused(False)}
        if args.tuned:
            variants["quack swiglu + gemm_add_inplace, tuned"] = fused(True)
        flops = 2 * t * h * 3 * inter * args.layers
        for name, fn in variants.items():
            try:
                burst = timed_us(fn, calls=1, replays=3) / args.layers
                held = timed_us(fn, calls=1, replays=args.held) / args.layers
                print(f"  t={t:6d} {name:42s}: {burst:8.1f} µs per layer (burst), {held:8.1f} "
                      f"held, {flops / args.layers / held / 1e6:4.0f} TFLOP/s held")
            except Exception as exc:  # a variant quack rejects: say so, go on
                print(f"  t={t:6d} {name:42s}: failed: {repr(exc)[:300]}")


def swiglu_reference(x: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) × up in float64, for gate_up = [W_gate; W_up]."""
    gate, up = (x.double() @ gate_up.double().t()).chunk(2, dim=-1)
    return F.silu(gate) * up


def parse_config(spec: str, out_features: int):
    """'128x224c/1x1' -> quack GemmConfig(tile 128 x 224, cooperative, cluster 1 x 1); 'sized':
    the shard's configuration for decode batches on this GPU (shard.fused_mlp.sized_config)."""
    from quack.gemm_config import GemmConfig

    if spec == "sized":
        from shard import fused_mlp
        config = fused_mlp.sized_config(out_features, fused_mlp.sm_count(torch.device("cuda")))
        print(f"  sized: {config}")
        return config
    tile, cluster = spec.split("/")
    tile_m, tile_n = tile[:-1].split("x")
    cluster_m, cluster_n = cluster.split("x")
    return GemmConfig(tile_m=int(tile_m), tile_n=int(tile_n), pingpong=tile[-1] == "p",
                      cluster_m=int(cluster_m), cluster_n=int(cluster_n),
                      is_dynamic_persistent=False)


def new_rows(args) -> None:
    """Host ms of swiglu_linear's call (the launch, not the kernel) at row counts new to the
    process, then repeated; each call synchronized before and after."""
    from shard.fused_mlp import swiglu_linear

    dev, bf16 = torch.device("cuda"), torch.bfloat16
    weight = torch.randn(2 * args.intermediate, args.hidden, dtype=bf16, device=dev) * 0.02
    swiglu_linear(torch.randn(1024, args.hidden, dtype=bf16, device=dev), weight)  # compiled
    for rows in (int(v) for v in args.tokens.split(",")):
        x = torch.randn(rows, args.hidden, dtype=bf16, device=dev)
        host_ms = []
        for _ in range(3):
            torch.cuda.synchronize()
            start = time.perf_counter()
            swiglu_linear(x, weight)
            host_ms.append(1e3 * (time.perf_counter() - start))
            torch.cuda.synchronize()
        print(f"  rows {rows:6d}: host {host_ms[0]:7.2f} ms first, then "
              + ", ".join(f"{ms:.2f}" for ms in host_ms[1:]) + " ms")


def gate_up_configs(args) -> None:
    """The gate/up stage alone by row count: cuBLAS + compiled SiLU x up, quack's default
    configuration, and each pinned one (`--configs`); each checked against float64 first."""
    from quack.gemm_interface import gemm_act

    dev, bf16 = torch.device("cuda"), torch.bfloat16
    h, inter = args.hidden, args.intermediate
    gate_up = [torch.randn(2 * inter, h, dtype=bf16, device=dev) * 0.02
               for _ in range(args.layers)]
    silu_mul = torch.compile(lambda gu: F.silu(gu[:, :inter]) * gu[:, inter:], fullgraph=True)
    configs = {"quack default": None} | {
        f"quack {spec}": parse_config(spec, 2 * inter) for spec in args.configs.split(",")}
    weight_bytes = 2 * inter * h * 2
    for t in (int(v) for v in args.tokens.split(",")):
        x = torch.randn(t, h, dtype=bf16, device=dev)
        ref = swiglu_reference(x, gate_up[0])
        scale = ref.abs().max().item()
        variants = {"cuBLAS + SiLU x up": lambda: [silu_mul(F.linear(x, w)) for w in gate_up]}
        for name, config in configs.items():
            def run(config=config):
                return [gemm_act(x, w.t(), activation="swiglu", concat_layout=("B",),
                                 store_preact=False, tuned=False, config=config)[1]
                        for w in gate_up]
            variants[name] = run
        for name, fn in variants.items():
            try:
                start = time.perf_counter()
                err = (fn()[0].double() - ref).abs().max().item() / scale
                first_s = time.perf_counter() - start
                burst = timed_us(fn, calls=1, replays=3) / args.layers
                held = timed_us(fn, calls=1, replays=args.held) / args.layers
                print(f"  t={t:5d} {name:24s}: {burst:7.1f} µs per layer (burst), {held:7.1f} "
                      f"held, {weight_bytes / held / 1e6:5.2f} TB/s of weights held; error "
                      f"{err:.1e}, first call {first_s:.1f} s")
            except Exception as exc:  # a configuration quack rejects: say so, go on
                print(f"  t={t:5d} {name:24s}: failed: {repr(exc)[:300]}")


if __name__ == "__main__":
    main()
