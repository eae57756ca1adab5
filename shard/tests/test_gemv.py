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
import safetensors.torch
import torch
import torch.nn.functional as F

from shard import fused_mlp, gemv, loader
from shard.attention import TorchAttention
from shard.loader import _default_dtype
from shard.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP
from shard.models import ops
from shard.models.ops import Ops
from shard.parallel import TensorParallel
from shard.source import ModelSource
from shard.tests.test_llama_matches_transformers import paged_logits
from shard.tests.tiny_model import tiny_config, write_tiny_model

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
DTYPE, TOLERANCE = (torch.bfloat16, 1e-2) if ON_GPU else (torch.float32, 1e-5)
# Row counts: one (the reduction kernel), then tl.dot's over 16 rows with some masked.
ROWS = list(range(1, gemv.MAX_ROWS + 1)) if ON_GPU else [1, 2, 7, 16]
# (output features, input features): dividing the configured tiles (1,024 inputs: whole tiles
# along K for both kernels) or not (40 x 200; 24 x 2,304, past 2,048 inputs, where the gated
# product of RMSNorm(x) takes other one-row tiles).
SHAPES = [(64, 1024), (40, 200), (24, 2304)]
if ON_GPU:  # Llama-3.1-8B's QKV, O, down and Llama-3.2-1B's QKV
    SHAPES += [(6144, 4096), (4096, 4096), (4096, 14336), (3072, 2048)]
# With 40 x 8,300 too, past 8,192 inputs, where the ungated product of 2-16 rows takes 512
# inputs a tile: for the plain and added products (the products of RMSNorm(x) read the hidden
# size, never that wide on the CPU, where one row of it takes a minute).
LONG_SHAPES = SHAPES + [(40, 8300)]


def reference(x: torch.Tensor, weight: torch.Tensor, gated: bool) -> torch.Tensor:
    y = x.double() @ weight.double().T
    if gated:
        gate, up = y.chunk(2, dim=-1)
        return F.silu(gate) * up
    return y


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("shape", LONG_SHAPES, ids=[f"{n}x{k}" for n, k in LONG_SHAPES])
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


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.double() - expected).norm() / expected.norm()).item()


def rms_normed(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """RMSNorm(x) in float64, weight 1 (folded into the product's weight)."""
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + eps)


