"""Products of 1-16 rows (small decode batches) as Triton matrix-vector kernels (`--gemv`,
off by default: see "Measured" below).

At batch 1 a decode step only streams its weights, and how close it gets to the copy rate is
up to each product's kernel. cuBLAS on the H100 (Llama-3.1-8B shape, batch 1) reads the gate/up
weights at ~3.0 TB/s, but QKV and down through split-K plus a reduction kernel and O at
~2.2 TB/s; the gate/up product is followed by a separate SiLU x up, and each product by the
next layer's residual add and RMSNorm. Here each program owns BLOCK_N output features over the
whole of K, so nothing is reduced afterwards; the gate/up product applies SiLU(gate) x up to
its float32 accumulators before it stores (a program owns the gate and the up rows of the same
features); and `qkv_rotary` follows the QKV product with rotary and the K/V cache write in the
same kernel.

The norms between the products (two per layer, each a kernel of ~2.9 µs and a gap on the
H100: 0.19 ms of the 8B's 5.6 ms step at batch 1) go inside them (in the steps takes_folded
takes: 1-16 rows). RMSNorm(s) * g read by a product W is (s W'^T) / rms(s) with
W' = W * g: so the model folds each norm's weight into the product after it
(LlamaForCausalLM.fold_norms), the product before the norm adds the residual as it stores
(`added_product`), and the product after it scales its accumulators by 1 / rms
(`product(..., norm_eps=)`). One row sums the squares of the inputs it reads anyway. Over
2-16 rows the added product sums the squares of the rows it stores, per program, and the
product after it loads those sums before its loop and adds them up after it: its loop stays
the plain product's. No bytes beyond a plain product's, and every program sums the same
values in the same order, so the result repeats.

Slower forms, on the H100 (8B): the whole norm inside the product that reads it (its
programs read the residual and the norm's weight too: 2.5 and 8.6 µs over plain for QKV and
gate/up at one row); the added product's shares summed by the last of its programs behind a
GPU-scope atomic ticket (at one row, 2,048 of them, slower than the norm); and over 2-16
rows, each program of the normed product summing the squares of its own x (2 rows, plain
19.6 µs QKV and 78.5 gate/up): from x's tile in shared memory, 48.2 and 97.0 (a second
reader in another layout left the tile unswizzled), as x x^T through a second tl.dot, 32.5
and 88.9, from x loaded again, 21.5 and 85.0 (that load is not pipelined). From the added
product's sums: 20.1 and 79.0.

One row: products and a sum along K (no tensor cores: the weight's bytes are the cost). 2-16
rows: `tl.dot` over 16 rows (the smallest tile it takes), the missing rows masked to zero.
(The one-row form over 2-16 rows, [rows, BLOCK_N, BLOCK_K] partial sums on the CUDA cores,
was slower than tl.dot at 2 and 8 rows for every 8B projection on the H200.)

Measured on the H100 (docs/benchmarks.md): per projection at one row 5-15% faster than cuBLAS
(8B QKV 18.7 vs 19.7 µs, O 13.1 vs 15.3, gate/up with SiLU x up 74.8 vs 77.2 without, down
38.7 vs 41.9); at 2-16 rows within ~5% of it either way. Whole steps (`--pdl` and the norms
inside): the 8B at batch 1 6.07 -> 5.46 ms, at 2-16 rows 6.36-6.84 -> 5.73-6.22 ms. On the
H200 (an older tree) the 1B at batch 1 836 -> 898 tok/s, the 8B unchanged at ~206. Off by
default until the whole GPU suite has run with it on (issue 24).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from shard import pdl

MAX_ROWS = 16  # more rows: cuBLAS (and quack's tiles from 96 rows)
DOT_ROWS = 16  # tl.dot's smallest tile


@triton.jit
def _load(pointers, mask, MASKED: tl.constexpr):
    """tl.load, masked to zero if MASKED (unmasked where the tiles divide the sizes: loads
    along K stay vectorized)."""
    if MASKED:
        return tl.load(pointers, mask=mask, other=0.0)
    return tl.load(pointers)


@triton.jit
def _prefetch_l2(row_ptrs, feature_ok, K, BLOCK_K: tl.constexpr):
    """Ask L2 for the first BLOCK_K inputs of these weight rows ([BLOCK_N, 1] pointers): one
    prefetch per 128-byte line of 16-bit weights, nothing held in registers."""
    LINES: tl.constexpr = BLOCK_K // 64
    if LINES > 0:  # tiles narrower than a line (small test models) go without
        lines = tl.arange(0, LINES) * 64
        pdl.prefetch_l2(row_ptrs + lines[None, :], feature_ok[:, None] & (lines < K)[None, :])


@triton.jit
def _weight_tile(gate_rows, up_rows, k, w_ok, GATED: tl.constexpr, MASKED: tl.constexpr):
    """The [BLOCK_N, BLOCK_K] tile of the weight's rows at inputs k (and of the up rows)."""
    gate = _load(gate_rows + k[None, :], w_ok, MASKED)
    if GATED:
        up = _load(up_rows + k[None, :], w_ok, MASKED)
    else:
        up = gate  # unread (the compiler drops it)
    return gate, up


