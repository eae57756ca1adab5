"""The decoder's elementwise stages as plain functions, run eagerly or compiled.

Eagerly each stage is a handful of small kernels (RMSNorm alone is eight: add, upcast, square,
mean, rsqrt, two products, downcast), and on a GPU at small batch those launches cost more than
the matrix products they sit between. Compiled by torch.compile (Inductor), each stage becomes one
fused kernel over the same arithmetic: same inputs, same float32 intermediates, same outputs.

`--compile auto` compiles on CUDA only: on CPU the stages are a small share of a step and
Inductor's C++ build would add tens of seconds to every start.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from shard import fused_mlp as quack_mlp
from shard.attention import write_kv


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of x + residual, and x + residual itself (the next residual)."""
    x = x + residual
    return rms_norm(x, weight, eps), x


def rotary(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           num_heads: int, num_kv_heads: int, head_dim: int):
    """Split a fused QKV projection [T, (Hq + 2 Hkv) D] into q [T, Hq, D], k, v [T, Hkv, D] and
    rotate q and k (rotate-half, cos/sin tables [positions, D/2] indexed by position)."""
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim,
                         num_kv_heads * head_dim], dim=-1)
    c, s = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)

    def rotate(x: torch.Tensor, heads: int) -> torch.Tensor:
        x1, x2 = x.reshape(-1, heads, head_dim).float().chunk(2, dim=-1)
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(qkv.dtype)

    return rotate(q, num_heads), rotate(k, num_kv_heads), v.reshape(-1, num_kv_heads, head_dim)