def stream(rows: int, features: int, gen: torch.Generator
           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(x, squares) as a step with the norms folded hands them to a product of RMSNorm(x):
    x written by added_product (the O or down product with the residual add after it), rows
    of very different RMS, and the squares the added product summed as it stored x."""
    sizes = 0.1 + 20 * torch.rand(rows, 1, generator=gen)
    residual = (torch.randn(rows, features, generator=gen) * sizes).to(DEVICE, DTYPE)
    heads = torch.randn(rows, 32, generator=gen).to(DEVICE, DTYPE)
    weight = (torch.randn(features, 32, generator=gen) / 32 ** 0.5).to(DEVICE, DTYPE)
    return gemv.added_product(heads, weight, residual)


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{n}x{k}" for n, k in SHAPES])
@pytest.mark.parametrize("rows", ROWS)
def test_scaled_kernel_is_the_product_of_each_rows_rms_norm(rows, shape, gated):
    """With norm_eps, the product of RMSNorm(x) (its weight folded into W): each row's own
    1 / RMS, from the squares of that row alone (rows of very different sizes here; over 2-16
    rows the added product's sums, which come with x), to one rounding of the output; the
    same bits on a second run."""
    features, inner = shape
    gen = torch.Generator().manual_seed(rows * 1000 + features + 1)
    x, squares = stream(rows, inner, gen)
    weight = (torch.randn(features, inner, generator=gen) / inner ** 0.5).to(DEVICE, DTYPE)
    got = gemv.product(x, weight, gated, norm_eps=1e-5, squares=squares)
    expected = reference(rms_normed(x), weight, gated)
    assert got.shape == expected.shape and got.dtype == DTYPE
    assert relative_error(got, expected) < TOLERANCE
    for row in range(rows):
        assert relative_error(got[row], expected[row]) < TOLERANCE, row
    assert torch.equal(gemv.product(x, weight, gated, norm_eps=1e-5, squares=squares), got)


def test_2_to_16_rows_of_rms_norm_need_the_added_products_squares():
    x = torch.ones(2, 64, device=DEVICE, dtype=DTYPE)
    weight = torch.ones(16, 64, device=DEVICE, dtype=DTYPE)
    with pytest.raises(AssertionError, match="squares added_product returned"):
        gemv.product(x, weight, False, norm_eps=1e-5)


def test_the_gated_product_of_2_to_16_rows_takes_each_gpus_fastest_tiles():
    """On an H200 the gated product of 2-16 rows takes 64 inputs a tile, elsewhere 256 (each
    GPU's fastest for the 8B's gate/up); the narrow tiles give float64's products too, plain
    and of RMSNorm(x), wherever the tests run."""
    h100, h200 = "NVIDIA H100 80GB HBM3", "NVIDIA H200"
    assert gemv.config(2, 4096, True, gpu=h200) == gemv.config(16, 4096, True, gpu=h200) \
        == (32, 64, 4, 4)
    assert gemv.config(2, 4096, True, gpu=h100) == gemv.config(2, 4096, True) == (32, 256, 4, 4)
    assert gemv.config(2, 4096, False, gpu=h200) == (32, 256, 4, 4)
    features, inner = SHAPES[0]
    gen = torch.Generator().manual_seed(7)
    x, squares = stream(5, inner, gen)
    weight = (torch.randn(features, inner, generator=gen) / inner ** 0.5).to(DEVICE, DTYPE)
    launched, config = [], gemv.config
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gemv, "gpu_name", lambda device: h200)
        patch.setattr(gemv, "config", lambda *args, **kwargs: launched.append(
            config(*args, **kwargs)) or launched[-1])
        plain = gemv.product(x, weight, True)
        normed = gemv.product(x, weight, True, norm_eps=1e-5, squares=squares)
    assert launched == [(32, 64, 4, 4)] * 2
    assert relative_error(plain, reference(x, weight, True)) < TOLERANCE
    assert relative_error(normed, reference(rms_normed(x), weight, True)) < TOLERANCE


def test_the_ungated_product_of_2_to_16_rows_over_8192_inputs_takes_512_a_tile():
    """The 8B's down at 2-16 rows (fastest on the H100 in 32 x 512, 3 stages); narrower
    inputs keep 32 x 256 in 4."""
    for gpu in ("NVIDIA H100 80GB HBM3", "NVIDIA H200"):
        assert gemv.config(2, 14336, False, gpu=gpu) == gemv.config(16, 8300, False, gpu=gpu) \
            == (32, 512, 4, 3)
        assert gemv.config(2, 8192, False, gpu=gpu) == (32, 256, 4, 4)
    assert gemv.config(1, 14336, False) == (2, 2048, 8, 1)


def test_one_row_plain_products_up_to_8192_wide_take_4_features_a_program():
    """The O projections and the 1B's down take 4 x 2,048 tiles (4 warps over up to 2,048
    inputs, else 8); the LM head (128k outputs), the 8B's down (14,336 inputs), gated products
    and the 8B's rotary one keep theirs, and WIDE_ONE_ROW_MAX = 0 gives every product 2
    features.
    The launch hands the output's width to config: a product's tiles are these."""
    wide = {(2048, 2048): (4, 2048, 4, 1), (2048, 8192): (4, 2048, 8, 1),  # the 1B's O, down
            (4096, 4096): (4, 2048, 8, 1), (40, 200): (4, 256, 4, 1)}  # the 8B's O; small
    narrow = {(4096, 14336): (2, 2048, 8, 1), (128256, 2048): (2, 2048, 8, 1),
              (128256, 4096): (2, 2048, 8, 1)}  # the 8B's down; both LM heads
    for (features, inner), tiles in (wide | narrow).items():
        assert gemv.config(1, inner, False, features=features) == tiles, (features, inner)
    assert gemv.config(1, 2048, True, features=2048) == (2, 2048, 4, 1)
    assert gemv.config(1, 4096, False, rotary=True, features=6144) == (2, 2048, 4, 1)
    assert gemv.config(2, 2048, False, features=2048) == (32, 256, 4, 4)
    features, inner = 40, 200
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(1, inner, generator=gen).to(DEVICE, DTYPE)
    weight = (torch.randn(features, inner, generator=gen) / inner ** 0.5).to(DEVICE, DTYPE)
    residual = torch.randn(1, features, generator=gen).to(DEVICE, DTYPE)
    launched, config = [], gemv.config
    for widest, tiles in ((gemv.WIDE_ONE_ROW_MAX, (4, 256, 4, 1)), (0, (2, 256, 8, 1))):
        with pytest.MonkeyPatch.context() as patch:
            config.cache_clear()  # config caches what it read of WIDE_ONE_ROW_MAX
            patch.setattr(gemv, "WIDE_ONE_ROW_MAX", widest)
            patch.setattr(gemv, "config", lambda *args, **kwargs: launched.append(
                config(*args, **kwargs)) or launched[-1])
            plain = gemv.product(x, weight, False)
            added, _ = gemv.added_product(x, weight, residual)
        config.cache_clear()
        assert launched == [tiles] * 2, widest
        launched.clear()
        assert relative_error(plain, reference(x, weight, False)) < TOLERANCE
        assert relative_error(added, residual.double() + reference(x, weight, False)) < TOLERANCE


@pytest.mark.parametrize("shape", LONG_SHAPES, ids=[f"{n}x{k}" for n, k in LONG_SHAPES])
@pytest.mark.parametrize("rows", ROWS)
def test_added_kernel_adds_the_residual_as_the_separate_add_rounds_it(rows, shape):
    """residual + the product: bit for bit the plain kernel's product, then the separate
    add. Over 2-16 rows also each program's sums of the squares of the rows it stored (32
    features a program), zero past the rows: together each row's sum of squares."""
    features, inner = shape
    gen = torch.Generator().manual_seed(rows * 1000 + features + 2)
    x = torch.randn(rows, inner, generator=gen).to(DEVICE, DTYPE)
    weight = (torch.randn(features, inner, generator=gen) / inner ** 0.5).to(DEVICE, DTYPE)
    residual = torch.randn(rows, features, generator=gen).to(DEVICE, DTYPE)
    stream, squares = gemv.added_product(x, weight, residual)
    assert stream.dtype == DTYPE and stream.shape == (rows, features)
    assert relative_error(stream, residual.double() + reference(x, weight, False)) < TOLERANCE
    assert torch.equal(stream, residual + gemv.product(x, weight, False))
    if rows == 1:
        assert squares is None
        return
    parts = -(-features // 32)
    assert squares.shape == (parts, gemv.DOT_ROWS) and squares.dtype == torch.float32
    padded = F.pad(stream.float(), (0, 32 * parts - features)).view(rows, parts, 32)
    torch.testing.assert_close(squares[:, :rows], padded.pow(2).sum(2).T, rtol=1e-5, atol=0)
    assert not squares[:, rows:].any()


# (query heads, key/value heads, head dim, hidden): a small GQA model; on the GPU the 8B's and
# the 1B's attention.
ATTENTION = [(4, 2, 32, 96)] + ([(32, 8, 128, 4096), (32, 8, 64, 2048)] if ON_GPU else [])


@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "scaled"])
@pytest.mark.parametrize("shape", ATTENTION, ids=[f"{h}-{kv}-d{d}" for h, kv, d, _ in ATTENTION])
@pytest.mark.parametrize("rows", ROWS)
def test_qkv_rotary_is_the_product_then_rotary_into_cache(rows, shape, scaled):
    """q rotated, keys rotated and values into their (scattered) cache slots, every other
    slot untouched: the QKV product rounded to the output's type, then rotate-half in float32
    as shard/rotary_cache.py does. scaled: of RMSNorm(x), as in the scaled product."""
    heads, kv_heads, dim, hidden = shape
    assert gemv.takes_rotary(rows, dim)
    gen = torch.Generator().manual_seed(rows * 100 + dim)
    x, squares = stream(rows, hidden, gen)  # rows of very different RMS
    weight = (torch.randn((heads + 2 * kv_heads) * dim, hidden, generator=gen) / hidden ** 0.5
              ).to(DEVICE, DTYPE)
    blocks, page, half = 8, 4, dim // 2
    positions = torch.randperm(60, generator=gen)[:rows].to(DEVICE)
    slots = torch.randperm(blocks * page, generator=gen)[:rows].to(DEVICE)
    angles = torch.rand(64, half, generator=gen) * 6.3
    cos, sin = angles.cos().to(DEVICE), angles.sin().to(DEVICE)
    k_cache, v_cache = (torch.zeros(blocks, page, kv_heads, dim, device=DEVICE, dtype=DTYPE)
                        for _ in range(2))
    norm_eps = 1e-5 if scaled else None
    q = gemv.qkv_rotary(x, weight, positions, cos, sin, k_cache, v_cache, slots, heads,
                        kv_heads, dim, norm_eps=norm_eps, squares=squares)
    normed = rms_normed(x) if scaled else x.double()
    qkv = reference(normed, weight, False).to(DTYPE).float().view(rows, -1, dim)
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
                           kv_heads, dim, out=out, norm_eps=norm_eps, squares=squares) is out
    assert torch.equal(out, q)


