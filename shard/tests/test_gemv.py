"""--gemv: the matrix-vector kernels against float64 at the row counts they serve, and which
products of a model take them.

On the CPU the kernels run under Triton's interpreter in float32 (conftest.py; NumPy has no
bfloat16), on small shapes that still take both of each kernel's paths (sizes that divide
the tiles, and sizes that do not); on the GPU in bfloat16, on the 8B and 1B shapes too
(test_pdl_cuda.py chains them in a CUDA graph; test_engine_cuda.py runs the whole model).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from shard import fused_mlp, gemv
from shard.attention import TorchAttention
from shard.models.llama import LlamaForCausalLM, LlamaMLP
from shard.models.ops import Ops
from shard.parallel import TensorParallel
from shard.tests.test_llama_matches_transformers import paged_logits
from shard.tests.tiny_model import tiny_config

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
DTYPE, TOLERANCE = (torch.bfloat16, 1e-2) if ON_GPU else (torch.float32, 1e-5)
# Row counts: one (the reduction kernel), then tl.dot's over 16 rows with some masked.
ROWS = list(range(1, gemv.MAX_ROWS + 1)) if ON_GPU else [1, 2, 7, 16]
# (output features, input features): dividing the configured tiles (1,024 inputs: whole tiles
# along K for both kernels) or not (40 x 200).
SHAPES = [(64, 1024), (40, 200)]
if ON_GPU:  # Llama-3.1-8B's QKV, O, down and Llama-3.2-1B's QKV
    SHAPES += [(6144, 4096), (4096, 4096), (4096, 14336), (3072, 2048)]


def reference(x: torch.Tensor, weight: torch.Tensor, gated: bool) -> torch.Tensor:
    y = x.double() @ weight.double().T
    if gated:
        gate, up = y.chunk(2, dim=-1)
        return F.silu(gate) * up
    return y


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{n}x{k}" for n, k in SHAPES])
@pytest.mark.parametrize("rows", ROWS)
def test_kernel_matches_float64_at_every_row_count_it_serves(rows, shape, gated):
    """x W^T, or SiLU(x W_gate^T) x (x W_up^T) with weight = [W_gate; W_up] (the model's
    gate_up_proj), to one rounding of the output."""
    features, inner = shape
    gen = torch.Generator().manual_seed(rows * 1000 + features)
    x = torch.randn(rows, inner, generator=gen).to(DEVICE, DTYPE)
    weight = (torch.randn(features, inner, generator=gen) / inner ** 0.5).to(DEVICE, DTYPE)
    got = gemv.product(x, weight, gated)
    expected = reference(x, weight, gated)
    assert got.shape == expected.shape and got.dtype == DTYPE and got.is_contiguous()
    error = ((got.double() - expected).norm() / expected.norm()).item()
    assert error < TOLERANCE, error


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{n}x{k}" for n, k in SHAPES])
@pytest.mark.parametrize("rows", ROWS)
def test_normed_kernel_is_the_residual_add_and_rmsnorm_then_the_product(rows, shape, gated):
    """The new residual is x + residual exactly as the separate add rounds it; the product is
    that of RMSNorm(x + residual) * norm weight, to one rounding of the output."""
    features, inner = shape
    gen = torch.Generator().manual_seed(rows * 1000 + features + 1)
    x, residual = (torch.randn(rows, inner, generator=gen).to(DEVICE, DTYPE) for _ in range(2))
    norm_weight = (1 + torch.rand(inner, generator=gen)).to(DEVICE, DTYPE)
    weight = (torch.randn(features, inner, generator=gen) / inner ** 0.5).to(DEVICE, DTYPE)
    got, new_residual = gemv.normed_product(x, residual, norm_weight, 1e-5, weight, gated)
    assert torch.equal(new_residual, x + residual)
    summed = (x + residual).double()
    normed = summed * torch.rsqrt(summed.pow(2).mean(-1, keepdim=True) + 1e-5) * norm_weight.double()
    expected = reference(normed, weight, gated)
    assert got.shape == expected.shape and got.dtype == DTYPE
    error = ((got.double() - expected).norm() / expected.norm()).item()
    assert error < TOLERANCE, error


# (query heads, key/value heads, head dim, hidden): a small GQA model; on the GPU the 8B's and
# the 1B's attention.
ATTENTION = [(4, 2, 32, 96)] + ([(32, 8, 128, 4096), (32, 8, 64, 2048)] if ON_GPU else [])


@pytest.mark.parametrize("shape", ATTENTION, ids=[f"{h}-{kv}-d{d}" for h, kv, d, _ in ATTENTION])
@pytest.mark.parametrize("rows", ROWS)
def test_qkv_rotary_is_the_product_then_rotary_into_cache(rows, shape):
    """q rotated, keys rotated and values into their (scattered) cache slots, every other
    slot untouched: the QKV product rounded to the output's type, then rotate-half in float32
    as shard/rotary_cache.py does."""
    heads, kv_heads, dim, hidden = shape
    assert gemv.takes_rotary(rows, dim)
    gen = torch.Generator().manual_seed(rows * 100 + dim)
    x = torch.randn(rows, hidden, generator=gen).to(DEVICE, DTYPE)
    weight = (torch.randn((heads + 2 * kv_heads) * dim, hidden, generator=gen) / hidden ** 0.5
              ).to(DEVICE, DTYPE)
    blocks, page, half = 8, 4, dim // 2
    positions = torch.randperm(60, generator=gen)[:rows].to(DEVICE)
    slots = torch.randperm(blocks * page, generator=gen)[:rows].to(DEVICE)
    angles = torch.rand(64, half, generator=gen) * 6.3
    cos, sin = angles.cos().to(DEVICE), angles.sin().to(DEVICE)
    k_cache, v_cache = (torch.zeros(blocks, page, kv_heads, dim, device=DEVICE, dtype=DTYPE)
                        for _ in range(2))
    q = gemv.qkv_rotary(x, weight, positions, cos, sin, k_cache, v_cache, slots, heads,
                        kv_heads, dim)
    qkv = reference(x, weight, False).to(DTYPE).float().view(rows, -1, dim)
    c, s_ = cos[positions][:, None, :], sin[positions][:, None, :]
    first, second = qkv[..., :half], qkv[..., half:]
    rotated = torch.cat([first * c - second * s_, second * c + first * s_], -1).to(DTYPE)
    assert q.shape == (rows, heads, dim) and q.dtype == DTYPE
    for got, want in [(q, rotated[:, :heads]),
                      (k_cache.view(-1, kv_heads, dim)[slots], rotated[:, heads:heads + kv_heads]),
                      (v_cache.view(-1, kv_heads, dim)[slots], qkv[:, heads + kv_heads:].to(DTYPE))]:
        error = ((got.double() - want.double()).norm() / want.double().norm()).item()
        assert error < TOLERANCE, error
    untouched = torch.ones(blocks * page, dtype=torch.bool, device=DEVICE)
    untouched[slots] = False
    assert not k_cache.view(-1, kv_heads, dim)[untouched].any()
    assert not v_cache.view(-1, kv_heads, dim)[untouched].any()
    out = torch.empty(rows, heads, dim, device=DEVICE, dtype=DTYPE)
    assert gemv.qkv_rotary(x, weight, positions, cos, sin, k_cache, v_cache, slots, heads,
                           kv_heads, dim, out=out) is out and torch.equal(out, q)


def test_qkv_rotary_takes_1_to_16_rows_and_at_2_to_16_a_half_head_of_16_or_more():
    assert [gemv.takes_rotary(rows, 128) for rows in (0, 1, 2, 16, 17)] == [
        False, True, True, True, False]
    assert gemv.takes_rotary(1, 8) and not gemv.takes_rotary(2, 8)  # tl.dot's 16 columns
    assert gemv.takes_rotary(2, 32) and gemv.takes_rotary(2, 96) and not gemv.takes_rotary(2, 80)


@pytest.mark.parametrize("shape", SHAPES[:2], ids=[f"{n}x{k}" for n, k in SHAPES[:2]])
@pytest.mark.parametrize("rows", [1, 5])
def test_strided_rows_of_a_wider_tensor_are_read_at_their_stride(rows, shape):
    """The O projection reads attention's output through a view; a row stride wider than K
    must not shift rows."""
    features, inner = shape
    x = torch.randn(rows, inner + 100, device=DEVICE, dtype=DTYPE)[:, :inner]
    weight = torch.randn(features, inner, device=DEVICE, dtype=DTYPE) / inner ** 0.5
    expected = reference(x, weight, False)
    error = ((gemv.product(x, weight, False).double() - expected).norm() / expected.norm())
    assert error.item() < TOLERANCE


def test_small_rows_take_1_to_16_rows_and_pass_the_rest_on(monkeypatch):
    calls = []
    monkeypatch.setattr(gemv, "product",
                        lambda x, weight, gated: calls.append((x, weight, gated)) or "gemv")
    larger_calls = []

    def larger(x, weight, bias=None):
        larger_calls.append((x.shape, bias is not None))
        return "larger"

    linear = gemv.small_rows(larger)
    weight = torch.randn(8, 32)
    for rows in range(0, 40):
        x = torch.randn(rows, 32)
        assert linear(x, weight) == ("gemv" if 1 <= rows <= gemv.MAX_ROWS else "larger"), rows
    assert [x.shape[0] for x, _, _ in calls] == list(range(1, gemv.MAX_ROWS + 1))
    assert all(w is weight and not gated for _, w, gated in calls)
    calls.clear(), larger_calls.clear()
    # A bias, a batched input, or a row stride other than one along K: the larger product.
    assert linear(torch.randn(4, 32), weight, torch.randn(8)) == "larger"
    assert linear(torch.randn(2, 4, 32), weight) == "larger"
    assert linear(torch.randn(32, 4).T, weight) == "larger"
    assert calls == [] and larger_calls == [((4, 32), True), ((2, 4, 32), False), ((4, 32), False)]


def _mlps(**built) -> tuple[LlamaMLP, LlamaMLP]:
    config = tiny_config()
    torch.manual_seed(0)
    separate = LlamaMLP(config, TensorParallel(), Ops.build(compiled=False))
    for p in separate.parameters():
        torch.nn.init.normal_(p, std=0.2)
    other = LlamaMLP(config, TensorParallel(), Ops.build(compiled=False, **built))
    other.load_state_dict(separate.state_dict())
    return separate, other


def test_the_mlp_of_1_to_16_rows_is_the_gated_kernel_then_down_through_it():
    """gate/up with SiLU x up in one kernel, down through the plain one; more rows: the
    separate MLP, bit for bit."""
    separate, small = _mlps(gemv=True)
    assert small.fuses_gate and small.ops.gemv and not separate.fuses_gate
    for rows in (1, 5, 16, 17, 40):
        x = torch.randn(rows, 32)
        got, want = small(x), separate(x)
        if rows <= gemv.MAX_ROWS:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        else:
            assert torch.equal(got, want), rows


def test_with_the_fused_mlp_too_each_step_takes_the_product_for_its_rows(monkeypatch):
    """--gemv and --fused-mlp together: 1-16 rows the matrix-vector kernel, the row counts
    fused_mlp.fuses names quack's product, the rest the separate MLP."""
    taken = []

    def route(name):
        def product(x, weight):
            taken.append((name, x.shape[0]))
            gate, up = F.linear(x, weight).chunk(2, dim=-1)
            return F.silu(gate) * up
        return product

    monkeypatch.setattr(gemv, "swiglu_linear", route("gemv"))
    monkeypatch.setattr(fused_mlp, "swiglu_linear", route("quack"))
    separate, both = _mlps(gemv=True, fused_mlp=True)
    for rows in (1, 16, 17, fused_mlp.MIN_ROWS - 1, fused_mlp.MIN_ROWS, fused_mlp.MIN_TOKENS):
        x = torch.randn(rows, 32)
        torch.testing.assert_close(both(x), separate(x), rtol=1e-4, atol=1e-4)
    assert taken == [("gemv", 1), ("gemv", 16), ("quack", fused_mlp.MIN_ROWS),
                     ("quack", fused_mlp.MIN_TOKENS)]


