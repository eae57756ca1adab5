"""shard/gemv.py's matrix-vector kernels against cuBLAS: each projection of a model config at
1-16 rows, every configuration of the kernel, each timed over every layer's own weights in a
CUDA graph (so nothing stays in L2 between calls), with the bytes it reads per µs.

    python benchmarks/gemv.py --config benchmarks/configs/llama-3.1-8b --rows 1,2,4,8,16

Triton compiles each configuration once (seconds each); `--compile-only I/N` compiles the I-th
of N shares of them and times nothing, so that N processes fill Triton's cache side by side
before one process times (gpu.sh gemv does that).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from decode_gemm import ORDER, chain_weights  # noqa: E402
from elementwise import timed_us  # noqa: E402
from offline import measure_ceilings  # noqa: E402
from shard import gemv, pdl  # noqa: E402

# (BLOCK_N, BLOCK_K, warps, stages, dot): the one-row kernel's tiles hold BLOCK_N x BLOCK_K
# float32 partial sums, so their product stays within 8,192; tl.dot takes BLOCK_N >= 16.
ONE_ROW = [(n, k, w, 1, False) for (n, k), w in itertools.product(
    [(2, 1024), (2, 2048), (4, 512), (4, 1024), (4, 2048), (8, 256), (8, 512), (8, 1024),
     (16, 256), (16, 512)], (4, 8))]
# Stages: Triton pipelines the tl.dot loops (asynchronous copies into shared memory, in as
# many stages: benchmarks/gemv_resources.py shows them), not the one-row loops, which run in 1.
DOT = [(n, k, w, 4, True) for n, k, w in itertools.product((16, 32, 64), (64, 128, 256),
                                                           (4, 8))] + [(16, 512, 4, 3, True),
                                                                       (32, 512, 4, 3, True)]


# qkv_rotary's one-row tiles: (feature pairs a program, BLOCK_K, warps, stages). The shard's
# (gemv.config) are 4 pairs (8 weight rows) x 1,024 inputs in 4 warps over up to 2,048 inputs,
# 2 pairs x 2,048 over more.
ROTARY_ONE_ROW = [(p, k, w, 1) for p, k, w in itertools.product((1, 2, 4), (1024, 2048), (4, 8))]


def configs(rows: int) -> list[tuple]:
    return (ONE_ROW + DOT) if rows == 1 else DOT


def reference(x: torch.Tensor, weight: torch.Tensor, gated: bool) -> torch.Tensor:
    y = F.linear(x, weight)
    if gated:
        gate, up = y.chunk(2, dim=-1)
        return F.silu(gate) * up
    return y


def with_rotary(x: torch.Tensor, squares, layer_weights: list[torch.Tensor], timed,
                model: dict) -> str:
    """The QKV product with rotary and the cache write in one kernel (gemv.qkv_rotary), also
    of RMSNorm(x) as a step with the norms folded runs it (squares: squares_of(x)), against
    the product, then shard/rotary_cache.py's kernel, where the shard would take it."""
    from shard.rotary_cache import rotary_into_cache

    heads, kv_heads = model["num_attention_heads"], model["num_key_value_heads"]
    head_dim = model.get("head_dim") or model["hidden_size"] // heads
    rows = x.shape[0]
    if not gemv.takes_rotary(rows, head_dim):
        return ""
    try:
        cos, sin = (torch.rand(4096, head_dim // 2, device=x.device) for _ in range(2))
        where = torch.arange(rows, device=x.device) + 500  # positions and cache slots
        k_cache, v_cache = (torch.zeros(64, 16, kv_heads, head_dim, dtype=x.dtype,
                                        device=x.device) for _ in range(2))
        rest = (where, cos, sin, k_cache, v_cache, where, heads, kv_heads, head_dim)
        fused = timed(lambda w: gemv.qkv_rotary(x, w, *rest))
        normed = timed(lambda w: gemv.qkv_rotary(x, w, *rest, norm_eps=1e-5, squares=squares))
        apart = timed(lambda w: rotary_into_cache(gemv.product(x, w, False), *rest))
        swept = ""
        if rows == 1:  # the one-row kernel in other tiles, normed as a folded step runs it
            want = gemv.qkv_rotary(x, layer_weights[0], *rest, norm_eps=1e-5,
                                   squares=squares).float()
            results = []
            for block in ROTARY_ONE_ROW:
                if (head_dim // 2) % block[0]:
                    continue
                def call(w, block=block):
                    return gemv.qkv_rotary(x, w, *rest, norm_eps=1e-5, squares=squares,
                                           block=block)
                try:
                    got = call(layer_weights[0]).float()
                    err = (got - want).abs().max().item() / want.abs().max().item()
                    assert err < 2e-2, f"error {err:.3g}"
                    results.append((timed(call), block))
                except Exception as exc:  # e.g. registers past the limit: the others print
                    results.append((float("inf"), f"{block} {type(exc).__name__}"))
            swept = "; normed, best tiles (pairs, BLOCK_K, warps, stages): " + "; ".join(
                f"{us:.2f} µs {block}" for us, block in sorted(results, key=lambda r: r[0])[:3])
        return (f", {fused:.2f} µs with rotary and the cache write ({normed:.2f} normed,"
                f" {apart:.2f} as two kernels{swept})")
    except Exception as exc:  # the sweep's other figures still print
        return f", with rotary failed: {repr(exc)[:200]}"


# A product's forms: plain; as a step with the norms folded runs QKV and gate/up (of
# RMSNorm(x)); as it runs O and down (with the residual add).
FORMS = ("plain", "normed", "added")


def squares_of(x):
    """The squares added_product returns with a stream equal to x (x plus a zero product),
    what a normed product of x's rows takes through tl.dot's kernel."""
    zero = x.new_zeros(x.shape[0], 16)
    return gemv.added_product(zero, x.new_zeros(x.shape[1], 16), x.contiguous(), dot=True)[1]


def product_in_form(x, w, gated: bool, form: str, residual, squares=None, **tuning):
    """gemv's product of x and w in one of FORMS (residual: the added form's; squares: the
    normed one's, squares_of(x))."""
    if form == "added":
        return gemv.added_product(x, w, residual, **tuning)[0]
    if form == "normed":
        return gemv.product(x, w, gated, norm_eps=1e-5, squares=squares, **tuning)
    return gemv.product(x, w, gated, **tuning)


def folded_form(name: str) -> str:
    """The form a step with the norms folded runs projection `name` in."""
    return "added" if name in ("o", "down") else "normed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="benchmarks/configs/llama-3.1-8b")
    parser.add_argument("--rows", default="1,2,4,8,16")
    parser.add_argument("--replays", type=int, default=5)
    parser.add_argument("--top", type=int, default=4, help="configurations shown per case")
    parser.add_argument("--compile-only", default=None, metavar="I/N")
    args = parser.parse_args()
    rows_list = [int(r) for r in args.rows.split(",")]
    pdl.configure(True)  # the shard's kernels with --pdl on (Hopper; a no-op before it)
    if args.compile_only:
        # Triton specializes on the tiles and on sizes' divisibility by 16, not on the sizes:
        # one small weight compiles what every projection of these shapes runs.
        part, parts = (int(v) for v in args.compile_only.split("/"))
        # (tiles, gated, form): the folded forms are variants of the plain kernel.
        cases = sorted({(c, gated, form) for rows in rows_list for c in configs(rows)
                        for gated in (False, True) for form in FORMS
                        if not (gated and form == "added")})
        w = torch.zeros(4096, 2048, dtype=torch.bfloat16, device="cuda")
        for c, gated, form in cases[part::parts]:
            x = torch.zeros(16 if c[4] else 1, w.shape[1], dtype=w.dtype, device=w.device)
            try:
                product_in_form(x, w, gated, form, x.new_zeros(x.shape[0], w.shape[0]),
                                squares_of(x), block=c[:4], dot=c[4])
            except Exception as exc:  # e.g. tiles past shared memory: timing skips it too
                print(f"{c} gated={gated} {form}: {type(exc).__name__}")
        torch.cuda.synchronize()
        return
    shapes, weights = chain_weights(args.config)
    with open(os.path.join(args.config, "config.json")) as f:
        model = json.load(f)
    copy_bw = measure_ceilings(torch.device("cuda"), torch.bfloat16).copy_bytes_per_s / 1e9
    print(f"{args.config}: copy bandwidth {copy_bw:.0f} GB/s; {len(weights)} layers")
    for rows in rows_list:
        for name in ORDER:
            gated = name == "gate_up"
            layer_weights = [layer[name] for layer in weights]
            x = torch.randn(rows, shapes[name][0], dtype=torch.bfloat16, device="cuda")
            nbytes = layer_weights[0].numel() * 2
            floor_us = nbytes / copy_bw / 1e3

            def timed(product) -> float:
                def every_layer():
                    for w in layer_weights:
                        product(w)
                return timed_us(every_layer, calls=2, replays=args.replays) / len(weights)

            cublas = timed(lambda w: F.linear(x, w))
            squares = squares_of(x)
            residual = torch.randn(rows, layer_weights[0].shape[0], dtype=x.dtype,
                                   device=x.device)

            def sweep(form: str = "plain") -> str:
                """The --top fastest configurations ('µs GB/s config; ...') of the product in
                `form`, and how many failed with the first failure's exception."""
                results, failed = [], []
                if form == "normed":
                    normed = x.float() * x.float().pow(2).mean(1, keepdim=True).add(1e-5).rsqrt()
                    want = reference(normed, layer_weights[0].float(), gated)
                else:
                    want = reference(x, layer_weights[0], gated).float()
                if form == "added":
                    want = want + residual.float()
                for c in configs(rows):
                    def call(w, c=c):
                        return product_in_form(x, w, gated, form, residual, squares,
                                               block=c[:4], dot=c[4])
                    try:
                        got = call(layer_weights[0]).float()
                        err = (got - want).abs().max().item() / want.abs().max().item()
                        assert err < 2e-2, f"error {err:.3g}"
                        results.append((timed(call), c))
                    except Exception as exc:  # e.g. tiles past shared memory
                        failed.append(exc)
                results.sort()
                best = "; ".join(f"{us:.2f} µs {nbytes / us / 1e3:.0f} GB/s {c}"
                                 for us, c in results[:args.top])
                if failed:
                    best += f" | {len(failed)} failed, e.g. {repr(failed[0])[:200]}"
                return best

            # The shard's own tiles (gemv.config), with programmatic dependent launch (the
            # shard's choice on Hopper) and without; and as a step with the norms folded runs
            # them: QKV and gate/up of RMSNorm(x), O and down with the residual add.
            chosen = (f"{timed(lambda w: gemv.product(x, w, gated)):.2f} µs, "
                      f"{timed(lambda w: gemv.product(x, w, gated, use_pdl=False)):.2f} "
                      f"without PDL")
            form = folded_form(name)
            folded = timed(lambda w: product_in_form(x, w, gated, form, residual, squares))
            chosen += f", {folded:.2f} µs {form}"
            if name == "qkv":
                chosen += with_rotary(x, squares, layer_weights, timed, model)
            print(f"rows {rows:2d} {name:7s} floor {floor_us:6.2f} µs | cuBLAS"
                  f"{' (no SiLU)' if gated else ''} {cublas:6.2f} µs "
                  f"{nbytes / cublas / 1e3:4.0f} GB/s | ours (the shard's tiles): {chosen} | "
                  f"best: {sweep()}")
            print(f"rows {rows:2d} {name:7s} {form}, best: {sweep(form)}")


if __name__ == "__main__":
    main()