@triton.jit
def _row_step(acc, acc_up, squares, gate_rows, up_rows, feature_ok, x_ptr, k, k_ok,
              GATED: tl.constexpr, SCALED: tl.constexpr, EVEN: tl.constexpr):
    """One row, one tile along K: partial products (and the row's squares if SCALED), summed
    along K at the end."""
    x = _load(x_ptr + k, k_ok, not EVEN).to(tl.float32)
    gate, up = _weight_tile(gate_rows, up_rows, k, feature_ok[:, None] & k_ok[None, :], GATED,
                            not EVEN)
    acc += gate.to(tl.float32) * x[None, :]
    if GATED:
        acc_up += up.to(tl.float32) * x[None, :]
    if SCALED:
        squares += x * x
    return acc, acc_up, squares


@triton.jit
def _dot_step(y, up_y, gate_rows, up_rows, feature_ok, x_ptr, row, row_ok, stride_x, k, K,
              GATED: tl.constexpr, EVEN: tl.constexpr):
    """ROWS rows, one tile along K, through tl.dot."""
    k_ok = (k < K)[None, :]
    x = _load(x_ptr + row[:, None] * stride_x + k[None, :], row_ok[:, None] & k_ok, True)
    gate, up = _weight_tile(gate_rows, up_rows, k, feature_ok[:, None] & k_ok, GATED, not EVEN)
    y = tl.dot(x, tl.trans(gate), y)
    if GATED:
        up_y = tl.dot(x, tl.trans(up), up_y)
    return y, up_y


@triton.jit
def _ready(gate_rows, up_rows, feature_ok, K, GATED: tl.constexpr, BLOCK_K: tl.constexpr,
           PDL: tl.constexpr):
    """The wait for the previous kernel (pdl.py), with PDL after asking L2 for the first tile
    of the weight rows at gate_rows (and at up_rows if GATED): on its way while that kernel
    ends."""
    if PDL:
        _prefetch_l2(gate_rows, feature_ok, K, BLOCK_K)
        if GATED:
            _prefetch_l2(up_rows, feature_ok, K, BLOCK_K)
    pdl.wait(PDL)


