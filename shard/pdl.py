"""Programmatic dependent launch (Hopper and later) for the decode step's Triton kernels.

A decode step of a few rows is a chain of short kernels (2-80 µs, seven per layer), and
between two of them the GPU drains one grid before it launches the next. Launched with PDL, a
kernel's programs may start while the previous kernel's last programs still run. Each of our
kernels therefore lets its successor launch as it starts (`launch_next`), and waits for its
predecessor to finish and flush its writes (`wait`) before it reads anything a kernel of the
step writes, or writes anything. Before the wait it may read only what no kernel of the
step's chain writes: the weights (gemv.py asks L2 for its first tile of them there), the
rotary tables, and the step's own tensors (positions, cache slots, context lengths, block
tables), which copies and kernels launched without PDL put in place before the chain's first
kernel started. The ordering stays transitive: every kernel waits before it ends, so once a
kernel's wait returns, all earlier kernels have ended. Kernels launched without PDL (cuBLAS,
torch's own) keep the stream's full ordering.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

try:  # Triton 3.4 and later
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # never taken in a kernel: enabled() stays False
    gdc_launch_dependents = gdc_wait = None


_on = False  # --pdl (runtime.build); process-wide


def configure(on: bool) -> None:
    """Switch PDL on or off for every launch after this (--pdl)."""
    global _on
    _on = on


@functools.cache
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (9, 0)


def capable(device: torch.device) -> bool:
    """Whether kernels on `device` can launch with PDL: CUDA devices of compute capability 9.0
    and later, with a Triton that has grid dependency control (never Triton's CPU
    interpreter)."""
    return gdc_wait is not None and device.type == "cuda" and _capable(
        device.index if device.index is not None else torch.cuda.current_device())


# The most rows (tokens, or sequences of a decode batch) a kernel launches with PDL for. On
# the H100 (8B shape, gpu.sh curve) PDL took 0.06 ms off a batch-1 step but made steps of 2-16
# rows 0.2-0.5 ms slower (the cause is not found yet): so only steps of one row take it. Again
# with the norms inside the 2-16-row products (b2d461d's kernels, gpu.sh studies): 6.19 ms at
# batch 2 against 5.75, 6.64 at 16 against 6.20.
MAX_ROWS = 1


def enabled(device: torch.device, rows: int = 1) -> bool:
    """Whether kernels on `device` of a step of `rows` rows launch with PDL: switched on,
    capable, and rows <= MAX_ROWS."""
    return _on and rows <= MAX_ROWS and capable(device)


def launch_options(on: bool) -> dict:
    """The launch's keyword for PDL: none when off, so that launch is exactly the plain one."""
    return {"launch_pdl": True} if on else {}


@triton.jit
def launch_next(PDL: tl.constexpr):
    """Let the next kernel launch (it waits for this one before it reads what this one
    writes)."""
    if PDL:
        gdc_launch_dependents()


@triton.jit
def wait(PDL: tl.constexpr):
    """Wait until the previous kernel has ended and its writes are visible."""
    if PDL:
        gdc_wait()


@triton.jit
def prefetch_l2(pointers, wanted):
    """Ask L2 for the 128-byte lines at `pointers` where `wanted` (a mask of their shape),
    holding nothing in registers: what a kernel reads right after its wait, on its way while
    the previous kernel ends. A hint only, so a line that kernel is still writing is safe to
    ask for (L2 is where writes land). Not for Triton's CPU interpreter (inline PTX): call it
    under `if PDL:`."""
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.u32 $0, 0; }",
        "=r,l,r", [pointers, wanted.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)