def test_a_model_with_gemv_gives_the_plain_models_logits_at_every_small_step(monkeypatch):
    """Prefill chunks and decodes of 1-16 rows go through the kernels (every product but the
    LM head; with norms inside at one row, each norm but the first layer's and the final one
    inside the product that reads it); the logits are the plain model's to float32 rounding,
    and a 17-row step is the plain model's bit for bit."""
    assert not gemv.takes_norm(1)  # as measured: the norms stay separate (gemv.py)
    monkeypatch.setattr(gemv, "NORMED_MAX_ROWS", 1)
    config = tiny_config(num_layers=2, max_position_embeddings=512)
    torch.manual_seed(0)
    plain = LlamaForCausalLM(config, TensorParallel(), TorchAttention(), Ops.build(compiled=False))
    for p in plain.parameters():
        torch.nn.init.normal_(p, std=0.2)
    ops = Ops.build(compiled=False, gemv=True)
    normed = []

    def normed_linear(x, residual, norm_weight, eps, weight, gated):
        normed.append((x.shape[0], gated))
        return ops.normed_linear(x, residual, norm_weight, eps, weight, gated)

    small = LlamaForCausalLM(config, TensorParallel(), TorchAttention(),
                             dataclasses.replace(ops, normed_linear=normed_linear))
    small.load_state_dict(plain.state_dict())
    steps = []
    small.register_forward_pre_hook(lambda module, args: steps.append(args[0].shape[0]))
    prompt = torch.randint(3, 64, (21,), generator=torch.Generator().manual_seed(3))
    decodes = [5, 9, 13]
    got = paged_logits(small, prompt, decodes, block_size=16, max_prefill_tokens=7)
    want = paged_logits(plain, prompt, decodes, block_size=16, max_prefill_tokens=7)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert not torch.equal(got, want)  # the kernels did run: their sums round differently
    # Per step: layer 0's post-attention norm (gate/up), layer 1's input (QKV) and
    # post-attention ones; layer 0's input norm has no residual yet.
    assert steps == [7, 7, 7, 1, 1, 1]
    assert normed == [(n, gated) for n in steps if gemv.takes_norm(n)
                      for gated in (True, False, True)]
    assert gemv.takes_norm(1) and not gemv.takes_norm(2)
    normed.clear()
    got = paged_logits(small, prompt[:17], [], block_size=16, max_prefill_tokens=17)
    assert torch.equal(got, paged_logits(plain, prompt[:17], [], block_size=16,
                                         max_prefill_tokens=17))
    assert normed == []