@triton.jit
def _products(x_ptr, gate_rows, up_rows, feature_ok, eps, rows, K, stride_x, sq_ptr, parts,
              GATED: tl.constexpr, SCALED: tl.constexpr, ROWS: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PARTS: tl.constexpr,
              EVEN: tl.constexpr):
    """[ROWS, BLOCK_N] float32 products of x's rows with the weight rows at gate_rows (and at
    up_rows if GATED), over all K inputs; after _ready. SCALED: of RMSNorm(x) (its weight
    folded into the weight rows): each row's products times 1 / RMS of the row. One row sums
    the squares of the inputs it reads anyway; 2-16 rows take them from the added product
    that wrote x (`parts` [programs, ROWS] sums at sq_ptr, PARTS their power-of-two ceiling;
    see _gemv_kernel)."""
    inner = tl.arange(0, BLOCK_K)
    if ROWS == 1:
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        acc_up = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        squares = tl.zeros([BLOCK_K], tl.float32)
        for start in range(0, K, BLOCK_K):
            k = start + inner
            acc, acc_up, squares = _row_step(acc, acc_up, squares, gate_rows, up_rows,
                                             feature_ok, x_ptr, k, k < K, GATED, SCALED, EVEN)
        y = tl.sum(acc, axis=1)[None, :]
        up_y = tl.sum(acc_up, axis=1)[None, :]
        sums = tl.sum(squares, axis=0)
    else:
        row = tl.arange(0, ROWS)
        row_ok = row < rows
        if SCALED:  # loaded before the loop, summed after it: the load's wait is hidden
            part = tl.arange(0, PARTS)
            shares = tl.load(sq_ptr + part[:, None] * ROWS + row[None, :],
                             mask=(part < parts)[:, None] & row_ok[None, :], other=0.0)
        y = tl.zeros([ROWS, BLOCK_N], tl.float32)
        up_y = tl.zeros([ROWS, BLOCK_N], tl.float32)
        for start in range(0, K, BLOCK_K):
            y, up_y = _dot_step(y, up_y, gate_rows, up_rows, feature_ok, x_ptr, row, row_ok,
                                stride_x, start + inner, K, GATED, EVEN)
        if SCALED:
            sums = tl.sum(shares, axis=0)[:, None]
    if SCALED:  # RMSNorm's 1 / RMS, in float32 as the norm computes it
        scale = tl.rsqrt(sums / K + eps)
        y = y * scale
        up_y = up_y * scale
    return y, up_y


# The row count varies from step to step; one compiled kernel serves 2-16 of them.
@triton.jit(do_not_specialize=["rows"])
def _gemv_kernel(x_ptr, w_ptr, out_ptr, res_ptr, sq_ptr, eps, rows, N, K, stride_x, stride_w,
                 parts, GATED: tl.constexpr, SCALED: tl.constexpr, ADDED: tl.constexpr,
                 ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 PARTS: tl.constexpr, EVEN: tl.constexpr, PDL: tl.constexpr):
    """out[:rows, n] = x[:rows] . w[n] for this program's BLOCK_N features n < N; GATED:
    SiLU(x . w[n]) * (x . w[N + n]) (w holds [gate; up], N features each). SCALED: the
    products of RMSNorm(x) (_products). ADDED: out = residual + the product, rounded as the
    separate add rounds it; of 2-16 rows it also stores each row's sum of squares over this
    program's features at sq_ptr[program, row], for the product of RMSNorm(out) after it.
    out (and the residual) [rows, N] contiguous. EVEN: the tiles
    divide N and K, so nothing along them is masked. PDL (shard/pdl.py): launched early, the
    program asks for its first tile of weights before it waits for the previous kernel."""
    pdl.launch_next(PDL)
    pid = tl.program_id(0)
    features = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    feature_ok = features < N
    gate_rows = w_ptr + features[:, None] * stride_w
    up_rows = gate_rows + N * stride_w
    _ready(gate_rows, up_rows, feature_ok, K, GATED, BLOCK_K, PDL)
    out_row = tl.arange(0, ROWS)
    at = out_row[:, None] * N + features[None, :]
    ok = (out_row < rows)[:, None] & feature_ok[None, :]
    if ADDED:  # asked for before the loop: its wait is hidden behind the weights'
        residual = tl.load(res_ptr + at, mask=ok, other=0.0)
    y, up_y = _products(x_ptr, gate_rows, up_rows, feature_ok, eps, rows, K, stride_x, sq_ptr,
                        parts, GATED, SCALED, ROWS, BLOCK_N, BLOCK_K, PARTS, EVEN)
    if GATED:
        y = y / (1.0 + tl.exp(-y)) * up_y
    out_type = out_ptr.dtype.element_ty
    y = y.to(out_type)
    if ADDED:
        y = (residual.to(tl.float32) + y.to(tl.float32)).to(out_type)
        if ROWS > 1:
            stored = tl.where(ok, y.to(tl.float32), 0.0)
            tl.store(sq_ptr + pid * ROWS + out_row, tl.sum(stored * stored, axis=1))
    tl.store(out_ptr + at, y, mask=ok)


