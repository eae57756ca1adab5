"""Paged decode attention alone: FlashAttention-4's kernel on one decode step's shapes, with the
tile shapes and page sizes it can be given, and our Triton kernel (shard/paged_decode.py) in
several configurations, each against a float64 reference.

Prints, per variant, µs per call, the KV bytes it must read over that time (GB/s), and the
largest error relative to the reference's largest value.

    python benchmarks/decode_attention.py --batch 128 --context 576 --heads 32 --kv-heads 8 \\
        --head-dim 128
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from elementwise import timed_us  # noqa: E402


def reference(q, k_cache, v_cache, table, lens):
    """float64 attention of each sequence's one query over its cached context."""
    block = k_cache.shape[1]
    out = torch.empty(q.shape, dtype=torch.float64, device=q.device)
    group = q.shape[1] // k_cache.shape[2]
    for i, n in enumerate(lens):
        blocks = table[i, :math.ceil(n / block)].long()
        k = k_cache[blocks].flatten(0, 1)[:n].double().repeat_interleave(group, 1)
        v = v_cache[blocks].flatten(0, 1)[:n].double().repeat_interleave(group, 1)
        scores = torch.einsum("hd,nhd->hn", q[i].double(), k) / math.sqrt(q.shape[-1])
        out[i] = torch.einsum("hn,nhd->hd", scores.softmax(-1), v)
    return out


def fa4_call(tile, q, k_cache, v_cache, cu_q, seqused, table):
    from flash_attn.cute import interface

    extra = {} if tile == "default" else {"tile_mn": tuple(int(x) for x in tile.split("x"))}

    def call():
        return interface._flash_attn_fwd(q, k_cache, v_cache, cu_seqlens_q=cu_q, max_seqlen_q=1,
                                         seqused_k=seqused, page_table=table, causal=True,
                                         **extra)[0]
    return call


def triton_call(cfg, splits, q, k_cache, v_cache, table, seqused):
    from shard.paged_decode import PagedDecode

    block_n, warps, stages = (int(x) for x in cfg.split("/"))
    kernel = PagedDecode(q.device, block_n=block_n, num_warps=warps, num_stages=stages)
    out = torch.empty_like(q)

    def call():
        return kernel(q, k_cache, v_cache, table, seqused, out, num_splits=splits)
    return call


def evicting(call, scratch):
    """`call` after a write of `scratch` (larger than L2): the KV comes from HBM, as in a
    decode step, where the weights' stream evicts it between layers."""
    def evicted():
        scratch.zero_()
        return call()
    return evicted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--context", type=int, default=576, help="mean context; ±64 uniform")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-sizes", default="16,128")
    parser.add_argument("--contiguous", action="store_true",
                        help="each sequence's pages in order, one after another (as the "
                             "engine allocates a reservation), not shuffled")
    parser.add_argument("--tiles", default="default,64x128,64x64,128x64")
    parser.add_argument("--triton", default="64/4/3,128/4/3,64/4/4,32/4/4,128/8/3",
                        help="Triton configurations: BLOCK_N/warps/stages, comma-separated")
    parser.add_argument("--splits", default="",
                        help="Triton split-KV parts, comma-separated (default: chosen from the "
                             "batch)")
    parser.add_argument("--cold", action="store_true",
                        help="each call after writing 96 MB, its time less that write's: the "
                             "KV read from HBM, not from L2 (which holds a small batch's)")
    parser.add_argument("--iters", type=int, default=50)
    args = parser.parse_args()

    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    lens = torch.randint(args.context - 64, args.context + 65, (args.batch,), generator=gen)
    q = torch.randn(args.batch, args.heads, args.head_dim, dtype=torch.bfloat16, device=dev)
    kv_bytes = int(lens.sum()) * args.kv_heads * args.head_dim * 2 * 2
    cu_q = torch.arange(args.batch + 1, dtype=torch.int32, device=dev)
    seqused = lens.to(torch.int32).to(dev)
    print(f"batch {args.batch}, context {args.context}±64, heads {args.heads}/{args.kv_heads}, "
          f"d {args.head_dim}: {kv_bytes / 1e6:.1f} MB of KV per call")
    for block in (int(b) for b in args.block_sizes.split(",")):
        per_seq = math.ceil((args.context + 64) / block)
        num_blocks = args.batch * per_seq + 1
        k_cache = torch.randn(num_blocks, block, args.kv_heads, args.head_dim,
                              dtype=torch.bfloat16, device=dev)
        v_cache = torch.randn_like(k_cache)
        table = (torch.arange(args.batch * per_seq) if args.contiguous else
                 torch.randperm(num_blocks - 1, generator=gen)[:args.batch * per_seq])
        table = table.view(args.batch, per_seq).to(torch.int32).to(dev)
        expected = reference(q, k_cache, v_cache, table, lens.tolist())
        variants = [("fa4 " + tile, fa4_call(tile, q, k_cache, v_cache, cu_q, seqused, table))
                    for tile in args.tiles.split(",") if tile]
        variants += [(f"triton {cfg} s{splits or 'auto'}",
                      triton_call(cfg, int(splits) if splits else None, q, k_cache, v_cache,
                                  table, seqused))
                     for cfg in args.triton.split(",") if cfg for splits in args.splits.split(",")]
        scratch = torch.empty(96 << 20, dtype=torch.uint8, device=dev) if args.cold else None
        write_us = (timed_us(scratch.zero_, calls=10, replays=max(args.iters // 10, 1))
                    if args.cold else 0.0)
        for name, call in variants:
            try:
                out = call()
                torch.cuda.synchronize()
                err = ((out.double() - expected).abs().max() / expected.abs().max()).item()
                # A graph replay of the kernel alone: FA4's interface spends host time per call.
                us = timed_us(evicting(call, scratch) if args.cold else call, calls=10,
                              replays=max(args.iters // 10, 1)) - write_us
                print(f"  block {block:4d} {name:22s}: {us:8.1f} µs/call in a graph, "
                      f"{kv_bytes / us / 1e3:7.0f} GB/s, max rel. error {err:.1e}")
            except Exception as exc:  # a tile this FA4 build rejects: say so, go on
                print(f"  block {block:4d} {name:22s}: failed: {repr(exc)[:300]}")


if __name__ == "__main__":
    main()
