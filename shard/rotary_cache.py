"""Rotary embedding and the KV-cache write as one Triton kernel (`--fused-rotary`).

The unfused path is three kernels per layer: the compiled rotary stage (which writes rotated k
only for the cache write to read it back) and one `index_copy_` each for k and v. In a decode
step at batch 128 of the 8B model each of them takes 1.5–3 µs (torch.profiler, H200), so their
launches and gaps cost about as much as their work; here each program takes one token, rotates
its query and key heads in float32 exactly as `ops.rotary` does, and stores q (in a fresh
tensor, or the piecewise graphs' static buffer) and k and v straight into their cache slots.

Same cache layout as every backend: [num_blocks, block_size, num_kv_heads, head_dim].
Triton comes with torch's CUDA builds; this module is imported only on CUDA.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from shard import pdl


@triton.jit
def _rotate_into(src_ptr, dst_ptr, c, s, heads,
                 HEADS_PAD: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr):
    """Rotate-half of `heads` heads of one token: src -> dst, both [heads, 2 * HALF] dense."""
    rows = tl.arange(0, HEADS_PAD)[:, None]
    dims = tl.arange(0, HALF_PAD)[None, :]
    keep = (rows < heads) & (dims < HALF)
    src = src_ptr + rows * (2 * HALF) + dims
    x1 = tl.load(src, mask=keep, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=keep, other=0.0).to(tl.float32)
    dst = dst_ptr + rows * (2 * HALF) + dims
    ty = dst_ptr.dtype.element_ty
    tl.store(dst, (x1 * c - x2 * s).to(ty), mask=keep)
    tl.store(dst + HALF, (x2 * c + x1 * s).to(ty), mask=keep)


@triton.jit
def _rotary_cache_kernel(qkv_ptr, pos_ptr, cos_ptr, sin_ptr, slot_ptr, q_ptr, k_ptr, v_ptr,
                         stride_qkv, stride_slot, num_heads, num_kv_heads,
                         Q_PAD: tl.constexpr, KV_PAD: tl.constexpr, HALF: tl.constexpr,
                         HALF_PAD: tl.constexpr, PDL: tl.constexpr):
    pdl.launch_next(PDL)
    token = tl.program_id(0)
    dim = 2 * HALF
    # The step's positions and slots and the rotary tables: read before the wait (pdl.py).
    pos = tl.load(pos_ptr + token).to(tl.int64)
    half = tl.arange(0, HALF_PAD)[None, :]
    c = tl.load(cos_ptr + pos * HALF + half, mask=half < HALF, other=0.0)
    s = tl.load(sin_ptr + pos * HALF + half, mask=half < HALF, other=0.0)
    slot = tl.load(slot_ptr + token).to(tl.int64) * stride_slot
    pdl.wait(PDL)
    row = qkv_ptr + token.to(tl.int64) * stride_qkv
    _rotate_into(row, q_ptr + token.to(tl.int64) * num_heads * dim, c, s, num_heads,
                 Q_PAD, HALF, HALF_PAD)
    _rotate_into(row + num_heads * dim, k_ptr + slot, c, s, num_kv_heads, KV_PAD, HALF, HALF_PAD)
    # v: a plain copy, both halves at once.
    heads = tl.arange(0, KV_PAD)[:, None]
    dims = tl.arange(0, 2 * HALF_PAD)[None, :]
    keep = (heads < num_kv_heads) & (dims < dim)
    v = tl.load(row + (num_heads + num_kv_heads) * dim + heads * dim + dims, mask=keep)
    tl.store(v_ptr + slot + heads * dim + dims, v, mask=keep)


def rotary_into_cache(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slot_mapping: torch.Tensor, num_heads: int, num_kv_heads: int,
                      head_dim: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """q [T, Hq, D] rotated (into `out` if given: dense, as the piecewise graphs' buffer is);
    k rotated and v stored in their slots of the caches. Same arithmetic as ops.rotary
    followed by attention.write_kv."""
    tokens = qkv.shape[0]
    q = out if out is not None else torch.empty(tokens, num_heads, head_dim, dtype=qkv.dtype,
                                                 device=qkv.device)
    assert q.is_contiguous() and qkv.stride(-1) == 1, "rows must be dense"
    if tokens == 0:
        return q
    k_slots = k_cache.view(-1, num_kv_heads, head_dim)
    v_slots = v_cache.view(-1, num_kv_heads, head_dim)
    half = head_dim // 2
    use_pdl = pdl.enabled(qkv.device, tokens)
    _rotary_cache_kernel[(tokens,)](
        qkv, positions, cos, sin, slot_mapping, q, k_slots, v_slots,
        qkv.stride(0), k_slots.stride(0), num_heads, num_kv_heads,
        Q_PAD=triton.next_power_of_2(num_heads), KV_PAD=triton.next_power_of_2(num_kv_heads),
        HALF=half, HALF_PAD=triton.next_power_of_2(half), PDL=use_pdl, num_warps=4,
        **pdl.launch_options(use_pdl))
    return q