@triton.jit(do_not_specialize=["rows"])
def _qkv_rotary_kernel(x_ptr, w_ptr, q_ptr, k_ptr, v_ptr, pos_ptr, cos_ptr, sin_ptr, slot_ptr,
                       sq_ptr, eps, rows, K, stride_x, stride_w, stride_slot, num_heads,
                       num_kv_heads, parts, ROWS: tl.constexpr, PAIRS: tl.constexpr,
                       BLOCK_K: tl.constexpr, HALF: tl.constexpr, SCALED: tl.constexpr,
                       PARTS: tl.constexpr, EVEN: tl.constexpr, PDL: tl.constexpr):
    """The QKV product, rotary and the cache write in one: this program's PAIRS pairs of
    features (j, j + HALF) of one head (HALF % PAIRS == 0), the two halves accumulated as the
    gated product's gate and up rows. Each pair is rounded as the product's output is, then
    rotated in float32 as shard/rotary_cache.py does (query and key heads); queries go to q
    ([rows, num_heads, 2 * HALF]), keys and values to their slots in the caches. SCALED: of
    RMSNorm(x), as in _gemv_kernel. The rows' positions, slots and rotary factors are read
    before the wait (pdl.py), so that nothing after the loop waits on memory but the store."""
    pdl.launch_next(PDL)
    pid = tl.program_id(0)
    head = pid * PAIRS // HALF
    j = pid * PAIRS % HALF + tl.arange(0, PAIRS)
    first_rows = w_ptr + (head * 2 * HALF + j)[:, None] * stride_w
    feature_ok = j < HALF  # every pair is whole: PAIRS divides HALF
    token = tl.arange(0, ROWS)
    token_ok = (token < rows)[:, None]
    pos = tl.load(pos_ptr + token, mask=token < rows, other=0).to(tl.int64)[:, None]
    c = tl.load(cos_ptr + pos * HALF + j[None, :], mask=token_ok, other=0.0)
    s = tl.load(sin_ptr + pos * HALF + j[None, :], mask=token_ok, other=0.0)
    slot = tl.load(slot_ptr + token, mask=token < rows, other=0).to(tl.int64)[:, None]
    _ready(first_rows, first_rows + HALF * stride_w, feature_ok, K, True, BLOCK_K, PDL)
    y1, y2 = _products(x_ptr, first_rows, first_rows + HALF * stride_w, feature_ok, eps, rows,
                       K, stride_x, sq_ptr, parts, True, SCALED, ROWS, PAIRS, BLOCK_K, PARTS,
                       EVEN)
    out_type = q_ptr.dtype.element_ty
    y1 = y1.to(out_type).to(tl.float32)  # the product's output, as the separate path rounds it
    y2 = y2.to(out_type).to(tl.float32)
    dims = 2 * HALF
    if head < num_heads + num_kv_heads:  # queries and keys rotate
        y1, y2 = y1 * c - y2 * s, y2 * c + y1 * s
    if head < num_heads:
        out = q_ptr + token.to(tl.int64)[:, None] * num_heads * dims + head * dims + j[None, :]
    else:
        if head < num_heads + num_kv_heads:
            out = k_ptr + slot * stride_slot + (head - num_heads) * dims + j[None, :]
        else:
            out = v_ptr + slot * stride_slot + (head - num_heads - num_kv_heads) * dims \
                + j[None, :]
    tl.store(out, y1.to(out_type), mask=token_ok)
    tl.store(out + HALF, y2.to(out_type), mask=token_ok)