def rotary_then_write(rotate: Callable) -> Callable:
    """ops.rotary (eager or compiled), then the new keys and values into their cache slots."""

    def rotary_into_cache(qkv, positions, cos, sin, k_cache, v_cache, slot_mapping,
                          num_heads: int, num_kv_heads: int, head_dim: int,
                          out: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = rotate(qkv, positions, cos, sin, num_heads, num_kv_heads, head_dim)
        write_kv(k_cache, v_cache, slot_mapping, k, v)
        return q if out is None else out.copy_(q)

    return rotary_into_cache


def linear_into(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, into `out` when given (no bias then): the LM head's product, which writes
    the decode graphs' logits buffer directly."""
    if out is None:
        return F.linear(x, weight, bias)
    assert bias is None
    return torch.mm(x, weight.t(), out=out)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


# With --gemv, the LM head's products of HEAD_FEWEST_ROWS-16 rows go through gemv.py's kernel,
# launched with PDL as pdl.enabled says unless HEAD_PDL is False (profile_step.py's studies set
# both). Without PDL: alone the kernel reads the 1B's head at one row in 172 µs against
# cuBLAS's 187, but launched with PDL (64k programs of two features each) it took the 1B's
# batch-1 step from 1.10 to 1.17 ms; launched plainly, to 1.09 (H100, gpu.sh studies, one
# sitting). Past one row PDL is off anyway (pdl.MAX_ROWS).
HEAD_FEWEST_ROWS = 1
HEAD_PDL: bool | None = False


@dataclass(frozen=True, slots=True)
class Ops:
    rms_norm: Callable
    add_rms_norm: Callable
    silu_mul: Callable
    # q rotated; k rotated and v written to their cache slots (what a layer calls).
    rotary_into_cache: Callable
    compiled: bool
    fused_rotary: bool
    # Which of --fused-mlp, --decode-gemm and --gemv the products below include (warm-up
    # compiles their kernels).
    fused_mlp: bool = False
    decode_gemm: bool = False
    gemv: bool = False
    # (x, gate_up weight) -> SiLU(gate) × up in one product, for the steps whose row count
    # swiglu_rows takes; None: always gate/up, then silu_mul.
    swiglu_linear: Callable | None = None
    swiglu_rows: Callable[[int], bool] = quack_mlp.fuses
    # F.linear's signature: what the QKV, O, gate/up and down products call.
    linear: Callable = F.linear
    # linear_into's (F.linear's and out=): the LM head's product.
    head_linear: Callable = linear_into
    # With the norms folded into the products after them (LlamaForCausalLM.load_weights),
    # for steps whose row count folded_rows takes: (x, weight, residual) -> (residual +
    # x W^T, its rows' squares summed in parts or None), the O and down products; (x, weight,
    # eps, gated, those squares) -> the product of RMSNorm(x), QKV and gate/up. None: norms
    # stay separate.
    added_linear: Callable | None = None
    scaled_linear: Callable | None = None
    folded_rows: Callable[[int], bool] = bool
    # (x, QKV weight, positions, cos, sin, k cache, v cache, slots, heads, kv heads, head dim,
    # out=, norm_eps=, squares=) -> q: the QKV product and rotary_into_cache in one kernel,
    # for steps that qkv_rotary_rows(rows, head_dim) takes; None: the product, then
    # rotary_into_cache.
    qkv_rotary: Callable | None = None
    qkv_rotary_rows: Callable[[int, int], bool] = lambda rows, head_dim: False

    @classmethod
    def build(cls, compiled: bool, fused_rotary: bool = False, fused_mlp: bool = False,
              decode_gemm: bool = False, gemv: bool = False) -> "Ops":
        """fused_rotary: rotary_into_cache is one Triton kernel (shard/rotary_cache.py, CUDA);
        otherwise the rotary stage followed by two index copies. fused_mlp: gate/up products apply
        SiLU × up in their epilogue, in the steps shard/fused_mlp.py's `fuses` names (quack,
        Hopper). decode_gemm: decode batches' products in quack's narrow tiles where
        shard/decode_gemm.py's `takes` says so (Hopper). gemv: products of 1-16 rows in Triton
        matrix-vector kernels, the gate/up one with SiLU × up applied, the QKV one (with
        fused_rotary) with rotary and the cache write, and the residual adds and norms able
        to go inside the products around them (shard/gemv.py, CUDA)."""
        stage = compile_stage if compiled else (lambda fn: fn)
        if fused_rotary:
            from shard.rotary_cache import rotary_into_cache  # imports Triton: CUDA only
        else:
            rotary_into_cache = rotary_then_write(stage(rotary))
        gated = []  # (row counts, their product with SiLU × up), the first that takes a step
        if gemv:
            from shard import gemv as small
            gated.append((small.takes, small.swiglu_linear))
        if fused_mlp:
            gated.append((quack_mlp.fuses, quack_mlp.swiglu_linear))
        swiglu_rows, swiglu_linear = _first_of(gated)
        linear = F.linear
        if decode_gemm:
            from shard.decode_gemm import linear
        small_ops = {}
        if gemv:
            linear = small.small_rows(linear)
            small_ops = dict(head_linear=small.small_rows(linear_into, HEAD_FEWEST_ROWS,
                                                          HEAD_PDL),
                             added_linear=small.added_product,
                             scaled_linear=small.scaled_product,
                             folded_rows=small.takes_folded)
            if fused_rotary:  # --fused-rotary off keeps rotary a stage of its own
                small_ops.update(qkv_rotary=small.qkv_rotary, qkv_rotary_rows=small.takes_rotary)
        return cls(stage(rms_norm), stage(add_rms_norm), stage(silu_mul), rotary_into_cache,
                   compiled=compiled, fused_rotary=fused_rotary, fused_mlp=fused_mlp,
                   decode_gemm=decode_gemm, gemv=gemv, swiglu_linear=swiglu_linear,
                   swiglu_rows=swiglu_rows, linear=linear, **small_ops)


def _first_of(routes: list[tuple[Callable, Callable]]) -> tuple[Callable, Callable | None]:
    """One (rows -> bool, product) pair for the gated products: a step goes to the first
    route whose row counts take it."""
    if len(routes) <= 1:
        return routes[0] if routes else (quack_mlp.fuses, None)

    def rows(count: int) -> bool:
        return any(takes(count) for takes, _ in routes)

    def product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return next(fn for takes, fn in routes if takes(x.shape[0]))(x, weight)

    return rows, product


def compile_stage(fn: Callable) -> Callable:
    """`fn` as one fused kernel (these stages, the sampler's greedy pick).

    Automatic dynamic shapes: compiled first for the sizes seen, then once more with the
    dimension that changed (the token or row count) symbolic. Only that one: with dynamic=True
    every dimension is symbolic, and the kernels index with run-time divisions and unvectorized
    loads (2-6x slower on the H100, benchmarks/elementwise.py). Warm-up must meet both, in
    inference mode as the engine calls them (shard/server.py)."""
    return torch.compile(fn, fullgraph=True)


EAGER = Ops.build(compiled=False)