@pytest.mark.parametrize("block", [(1, 64, 4, 1), (4, 32, 8, 1), (8, 128, 4, 1)],
                         ids=lambda b: "x".join(map(str, b)))
def test_qkv_rotary_in_the_sweeps_one_row_tiles_gives_its_own_tiles_result(block):
    """benchmarks/gemv.py times qkv_rotary's one-row kernel in other tiles (feature pairs a
    program, inputs a tile, warps): each writes what the shard's tiles write (to rounding:
    the sums run in another order), in q and in the cache slot."""
    heads, kv_heads, dim, hidden = ATTENTION[0]
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, hidden, generator=gen).to(DEVICE, DTYPE)
    weight = (torch.randn((heads + 2 * kv_heads) * dim, hidden, generator=gen) / hidden ** 0.5
              ).to(DEVICE, DTYPE)
    angles = torch.rand(8, dim // 2, generator=gen) * 6.3
    where = torch.tensor([5], device=DEVICE)  # the position and the cache slot
    written = []
    for tiles in (None, block):
        caches = [torch.zeros(2, 4, kv_heads, dim, device=DEVICE, dtype=DTYPE) for _ in range(2)]
        q = gemv.qkv_rotary(x, weight, where, angles.cos().to(DEVICE), angles.sin().to(DEVICE),
                            *caches, where, heads, kv_heads, dim, block=tiles)
        written.append([q.flatten(), *(c.view(-1, kv_heads, dim)[5].flatten() for c in caches)])
    for got, want in zip(*reversed(written)):
        assert want.abs().min() > 0  # every feature written
        error = ((got.double() - want.double()).norm() / want.double().norm()).item()
        assert error < TOLERANCE, error


def test_one_row_qkv_rotary_over_up_to_2048_inputs_takes_4_pairs_of_1024_inputs():
    """The 1B's fused QKV (2,048 inputs, 64-dim heads): 4 feature pairs a program, 1,024 inputs
    a tile, 4 warps; the 8B's (4,096 inputs) 2 pairs of 2,048; pairs cut to divide a small half
    head; 2-16 rows as before."""
    assert gemv.rotary_tiles(1, 2048, 64) == (4, 1024, 4, 1)
    assert gemv.rotary_tiles(1, 4096, 128) == (2, 2048, 4, 1)
    assert gemv.rotary_tiles(1, 96, 12) == (2, 128, 4, 1)  # a half head of 6
    assert gemv.rotary_tiles(2, 2048, 64) == (32, 256, 4, 4)


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
    launches = []
    monkeypatch.setattr(gemv, "product", lambda x, weight, gated, use_pdl: (
        calls.append((x, weight, gated)) or launches.append(use_pdl) or "gemv"))
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
    assert set(launches) == {None}  # PDL as pdl.enabled says
    # The LM head's study (ops.HEAD_PDL): its kernel launched without PDL.
    assert gemv.small_rows(larger, use_pdl=False)(torch.randn(1, 32), weight) == "gemv"
    assert launches[-1] is False
    calls.clear(), larger_calls.clear()
    # A bias, a batched input, or a row stride other than one along K: the larger product.
    assert linear(torch.randn(4, 32), weight, torch.randn(8)) == "larger"
    assert linear(torch.randn(2, 4, 32), weight) == "larger"
    assert linear(torch.randn(32, 4).T, weight) == "larger"
    assert calls == [] and larger_calls == [((4, 32), True), ((2, 4, 32), False), ((4, 32), False)]


def test_small_rows_write_into_out_when_given_whichever_product_takes_the_rows():
    """The LM head's product (ops.head_linear) writes the decode graphs' logits buffer: into
    `out`, through the kernel at 2-16 rows and through `larger` past them and at one row."""
    linear = gemv.small_rows(ops.linear_into, fewest=2)
    weight = torch.randn(24, 200).to(DEVICE, DTYPE)
    for rows in (1, 2, 16, 17):
        x = torch.randn(rows, 200).to(DEVICE, DTYPE)
        out = torch.full((rows, 24), float("nan"), device=DEVICE, dtype=DTYPE)
        assert linear(x, weight, out=out) is out
        assert relative_error(out, reference(x, weight, False)) < TOLERANCE, rows


def assert_near(got: torch.Tensor, want: torch.Tensor) -> None:
    """To float32's rounding on the CPU; on the GPU, where the models run in bfloat16 and
    the kernels' sums round differently from cuBLAS's, to bfloat16's."""
    if ON_GPU:
        assert relative_error(got, want.double()) < 2e-2
    else:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def _mlps(**built) -> tuple[LlamaMLP, LlamaMLP]:
    config = tiny_config()
    torch.manual_seed(0)
    with torch.device(DEVICE), _default_dtype(DTYPE):
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
        x = torch.randn(rows, 32, device=DEVICE, dtype=DTYPE)
        got, want = small(x), separate(x)
        if rows <= gemv.MAX_ROWS:
            assert_near(got, want)
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
        x = torch.randn(rows, 32, device=DEVICE, dtype=DTYPE)
        assert_near(both(x), separate(x))
    assert taken == [("gemv", 1), ("gemv", 16), ("quack", fused_mlp.MIN_ROWS),
                     ("quack", fused_mlp.MIN_TOKENS)]


# A small GQA model whose half head (16) takes qkv_rotary at 2-16 rows too.
MODEL = dict(num_layers=2, hidden_size=96, intermediate_size=64, head_dim=32, num_heads=4,
             num_kv_heads=2, max_position_embeddings=512)


def _models(ops: Ops, fold: bool) -> tuple[LlamaForCausalLM, LlamaForCausalLM]:
    """A plain model with random weights (the norms' too), and one on `ops` with the same
    weights, its norms folded if `fold` (as load_weights folds them)."""
    config = tiny_config(**MODEL)
    torch.manual_seed(0)
    with torch.device(DEVICE), _default_dtype(DTYPE):
        plain = LlamaForCausalLM(config, TensorParallel(), TorchAttention(),
                                 Ops.build(compiled=False))
        for p in plain.parameters():
            torch.nn.init.normal_(p, std=0.2)
        other = LlamaForCausalLM(config, TensorParallel(), TorchAttention(), ops)
    other.load_state_dict(plain.state_dict())
    if fold:
        assert all(layer.folds_norms() for layer in other.layers)
        for layer in other.layers:
            layer.fold_norms()
    return plain, other


def _logits(model, prompt: torch.Tensor, decodes: list[int], chunk: int) -> torch.Tensor:
    return paged_logits(model, prompt, decodes, block_size=16, max_prefill_tokens=chunk,
                        device=DEVICE)


PROMPT = torch.randint(3, 64, (21,), generator=torch.Generator().manual_seed(3))


def test_a_model_with_gemv_gives_the_plain_models_logits_at_every_small_step(monkeypatch):
    """Norms separate (not folded): prefill chunks and decodes of 1-16 rows go through the
    kernels (every product, and the LM head's, launched without PDL: ops.HEAD_PDL); the
    logits are the plain model's to rounding, and a 17-row step is the plain model's bit for
    bit."""
    plain, small = _models(Ops.build(compiled=False, gemv=True), fold=False)
    steps, head_rows = [], []
    small.register_forward_pre_hook(lambda module, args: steps.append(args[0].shape[0]))
    product = gemv.product

    def spy(x, weight, *args, **kwargs):
        if weight is small.lm_head.weight:
            head_rows.append((x.shape[0], kwargs.get("use_pdl")))
        return product(x, weight, *args, **kwargs)

    monkeypatch.setattr(gemv, "product", spy)
    got = _logits(small, PROMPT, [5, 9, 13], 7)
    monkeypatch.undo()
    want = _logits(plain, PROMPT, [5, 9, 13], 7)
    assert_near(got, want)
    assert not torch.equal(got, want)  # the kernels did run: their sums round differently
    assert steps == [7, 7, 7, 1, 1, 1]
    assert head_rows == [(7, False)] * 3 + [(1, False)] * 3
    assert torch.equal(_logits(small, PROMPT[:17], [], 17), _logits(plain, PROMPT[:17], [], 17))


@pytest.mark.parametrize("max_rows", [1, gemv.MAX_ROWS], ids=["one-row", "1-16-rows"])
@pytest.mark.parametrize("fused_rotary", [False, True], ids=["qkv", "qkv-rotary"])
def test_folded_norms_go_inside_the_products_around_them_at_every_small_step(
        fused_rotary, max_rows, monkeypatch):
    """Norms folded: in a step of the rows takes_folded takes (1-16 as built; one row alone
    here too) each layer's O and down products add the residual (not the last layer's down:
    the final norm stays a norm), and gate/up and the next layer's QKV are products of
    RMSNorm(x) (the first layer's QKV reads its norm: no residual yet), which over 2-16 rows
    take the squares the added product before them returned. The logits are the plain
    model's to rounding, and so are those of the other steps, which run the norms separately
    (their weight 1: folded)."""
    assert gemv.FOLDED_MAX_ROWS == gemv.MAX_ROWS
    monkeypatch.setattr(gemv, "FOLDED_MAX_ROWS", max_rows)
    ops = Ops.build(compiled=False, gemv=True, fused_rotary=fused_rotary)
    calls, returned = [], []

    def added_linear(x, weight, residual):
        calls.append(("added", x.shape[0], weight.shape[1]))
        returned.append(ops.added_linear(x, weight, residual))
        return returned[-1]

    def took(squares) -> bool:  # the squares the last added product returned, None at one row
        return squares is returned[-1][1] and (squares is None) == (returned[-1][0].shape[0] == 1)

    def scaled_linear(x, weight, eps, gated, squares):
        calls.append(("scaled", x.shape[0], "gate/up" if gated else "qkv", took(squares)))
        return ops.scaled_linear(x, weight, eps, gated, squares)

    def qkv_rotary(x, *args, norm_eps=None, squares=None, **kwargs):
        calls.append(("qkv_rotary", x.shape[0], norm_eps is not None,
                      norm_eps is not None and took(squares)))
        return ops.qkv_rotary(x, *args, norm_eps=norm_eps, squares=squares, **kwargs)

    plain, small = _models(dataclasses.replace(
        ops, added_linear=added_linear, scaled_linear=scaled_linear,
        qkv_rotary=qkv_rotary if fused_rotary else None), fold=True)
    assert all(torch.equal(layer.input_layernorm.weight, torch.ones_like(
        layer.input_layernorm.weight)) for layer in small.layers)
    got = _logits(small, PROMPT, [5, 9, 13], 7)
    assert_near(got, _logits(plain, PROMPT, [5, 9, 13], 7))
    o_inputs, down_inputs = 4 * 32, 64

    def step(n: int) -> list:  # two layers
        if not gemv.takes_folded(n):  # norms separate: only the fused QKV kernel is seen
            return [("qkv_rotary", n, False, False)] * 2 if fused_rotary else []
        first_qkv = [("qkv_rotary", n, False, False)] if fused_rotary else []
        qkv = [("qkv_rotary", n, True, True)] if fused_rotary else [("scaled", n, "qkv", True)]
        return first_qkv + [("added", n, o_inputs), ("scaled", n, "gate/up", True),
                            ("added", n, down_inputs)] + qkv + [
            ("added", n, o_inputs), ("scaled", n, "gate/up", True)]

    assert calls == [c for n in (7, 7, 7, 1, 1, 1) for c in step(n)]
    assert [gemv.takes_folded(n) for n in (1, 2, 16, 17)] == [True] + [max_rows == 16] * 2 + [
        False]
    calls.clear()
    assert_near(_logits(small, PROMPT[:17], [], 17), _logits(plain, PROMPT[:17], [], 17))
    assert calls == []


def test_load_weights_folds_the_norms_with_gemv_on_one_rank_only(tmp_path):
    """load_weights folds each norm's weight into QKV's and gate/up's input columns (rounded
    once) where the folded products can serve: --gemv, one rank, no bias (Qwen2's QKV has
    one)."""
    folder = write_tiny_model(tmp_path / "llama")
    tensors = safetensors.torch.load_file(folder / "model.safetensors")
    for name, tensor in tensors.items():  # norms of weight 1 would fold to nothing
        if name.endswith("layernorm.weight"):
            tensor.uniform_(0.5, 1.5)
    safetensors.torch.save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    loaded = {gemv_on: loader.load(ModelSource("tiny", folder), TensorParallel(), DEVICE, DTYPE,
                                   TorchAttention(), gemv=gemv_on).model
              for gemv_on in (False, True)}
    for plain, folded in zip(loaded[False].layers, loaded[True].layers):
        assert folded.folded_norms and not plain.folded_norms
        for norm, proj in (("input_layernorm", "self_attn.qkv_proj"),
                           ("post_attention_layernorm", "mlp.gate_up_proj")):
            weight = plain.get_submodule(proj).weight
            scale = plain.get_submodule(norm).weight
            assert not torch.equal(scale, torch.ones_like(scale))
            assert torch.equal(folded.get_submodule(proj).weight,
                               (weight.float() * scale.float()).to(DTYPE))
            assert torch.equal(folded.get_submodule(norm).weight, torch.ones_like(scale))
    qwen = loader.load(ModelSource("qwen", write_tiny_model(tmp_path / "qwen", "qwen2")),
                       TensorParallel(), DEVICE, DTYPE, TorchAttention(), gemv=True).model
    assert not any(layer.folded_norms for layer in qwen.layers)
    with torch.device(DEVICE):
        split = LlamaDecoderLayer(tiny_config(), TensorParallel(0, 2), TorchAttention(),
                                  Ops.build(compiled=False, gemv=True))
    assert not split.folds_norms()