# One-row plain products (neither gated nor rotary) of at most this many inputs and outputs
# take 4 features a program, not 2 (0: none). That is the O projections and the 1B's down; not
# the LM head (128k outputs) nor the 8B's down (14,336 inputs: 38.7 µs in 2 x 2,048, its
# floor). benchmarks/gemv.py's sweep on the H100, one row, plain, µs: the 1B's O 4.0 in 4 x
# 2,048 and 4 warps against 5.3 in 2 x 2,048 and 8; its down 12.8 against 13.5 (8 warps both);
# the 8B's O 12.2 against 13.1 (8 warps both). Read when `config` first meets a shape (it
# caches): a study sets it before the first step.
WIDE_ONE_ROW_MAX = 8192


@functools.cache
def config(rows: int, inner: int, gated: bool, rotary: bool = False, normed: bool = False,
           gpu: str = "", features: int = 0) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages) for `rows` rows of `inner` inputs on the GPU
    of that name: the fastest of benchmarks/gemv.py's sweep on the H100 (one row: 2 features
    x up to 2,048 inputs, 8 warps, 4 for the gated product; 2-16: 32 x 256 in 4 stages,
    within 2% of the best for the 8B's O, gate/up and down, not among the four best for its
    QKV). On an H200 the gated product of 2-16 rows takes 64 inputs a tile: there the 8B's
    gate/up ran in 56.2 µs at 32 x 64 against 59.3 at 32 x 256 (2 rows; 56.8 and 59.4 at 8),
    where the H100 took 84.9 against 80.2 (2 rows). `rotary`: qkv_rotary's, whose one-row
    kernel is the gated one's and whose 2-16-row one keeps 256. `normed` (the product of
    RMSNorm(x)): the gated one of one row over more than 2,048 inputs takes 8 features x
    1,024 inputs in 8 warps, 77.6 µs for the 8B's gate/up on the H100 against 84.2 in the
    plain product's tiles (which run the plain one in 74.8); over up to 2,048, 4 x 2,048 in
    4 warps, the 1B's fastest (23.8 µs; 8 x 1,024 was not among its four best, all 24.9 or
    slower). The ungated product of 2-16 rows over more than 8,192 inputs (the 8B's down)
    takes 32 x 512 in 3 stages: as the added product, 41.7 µs against 42.2 in 32 x 256 at 8
    rows, 42.0 against 42.4 at 16 (and 41.5 against 42.0 at 2), on the H100. `features`: the
    product's outputs (one row, plain: WIDE_ONE_ROW_MAX). qkv_rotary of one row over up to
    2,048 inputs (the 1B's) takes 4 feature pairs x 1,024 inputs in 4 warps (rotary_tiles):
    5.91 µs for the 1B's, of RMSNorm(x) as its steps run it, against 6.82 in 2 pairs x 2,048
    (6.28 in 4 x 2,048, 6.67 in 2 x 1,024; gemv.py's sweep on the H100). Over more inputs (the
    8B's 4,096, not swept yet) it keeps 2 pairs x 2,048."""
    if rows == 1:
        if rotary and inner <= 2048:
            return 4, min(1024, triton.next_power_of_2(inner)), 4, 1
        if gated and normed:
            if inner > 2048:
                return 8, 1024, 8, 1
            return 4, triton.next_power_of_2(inner), 4, 1
        if not (gated or rotary) and 0 < features and max(inner, features) <= WIDE_ONE_ROW_MAX:
            return 4, min(2048, triton.next_power_of_2(inner)), 4 if inner <= 2048 else 8, 1
        return (_features(rows), min(2048, triton.next_power_of_2(inner)),
                4 if gated or rotary else 8, 1)
    if not (gated or rotary) and inner > 8192:
        return _features(rows), 512, 4, 3
    return _features(rows), 64 if gated and "H200" in gpu else 256, 4, 4


@functools.cache
def gpu_name(device: torch.device) -> str:
    """The name `config` picks tiles by: the CUDA device's, else empty."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else ""


def _features(rows: int) -> int:
    """BLOCK_N, the output features per program, of `config`'s tiles."""
    return 2 if rows == 1 else 32


def takes(rows: int) -> bool:
    """Whether a step of `rows` rows runs its products here."""
    return 1 <= rows <= MAX_ROWS


# The most rows whose steps run the norms inside the products (added_product and the scaled
# ones; norms folded). The module's docstring gives what the 2-16-row products of RMSNorm(x)
# cost in each way they were tried.
FOLDED_MAX_ROWS = 16


def takes_folded(rows: int) -> bool:
    """Whether a step of `rows` rows runs its norms inside the products (models whose norms
    are folded)."""
    return 1 <= rows <= min(FOLDED_MAX_ROWS, MAX_ROWS)


def product(x: torch.Tensor, weight: torch.Tensor, gated: bool, norm_eps: float | None = None,
            squares: torch.Tensor | None = None, out: torch.Tensor | None = None, **tuning
            ) -> torch.Tensor:
    """x W^T ([rows, N]), or SiLU(x W_gate^T) x (x W_up^T) ([rows, N/2]) when `gated`, for
    2-D x of 1..MAX_ROWS rows with a unit stride along K; into `out` (contiguous) if given.
    With `norm_eps`, the product of
    RMSNorm(x) of that eps instead: each row of x scaled by 1 / sqrt(mean(x^2) + eps), the
    norm's weight folded into `weight` (LlamaForCausalLM.fold_norms); over 2-16 rows x must
    come from added_product, and `squares` be the sums it returned with it. `tuning`
    (benchmarks): `block` (BLOCK_N, BLOCK_K, warps, stages) in place of `config`'s, `dot`
    (tl.dot's kernel for one row too), `use_pdl` in place of pdl.enabled."""
    shape = (x.shape[0], weight.shape[0] // 2 if gated else weight.shape[0])
    if out is None:
        out = x.new_empty(shape)
    assert out.shape == shape and out.is_contiguous()
    _launch(x, weight, out, gated, norm_eps, None, squares, **tuning)
    return out


def scaled_product(x: torch.Tensor, weight: torch.Tensor, eps: float, gated: bool,
                   squares: torch.Tensor | None) -> torch.Tensor:
    """product(x, weight, gated, norm_eps=eps, squares=squares): Ops.scaled_linear."""
    return product(x, weight, gated, norm_eps=eps, squares=squares)


def added_product(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor, **tuning
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(residual + x W^T, squares): the sum rounded as adding the separate product rounds it,
    for contiguous residual [rows, N]: the O or down product with the residual add after it,
    in one kernel (the next norm is a scale inside the products that read the result).
    `squares`, from tl.dot's kernel (2-16 rows): each program's sums of the squares of the
    rows it stored ([programs, 16] float32), what the products of RMSNorm(sum) take in place
    of summing the squares themselves; None from the one-row kernel."""
    assert residual.shape == (x.shape[0], weight.shape[0]) and residual.is_contiguous()
    out = torch.empty_like(residual)
    return out, _launch(x, weight, out, False, None, residual, None, **tuning)


def _launch(x, weight, out, gated, norm_eps, residual, squares, block=None, dot=None,
            use_pdl=None):
    """Runs _gemv_kernel; returns the added product's squares (None from one row's kernel)."""
    rows, inner = x.shape
    features = out.shape[1]
    block_n, block_k, warps, stages = block or config(
        rows, inner, gated, normed=norm_eps is not None, gpu=gpu_name(x.device),
        features=features)
    if dot is None:
        dot = rows > 1
    if use_pdl is None:
        use_pdl = pdl.enabled(x.device, rows)
    programs = triton.cdiv(features, block_n)
    if residual is not None and dot:
        squares = torch.empty(programs, DOT_ROWS, dtype=torch.float32, device=x.device)
    else:
        squares = _squares_read(norm_eps, squares, dot)
    sq, parts, parts_block = _squares_args(squares, out)
    _gemv_kernel[(programs,)](
        x, weight, out, x if residual is None else residual, sq,
        0.0 if norm_eps is None else norm_eps, rows, features, inner, x.stride(0),
        weight.stride(0), parts, GATED=gated, SCALED=norm_eps is not None,
        ADDED=residual is not None, ROWS=DOT_ROWS if dot else 1, BLOCK_N=block_n,
        BLOCK_K=block_k, PARTS=parts_block,
        EVEN=features % block_n == 0 and inner % block_k == 0, PDL=use_pdl, num_warps=warps,
        num_stages=stages, **pdl.launch_options(use_pdl))
    return squares if residual is not None else None


def _squares_read(norm_eps, squares, dot):
    """The squares a product reads: an added product's, for tl.dot's kernel of RMSNorm(x)."""
    if norm_eps is None or not dot:
        return None
    assert squares is not None and squares.shape[1] == DOT_ROWS, \
        "2-16 rows of RMSNorm(x) take the squares added_product returned with x"
    return squares


def _squares_args(squares: torch.Tensor | None, placeholder: torch.Tensor
                  ) -> tuple[torch.Tensor, int, int]:
    """The kernels' sq_ptr, parts and PARTS for `squares` (the placeholder's pointer, unread,
    for none): the tensor, how many programs' sums it holds, and that count's power-of-two
    ceiling."""
    if squares is None:
        return placeholder, 1, 1
    return squares, squares.shape[0], triton.next_power_of_2(squares.shape[0])


def _pairs(features: int, head_dim: int) -> int:
    """Feature pairs (j, j + head_dim / 2) per program of the fused QKV + rotary kernel whose
    tiles take `features` a program: that many, cut to divide the half head."""
    return math.gcd(features, head_dim // 2)


def rotary_tiles(rows: int, inner: int, head_dim: int, gpu: str = ""
                 ) -> tuple[int, int, int, int]:
    """qkv_rotary's (feature pairs a program, BLOCK_K, num_warps, num_stages): config's
    features a program, cut to pairs that divide the half head."""
    block_n, block_k, warps, stages = config(rows, inner, gated=False, rotary=True, gpu=gpu)
    return _pairs(block_n, head_dim), block_k, warps, stages


def takes_rotary(rows: int, head_dim: int) -> bool:
    """Whether a step of `rows` rows runs its QKV product, rotary and cache write as one
    kernel (qkv_rotary): the rows takes() serves, and at 2-16 rows pairs enough for tl.dot."""
    return takes(rows) and (rows == 1 or _pairs(_features(rows), head_dim) >= DOT_ROWS)


def qkv_rotary(x: torch.Tensor, weight: torch.Tensor, positions: torch.Tensor,
               cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor, slot_mapping: torch.Tensor, num_heads: int,
               num_kv_heads: int, head_dim: int, out: torch.Tensor | None = None,
               norm_eps: float | None = None, squares: torch.Tensor | None = None,
               use_pdl: bool | None = None, block: tuple[int, int, int, int] | None = None
               ) -> torch.Tensor:
    """q [T, Hq, D] rotated (into `out` if given); keys rotated and values in their cache
    slots: the QKV product x W^T (weight [(Hq + 2 Hkv) D, hidden]) followed by
    rotary_cache.rotary_into_cache, in one kernel, for x of 1..MAX_ROWS rows. `norm_eps`: of
    RMSNorm(x), and `squares` with it, as in `product`. `block`: (feature pairs a program,
    BLOCK_K, num_warps, num_stages) of one row, in place of config's (benchmarks/gemv.py's
    sweep)."""
    rows, inner = x.shape
    q = out if out is not None else x.new_empty(rows, num_heads, head_dim)
    assert q.is_contiguous() and x.stride(1) == 1, "rows must be dense"
    half = head_dim // 2
    if block is None:
        pairs, block_k, warps, stages = rotary_tiles(rows, inner, head_dim, gpu_name(x.device))
    else:
        assert rows == 1 and half % block[0] == 0, "one row, pairs that divide the half head"
        pairs, block_k, warps, stages = block
    if use_pdl is None:
        use_pdl = pdl.enabled(x.device, rows)
    squares = _squares_read(norm_eps, squares, rows > 1)
    k_slots = k_cache.view(-1, num_kv_heads, head_dim)
    v_slots = v_cache.view(-1, num_kv_heads, head_dim)
    sq, parts, parts_block = _squares_args(squares, q)
    _qkv_rotary_kernel[((num_heads + 2 * num_kv_heads) * half // pairs,)](
        x, weight, q, k_slots, v_slots, positions, cos, sin, slot_mapping, sq,
        0.0 if norm_eps is None else norm_eps, rows, inner, x.stride(0), weight.stride(0),
        k_slots.stride(0), num_heads, num_kv_heads, parts, ROWS=1 if rows == 1 else DOT_ROWS,
        PAIRS=pairs, BLOCK_K=block_k, HALF=half, SCALED=norm_eps is not None,
        PARTS=parts_block, EVEN=inner % block_k == 0, PDL=use_pdl, num_warps=warps,
        num_stages=stages, **pdl.launch_options(use_pdl))
    return q


def small_rows(larger: Callable = F.linear, fewest: int = 1, use_pdl: bool | None = None
               ) -> Callable:
    """F.linear's signature: products of `fewest`..MAX_ROWS rows here, the others through
    `larger`. With `out` (the LM head's: ops.linear_into), into it: `larger` must take it
    too. `use_pdl`: product's (None: as pdl.enabled says)."""

    def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               **into) -> torch.Tensor:
        if (bias is not None or x.dim() != 2 or x.shape[0] < fewest or not takes(x.shape[0])
                or x.stride(1) != 1):
            return larger(x, weight, bias, **into)
        return product(x, weight, gated=False, use_pdl=use_pdl, **into)

    linear.larger = larger
    return linear


def swiglu_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """SiLU(x W_gate^T) x (x W_up^T) for weight = [W_gate; W_up], x of 1..MAX_ROWS rows."""
    return product(x, weight, gated=True)


def warm_up(weights: list[torch.Tensor], gated: torch.Tensor | None,
            rotary: tuple | None = None, folded: bool = False) -> None:
    """Compile every kernel a step may launch (one row and the dot path; plain and gated;
    with `folded` (the model's norms folded, LlamaForCausalLM.fold_norms) also scaled and
    added; and with `rotary` = (QKV weight, cos, sin, heads, kv heads, head dim) qkv_rotary)
    before graphs capture: Triton compiles on a first call, seconds mid-serving."""
    for rows in (1, 2):
        for weight, is_gated in [(w, False) for w in weights] + [(gated, True)] * (
                gated is not None):
            x = weight.new_zeros(rows, weight.shape[1])
            product(x, weight, is_gated)
            if folded:
                product(x, weight, is_gated, norm_eps=1e-5, squares=_no_squares(x))
                if not is_gated:
                    added_product(x, weight, x.new_zeros(rows, weight.shape[0]))
        if rotary is not None and takes_rotary(rows, rotary[5]):
            weight, cos, sin, heads, kv_heads, head_dim = rotary
            cache = weight.new_zeros(1, rows, kv_heads, head_dim)
            # int64 positions and slots, as a step's batch carries them (Triton specializes
            # on the pointers' types).
            where = torch.zeros(rows, dtype=torch.int64, device=weight.device)
            for norm_eps in [None] + [1e-5] * folded:
                x = weight.new_zeros(rows, weight.shape[1])
                qkv_rotary(x, weight, where, cos, sin, cache, cache.clone(), where, heads,
                           kv_heads, head_dim, norm_eps=norm_eps,
                           squares=None if norm_eps is None else _no_squares(x))


def squares_parts(width: int, rows: int) -> int:
    """How many programs' sums of squares added_product returns with a stream `width` wide of
    2-16 rows: one per BLOCK_N features of its tiles."""
    return triton.cdiv(width, _features(rows))


def _no_squares(x: torch.Tensor) -> torch.Tensor | None:
    """Zero squares in the shape added_product returns with a stream like x (None for one
    row): what warm_up's products of RMSNorm(x) compile with."""
    if x.shape[0] == 1:
        return None
    return torch.zeros(squares_parts(x.shape[1], x.shape[0]), DOT_ROWS, dtype=torch.float32,
                       device=x.device)