def test_a_model_with_gemv_and_fused_rotary_runs_qkv_rotary_and_cache_in_one_kernel():
    """With --fused-rotary too, every layer's QKV product of a 1-16-row step is qkv_rotary
    (prefill chunks of 7 rows: tl.dot's path; decodes: one row), reading the cache it wrote;
    the logits are the plain model's to float32 rounding."""
    config = tiny_config(num_layers=2, hidden_size=96, intermediate_size=64, head_dim=32,
                         num_heads=4, num_kv_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    plain = LlamaForCausalLM(config, TensorParallel(), TorchAttention(), Ops.build(compiled=False))
    for p in plain.parameters():
        torch.nn.init.normal_(p, std=0.2)
    ops = Ops.build(compiled=False, gemv=True, fused_rotary=True)
    fused = []

    def qkv_rotary(x, *args, **kwargs):
        fused.append(x.shape[0])
        return ops.qkv_rotary(x, *args, **kwargs)

    small = LlamaForCausalLM(config, TensorParallel(), TorchAttention(),
                             dataclasses.replace(ops, qkv_rotary=qkv_rotary))
    small.load_state_dict(plain.state_dict())
    prompt = torch.randint(3, 64, (21,), generator=torch.Generator().manual_seed(3))
    got = paged_logits(small, prompt, [5, 9, 13], block_size=16, max_prefill_tokens=7)
    want = paged_logits(plain, prompt, [5, 9, 13], block_size=16, max_prefill_tokens=7)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert fused == [7] * 6 + [1] * 6
