"""Paged decode attention in Triton: one query token per sequence against its cached context.

Why our own kernel: FlashAttention-4 on Hopper has no split-KV and reads the pages of a decode
batch at 1.6–2.5 TB/s (benchmarks/decode_attention.py on the H100, where this kernel reads them
at 2.65–2.8), about half of a decode step's time on the models we measure. Here each program takes one (sequence, KV head, split): the query heads that share the
KV head (GQA) are the rows of one small matrix product, so each page is read once for all of
them, and a batch too small to fill the GPU splits every context into `num_splits` parts whose
partial results a second kernel merges (flash-decoding).

Same cache layout as every backend: [num_blocks, block_size, num_kv_heads, head_dim].
Triton comes with torch's CUDA builds; this module is imported only on CUDA.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from shard import pdl


# The block table's row stride changes from step to step (the longest context's blocks) and
# would make Triton compile a variant per divisibility; the other strides stay specialized,
# since vectorized loads need their alignment known.
@triton.jit(do_not_specialize=["stride_tb"])
def _decode_kernel(q_ptr, k_ptr, v_ptr, out_ptr, table_ptr, lens_ptr, part_out_ptr, part_lse_ptr,
                   qk_scale, stride_qb, stride_qh, stride_kb, stride_kt, stride_kh,
                   stride_ob, stride_oh, stride_tb,
                   GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                   DIM_PAD: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
                   NUM_SPLITS: tl.constexpr, LINE: tl.constexpr, LINES: tl.constexpr,
                   PDL: tl.constexpr):
    pdl.launch_next(PDL)
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    # The context's length and block table are the step's own, in place before its first
    # kernel: read before the wait (pdl.py).
    length = tl.load(lens_ptr + seq)
    per_split = tl.cdiv(tl.cdiv(length, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, length)
    offsets = tl.arange(0, BLOCK_N)
    if PDL:  # the first tile's keys and values on their way to L2 while the previous kernel
        # (which writes the newest token's) ends: LINES lines of LINE elements per token
        pos = start + offsets
        page = tl.load(table_ptr + seq * stride_tb + pos // PAGE, mask=pos < end, other=0)
        where = page.to(tl.int64) * stride_kb + (pos % PAGE) * stride_kt + kv_head * stride_kh
        lines = (tl.arange(0, LINES) * LINE)[None, :]
        wanted = (pos < end)[:, None] & (lines >= 0)
        pdl.prefetch_l2(k_ptr + where[:, None] + lines, wanted)
        pdl.prefetch_l2(v_ptr + where[:, None] + lines, wanted)
    pdl.wait(PDL)

    rows = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, DIM_PAD)
    # The head-dim mask only where the head dim is not a power of two: a mask that varies
    # along the contiguous axis would stop vectorized loads.
    if DIM_PAD == HEAD_DIM:
        dim_ok = tl.full([1, DIM_PAD], 1, tl.int1)
    else:
        dim_ok = (dims < HEAD_DIM)[None, :]
    keep = (rows < GROUP)[:, None] & dim_ok
    heads = kv_head * GROUP + rows
    q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + dims[None, :], mask=keep,
                other=0.0)

    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    total = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, DIM_PAD], tl.float32)
    for n in range(start, end, BLOCK_N):
        pos = n + offsets
        valid = pos < end
        page = tl.load(table_ptr + seq * stride_tb + pos // PAGE, mask=valid, other=0)
        where = page.to(tl.int64) * stride_kb + (pos % PAGE) * stride_kt + kv_head * stride_kh
        inside = valid[:, None] & dim_ok
        k = tl.load(k_ptr + where[:, None] + dims[None, :], mask=inside, other=0.0)
        scores = tl.dot(q, tl.trans(k)) * qk_scale  # log2 units: exp2 below
        scores = tl.where(valid[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(scores - m_new[:, None])
        total = total * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + where[:, None] + dims[None, :], mask=inside, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new

    if NUM_SPLITS == 1:
        result = acc / total[:, None]
        tl.store(out_ptr + seq * stride_ob + heads[:, None] * stride_oh + dims[None, :],
                 result.to(out_ptr.dtype.element_ty), mask=keep)
    else:
        # An empty split (a context shorter than the others' share) leaves total = 0: its
        # log-sum-exp is -inf and the merge gives it no weight.
        result = tl.where(total[:, None] > 0, acc / total[:, None], 0.0)
        lse = tl.where(total > 0, m + tl.log2(total), float("-inf"))
        row = (seq * tl.num_programs(1) * GROUP + heads) * NUM_SPLITS + split
        tl.store(part_out_ptr + row[:, None] * DIM_PAD + dims[None, :], result, mask=keep)
        tl.store(part_lse_ptr + row, lse, mask=rows < GROUP)


@triton.jit
def _merge_kernel(part_out_ptr, part_lse_ptr, out_ptr, stride_ob, stride_oh, num_heads,
                  HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, NUM_SPLITS: tl.constexpr,
                  PDL: tl.constexpr):
    pdl.launch_next(PDL)
    pdl.wait(PDL)
    seq = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, NUM_SPLITS)
    dims = tl.arange(0, DIM_PAD)
    row = (seq * num_heads + head) * NUM_SPLITS + splits
    lse = tl.load(part_lse_ptr + row)
    weight = tl.exp2(lse - tl.max(lse, 0))
    weight = weight / tl.sum(weight, 0)
    parts = tl.load(part_out_ptr + row[:, None] * DIM_PAD + dims[None, :])
    result = tl.sum(parts * weight[:, None], 0)
    tl.store(out_ptr + seq * stride_ob + head * stride_oh + dims,
             result.to(out_ptr.dtype.element_ty), mask=dims < HEAD_DIM)


class PagedDecode:
    """Decode attention over the pages. `num_splits` is chosen from the batch alone (never from
    the contexts' lengths), so a captured CUDA graph stays valid for every step it replays."""

    def __init__(self, device: torch.device, block_n: int = 64, num_warps: int | None = None,
                 num_stages: int = 3, max_splits: int = 32):
        self.block_n = block_n
        self.num_warps = num_warps
        self.num_stages = num_stages
        self.max_splits = max_splits
        # Contexts are split until the programs fill the SMs once (132: an H100's, for runs
        # under Triton's CPU interpreter).
        self.target_programs = (torch.cuda.get_device_properties(device).multi_processor_count
                                if device.type == "cuda" else 132)

    def splits_for(self, batch: int, kv_heads: int) -> int:
        wanted = math.ceil(self.target_programs / (batch * kv_heads))
        return min(self.max_splits, 1 << max(0, wanted - 1).bit_length())

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 block_table: torch.Tensor, seqused_k: torch.Tensor, out: torch.Tensor,
                 num_splits: int | None = None) -> torch.Tensor:
        """q, out: [B, Hq, D]; block_table [B, max_blocks] int32; seqused_k [B] int32 (>= 1)."""
        batch, num_heads, dim = q.shape
        _, page, kv_heads, _ = k_cache.shape
        group = num_heads // kv_heads
        assert q.stride(-1) == k_cache.stride(-1) == out.stride(-1) == 1, "rows must be dense"
        splits = num_splits or self.splits_for(batch, kv_heads)
        dim_pad = triton.next_power_of_2(dim)
        if splits > 1:
            part_out = torch.empty(batch * num_heads * splits, dim_pad, dtype=torch.float32,
                                   device=q.device)
            part_lse = torch.empty(batch * num_heads * splits, dtype=torch.float32,
                                   device=q.device)
        else:
            part_out = part_lse = out  # unused
        scale = 1.0 / math.sqrt(dim) * 1.4426950408889634  # log2(e): the kernel uses exp2
        # Two warps for small heads: on the H200, 8B's d=128 read its KV at 3.9 TB/s with 2 or
        # 4 warps, the 1B's d=64 at 3.85 with 2 against 3.45 with 4 (decode_attention.py
        # --triton at batches 120 and 224).
        warps = self.num_warps or (2 if dim <= 64 else 4)
        use_pdl = pdl.enabled(q.device, batch)
        line = 128 // k_cache.element_size()  # elements of a 128-byte line
        _decode_kernel[(batch, kv_heads, splits)](
            q, k_cache, v_cache, out, block_table, seqused_k, part_out, part_lse, scale,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            out.stride(0), out.stride(1), block_table.stride(0),
            GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=dim,
            DIM_PAD=dim_pad, PAGE=page, BLOCK_N=self.block_n, NUM_SPLITS=splits, LINE=line,
            LINES=max(1, dim_pad // line), PDL=use_pdl, num_warps=warps,
            num_stages=self.num_stages, **pdl.launch_options(use_pdl))
        if splits > 1:
            _merge_kernel[(batch, num_heads)](part_out, part_lse, out, out.stride(0),
                                              out.stride(1), num_heads, HEAD_DIM=dim,
                                              DIM_PAD=dim_pad, NUM_SPLITS=splits, PDL=use_pdl,
                                              **pdl.launch_options(use_pdl))
        return out
