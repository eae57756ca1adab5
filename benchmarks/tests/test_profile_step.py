"""benchmarks/profile_step.py's reading of a trace, on events written here."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from profile_step import kernel_times  # noqa: E402


def event(name: str, ts: float, dur: float) -> dict:
    return {"name": name, "ts": ts, "dur": dur}


def test_each_kernel_adds_only_the_time_past_the_kernels_before_it():
    """Under PDL a kernel starts while its predecessor runs and waits for it: the step pays
    only for the part past the predecessor's end. Gaps go to the kernel after them."""
    times = kernel_times([
        event("gemv_kernel<32>", 100.0, 10.0),  # 100-110
        event("decode_kernel", 105.0, 15.0),  # launched early: 105-120, adds 10
        event("merge_kernel", 118.0, 1.0),  # inside decode's time: adds nothing
        event("gemv_kernel<64>", 125.0, 5.0),  # after a 5 µs gap: 125-130
        event("Memcpy DtoH", 131.0, 2.0),  # listed out of order below
    ][::-1])
    assert times.span == 33.0
    assert times.gaps == [5.0, 1.0]
    assert times.idle_before == {"gemv_kernel": 5.0, "Memcpy DtoH": 1.0}
    assert times.calls == {"gemv_kernel": 2, "decode_kernel": 1, "merge_kernel": 1,
                           "Memcpy DtoH": 1}
    assert times.durations == {"gemv_kernel": 15.0, "decode_kernel": 15.0, "merge_kernel": 1.0,
                               "Memcpy DtoH": 2.0}
    assert times.added == {"gemv_kernel": 15.0, "decode_kernel": 10.0, "merge_kernel": 0.0,
                           "Memcpy DtoH": 2.0}
    assert sum(times.added.values()) == times.span - sum(times.gaps)


def test_by_launch_tells_apart_one_kernel_by_its_grid_and_predecessor():
    """One layer's O and down products share a kernel and a grid: the kernel before each
    tells them apart."""
    def launch(name, ts, grid):
        return {"name": name, "ts": ts, "dur": 1.0, "args": {"grid": grid}}

    times = kernel_times([
        launch("merge_kernel", 0.0, [1, 32, 1]),
        launch("gemv_kernel", 1.0, [1024, 1, 1]),  # O
        launch("gemv_kernel", 2.0, [2048, 1, 1]),  # gate/up
        launch("gemv_kernel", 3.0, [1024, 1, 1]),  # down
        event("Memcpy DtoH", 4.0, 1.0),
    ], by_launch=True)
    assert times.calls == {"merge_kernel[1, 32, 1] after start": 1,
                           "gemv_kernel[1024, 1, 1] after merge_kernel": 1,
                           "gemv_kernel[2048, 1, 1] after gemv_kernel": 1,
                           "gemv_kernel[1024, 1, 1] after gemv_kernel": 1,
                           "Memcpy DtoH after gemv_kernel": 1}
