"""The decoder's compiled elementwise stages alone (shard/models/ops.py) on one prefill step's
shapes: µs per call and the bytes each must move over that time, beside written-out variants.

    python benchmarks/elementwise.py --tokens 4096 --hidden 2048 --heads 32 --kv-heads 8 \\
        --head-dim 64 --intermediate 8192
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from shard.models import ops  # noqa: E402


def rotary_unflatten(qkv, positions, cos, sin, num_heads, num_kv_heads, head_dim):
    """ops.rotary with the halves taken by unflatten/unbind and put back by stack."""
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim,
                         num_kv_heads * head_dim], dim=-1)
    c, s = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)

    def rotate(x, heads):
        x1, x2 = x.unflatten(-1, (heads, 2, head_dim // 2)).float().unbind(-2)
        return torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-2).flatten(-2).to(qkv.dtype)

    return rotate(q, num_heads), rotate(k, num_kv_heads), v.unflatten(-1, (num_kv_heads,
                                                                            head_dim))


def timed_us(fn, calls: int = 10, replays: int = 5) -> float:
    """Kernel time per call, from a CUDA graph of `calls` calls (no host time in it)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(True), torch.cuda.Event(True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return 1000 * start.elapsed_time(end) / (calls * replays)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--intermediate", type=int, default=8192)
    args = parser.parse_args()
    dev, bf16 = torch.device("cuda"), torch.bfloat16
    t, d = args.tokens, args.head_dim
    qkv_width = (args.heads + 2 * args.kv_heads) * d
    qkv = torch.randn(t, qkv_width, dtype=bf16, device=dev)
    positions = torch.randint(0, 8192, (t,), device=dev)
    inv = 1.0 / (500000 ** (torch.arange(0, d, 2, dtype=torch.float, device=dev) / d))
    freqs = torch.outer(torch.arange(131072, dtype=torch.float, device=dev), inv)
    cos, sin = freqs.cos(), freqs.sin()
    x = torch.randn(t, args.hidden, dtype=bf16, device=dev)
    residual = torch.randn_like(x)
    weight = torch.randn(args.hidden, dtype=bf16, device=dev)
    gate_up = torch.randn(t, 2 * args.intermediate, dtype=bf16, device=dev)

    rot_bytes = 2 * t * (args.heads + args.kv_heads) * d * 2  # q and k read and written
    cases = {
        "rotary": (ops.rotary, (qkv, positions, cos, sin, args.heads, args.kv_heads, d),
                   rot_bytes),
        "rotary_unflatten": (rotary_unflatten,
                             (qkv, positions, cos, sin, args.heads, args.kv_heads, d), rot_bytes),
        "add_rms_norm": (ops.add_rms_norm, (x, residual, weight, 1e-5), 4 * x.numel() * 2),
        "silu_mul": (ops.silu_mul, (gate_up,), gate_up.numel() * 2 * 3 // 2),
    }
    reference = {}
    print(f"{t} tokens, hidden {args.hidden}, heads {args.heads}/{args.kv_heads}, d {d}, "
          f"intermediate {args.intermediate}")
    for name, (fn, fn_args, nbytes) in cases.items():
        # True: every dimension symbolic; None (what ops.py does): only the one that changed
        # between calls, here the token count; False: all static.
        for dynamic in (True, None, False):
            compiled = torch.compile(fn, dynamic=dynamic, fullgraph=True)
            if dynamic is None:  # a first, smaller step, then the measured one: recompiled
                compiled(*(a[:t // 2] if isinstance(a, torch.Tensor) and a.shape[0] == t
                           else a for a in fn_args))
            out = compiled(*fn_args)
            key = name.split("_unflatten")[0]
            first = out[0] if isinstance(out, tuple) else out
            reference.setdefault(key, first)
            same = torch.equal(first, reference[key])
            us = timed_us(lambda: compiled(*fn_args))
            print(f"  {name:18s} dynamic={dynamic!s:5s}: {us:8.1f} µs, "
                  f"{nbytes / us / 1e3:6.0f} GB/s, same as ops: {same}")


if __name__ == "__main__":
    main()
