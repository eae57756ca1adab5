"""Where one engine step's time goes: wall time per step, the Python functions (cProfile) and
the device kernels (torch.profiler), for a steady decode batch, prefill-only steps, or mixed steps
(the decode batch plus one fresh prompt of --chunk tokens per step).

    python benchmarks/profile_step.py --model benchmarks/configs/llama-3.2-1b --load-format dummy \\
        --phase decode --batch 1 --input-len 512
    python benchmarks/profile_step.py ... --phase prefill --input-len 4096
    python benchmarks/profile_step.py ... --phase mixed --batch 192 --chunk 1024
    python benchmarks/profile_step.py ... --curve 1,2,4,8,16

`--curve` times steady decode steps at each batch size instead, each against its floor: the
weights (the embedding excepted) and the batch's KV cache read once at the measured copy rate.

Flags this script does not know go to the shard unchanged (`sluice shard --help`).
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import dataclasses
import io
import json
import os
import pstats
import re
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from shard import config as shard_config  # noqa: E402
from shard.engine import Stream  # noqa: E402
from shard.kv_cache import bytes_per_token  # noqa: E402
from shard.sampling import SamplingParams  # noqa: E402
from shard.scheduler import Sequence  # noqa: E402
from shard import server as shard_server  # noqa: E402
from shard.server import Started  # noqa: E402


class _Sink(Stream):
    def send(self, response) -> None:
        if response.errors:  # a rejected prompt would leave the phase silently decode-only
            raise SystemExit(f"request rejected: {response.errors[0].message}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Workload:
    """Keeps the engine stepping in one phase: a steady decode batch, one fresh prompt per
    step that finishes as it is prefilled, or both at once."""

    def __init__(self, started: Started, args):
        self.engine = started.engine
        self.vocab = started.built.loaded.config.vocab_size
        self.args = args
        self.sink = _Sink()
        self.next_id = 0
        self.gen = torch.Generator().manual_seed(0)

    def _sequences(self, count: int, max_new: int, length: int | None = None) -> list[Sequence]:
        out, length = [], length or self.args.input_len
        for _ in range(count):
            out.append(Sequence(request_id=self.next_id, stream=self.sink,
                                prompt=torch.randint(3, self.vocab, (length,), generator=self.gen),
                                sampling=SamplingParams(), max_new_tokens=max_new,
                                ignore_eos=True))
            self.next_id += 1
        return out

    def start(self) -> None:
        if self.args.phase in ("decode", "mixed"):
            # Enough new tokens that no sequence ends before the last step measured, counting
            # the tokens the first ones decode while the others are still prefilling.
            prefill_steps = -(-self.args.batch * self.args.input_len // 256)
            max_new = min(3 * self.args.steps + 8 + prefill_steps,
                          self.engine.limits.max_total_tokens - self.args.input_len)
            self.engine.submit(self.sink, self._sequences(self.args.batch, max_new))
            while any(s.prefilling for s in self.engine.scheduler.running) or \
                    self.engine.scheduler.waiting or not self.engine.scheduler.running:
                self.engine.run_iteration()

    def step(self) -> None:
        if self.args.phase == "prefill":
            self.engine.submit(self.sink, self._sequences(self.args.batch, 1))
        elif self.args.phase == "mixed":
            self.engine.submit(self.sink, self._sequences(1, 1, self.args.chunk))
        self.engine.run_iteration()


def main() -> None:
    # No abbreviations: the shard's own flags pass through (--pdl is not --pdl-max-rows).
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--phase", choices=["decode", "prefill", "mixed"], default="decode")
    parser.add_argument("--batch", type=int, default=1, help="sequences per step")
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=1024,
                        help="mixed: prompt tokens added to each step")
    parser.add_argument("--steps", type=int, default=30, help="steps per measurement")
    parser.add_argument("--top", type=int, default=25, help="rows of each table")
    parser.add_argument("--curve", default=None, metavar="B1,B2,...",
                        help="decode ms per step at each batch size against its floor; then "
                             "only with --timeline the profiles of --batch")
    parser.add_argument("--timeline", action="store_true",
                        help="also: the device's busy time and idle gaps per step, from a trace "
                             "(kernels inside CUDA graphs included), and the decode graph "
                             "replayed alone")
    parser.add_argument("--by-launch", action="store_true",
                        help="--timeline: kernels told apart by grid and predecessor too")
    parser.add_argument("--pdl-max-rows", type=int, default=None, metavar="N",
                        help="study: launch with PDL (--pdl on) the kernels of steps of up to N "
                             "rows, in place of pdl.MAX_ROWS")
    parser.add_argument("--folded-max-rows", type=int, default=None, metavar="N",
                        help="study: run the norms inside the products (--gemv on) in steps of "
                             "up to N rows, in place of gemv.FOLDED_MAX_ROWS (0: never)")
    parser.add_argument("--head-fewest-rows", type=int, default=None, metavar="N",
                        help="study: the LM head through gemv.py's kernel (--gemv on) from N "
                             "rows, in place of ops.HEAD_FEWEST_ROWS")
    parser.add_argument("--one-row-wide-max", type=int, default=None, metavar="N",
                        help="study: one-row plain products of up to N inputs and outputs take "
                             "4 features a program (--gemv on), in place of "
                             "gemv.WIDE_ONE_ROW_MAX (0: none)")
    parser.add_argument("--head-pdl", choices=["on", "off"], default=None,
                        help="study: the LM head's gemv kernel launched with PDL as the other "
                             "kernels are (on), or never (off), in place of ops.HEAD_PDL")
    args, shard_argv = parser.parse_known_args()
    if args.head_fewest_rows is not None or args.head_pdl is not None:
        from shard.models import ops
        if args.head_fewest_rows is not None:
            ops.HEAD_FEWEST_ROWS = args.head_fewest_rows
        if args.head_pdl is not None:
            ops.HEAD_PDL = None if args.head_pdl == "on" else False
    if args.pdl_max_rows is not None:
        from shard import pdl
        pdl.MAX_ROWS = args.pdl_max_rows
    if args.folded_max_rows is not None:
        from shard import gemv
        gemv.FOLDED_MAX_ROWS = args.folded_max_rows
    if args.one_row_wide_max is not None:
        from shard import gemv
        gemv.WIDE_ONE_ROW_MAX = args.one_row_wide_max
    config = shard_config.parse(shard_argv, os.environ)
    started = shard_server.start(config, shard_argv)
    device = started.built.device
    if args.curve:
        curve(started, args)
        if not args.timeline:
            return
    work = Workload(started, args)
    work.start()
    for _ in range(3):
        work.step()
    _sync(device)

    start = time.perf_counter()
    for _ in range(args.steps):
        work.step()
    _sync(device)
    wall_ms = 1000 * (time.perf_counter() - start) / args.steps
    plan = started.engine.last_step
    print(f"== {args.phase}, batch {args.batch}, input {args.input_len}: {wall_ms:.3f} ms/step "
          f"(last step: {len(plan.decodes)} decodes, "
          f"{sum(n for _, n in plan.prefills)} prefill tokens; graphs "
          f"{'on' if started.warm.runner.graphs.decode else 'off'}, "
          f"{started.built.attention.name} attention)")

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(args.steps):
        work.step()
    _sync(device)
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(args.top)
    print("-- cProfile, by own time, over", args.steps, "steps")
    print("\n".join(line for line in text.getvalue().splitlines()[6:] if line.strip()))

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(args.steps):
            work.step()
        _sync(device)
    if args.phase != "prefill" and len(started.engine.last_step.decodes) != args.batch:
        print(f"!! the batch shrank to {len(started.engine.last_step.decodes)} decodes while "
              "profiling: the tables below mix batch sizes")
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = prof.key_averages()
    print(f"-- torch.profiler, by {key}, over {args.steps} steps")
    # The table ends with "Self CUDA time total": the kernels' time over the steps profiled.
    print(events.table(sort_by=key, row_limit=args.top, max_name_column_width=60))
    if args.timeline and device.type == "cuda":
        timeline(prof, started, args)


def curve(started: Started, args) -> None:
    """Steady decode steps at each batch size of --curve, each against the time its reads take
    at the copy rate: every weight once (not the embedding, read by rows) and each sequence's
    KV cache at its mean context over the steps timed."""
    from offline import decode_weight_bytes, measure_ceilings

    built = started.built
    cfg, device = built.loaded.config, built.device
    copy = measure_ceilings(device, built.dtype).copy_bytes_per_s
    weight_bytes = decode_weight_bytes(cfg, built.dtype)
    kv_token = bytes_per_token(cfg, 1, built.dtype)
    engine = started.engine
    print(f"-- decode steps against their floor (weights {weight_bytes / 1e9:.2f} GB, copy "
          f"{copy / 1e12:.2f} TB/s, context {args.input_len} tokens at the start)")
    for batch in (int(b) for b in args.curve.split(",")):
        work = Workload(started, argparse.Namespace(**{**vars(args), "batch": batch}))
        work.start()
        for _ in range(3):
            work.step()
        _sync(device)
        context = args.input_len + 4 + args.steps / 2  # mean over the steps timed
        start = time.perf_counter()
        for _ in range(args.steps):
            work.step()
        _sync(device)
        step_ms = 1000 * (time.perf_counter() - start) / args.steps
        floor_ms = 1000 * (weight_bytes + batch * kv_token * context) / copy
        decodes = len(engine.last_step.decodes)
        print(f"   batch {batch:3d}: {step_ms:7.3f} ms per step, floor {floor_ms:6.3f} ms: "
              f"{step_ms / floor_ms:.3f}x" + ("" if decodes == batch else
                                              f" (!! {decodes} decodes in the last step)"))
        while engine.scheduler.running or engine.scheduler.waiting:
            engine.run_iteration()


def _short(name: str) -> str:
    return re.sub(r"[<(].*", "", name)[:48]


@dataclasses.dataclass
class KernelTimes:
    """A trace's device events summed: `span` from the first start to the last end, `gaps`
    (idle intervals) and, per short kernel name, `calls`, `durations`, `added` (how far each
    call's end passed the end of every event before it: the time the step pays for it, which
    under PDL is its duration less the wait that overlaps its predecessor) and `idle_before`
    (the gaps it ended), all in the trace's µs."""
    span: float
    gaps: list[float]
    calls: collections.Counter
    durations: collections.Counter
    added: collections.Counter
    idle_before: collections.Counter


def kernel_times(events: list[dict], by_launch: bool = False) -> KernelTimes:
    """The KernelTimes of chrome-trace events ("ts", "dur", "name"), in any order. by_launch:
    each kernel told apart by its grid and the kernel before it too (one layer's products
    share a name: the O product is the one after the attention's merge)."""
    events = sorted(events, key=lambda e: e["ts"])
    times = KernelTimes(0.0, [], *(collections.Counter() for _ in range(4)))
    end = events[0]["ts"]
    before = "start"
    for e in events:
        name = _short(e["name"])
        if by_launch:
            grid = e.get("args", {}).get("grid")
            name, before = f"{name}{list(grid) if grid else ''} after {before}", name
        times.calls[name] += 1
        times.durations[name] += e["dur"]
        times.added[name] += max(0.0, e["ts"] + e["dur"] - max(e["ts"], end))
        if e["ts"] > end:
            times.gaps.append(e["ts"] - end)
            times.idle_before[name] += e["ts"] - end
        end = max(end, e["ts"] + e["dur"])
    times.span = end - events[0]["ts"]
    return times


def timeline(prof, started: Started, args) -> None:
    """Where a step's wall time goes on the device, from the profiled steps' trace: kernels
    (each timed, inside graphs too), and the idle gaps between them, by the kernel that follows
    the gap. Then the step's decode graph replayed back to back with no host work: the
    difference to the step's wall time is what the host and the work outside the graph add."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        trace = json.load(open(f.name))
    times = kernel_times([e for e in trace["traceEvents"] if e.get("ph") == "X" and
                          e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")],
                         args.by_launch)
    gaps, n = times.gaps, args.steps
    print(f"-- timeline over {n} steps: {times.span / n / 1000:.3f} ms per step from the first "
          f"kernel to the last; kernels {sum(times.durations.values()) / n / 1000:.3f} ms, idle "
          f"{sum(gaps) / n / 1000:.3f} ms in {len(gaps) / n:.0f} gaps per step; gaps over 50 us: "
          f"{sum(g for g in gaps if g > 50) / n / 1000:.3f} ms per step; some kernel running "
          f"{(times.span - sum(gaps)) / n / 1000:.3f} ms per step")
    # Under programmatic dependent launch (shard/pdl.py) a kernel starts before its predecessor
    # ends and waits: its duration then includes that wait, and durations overlap. What it
    # adds to the step does not: those sum to the time some kernel runs.
    print("   per step (us): what each kernel adds past the ones before it, its time, its calls; "
          "us per call:")
    for name, t in times.added.most_common(args.top):
        calls = times.calls[name]
        print(f"   {t / n:9.1f}  {times.durations[name] / n:9.1f}  {calls / n:6.1f}  "
              f"{times.durations[name] / calls:7.2f}  {name}")
    print("   idle before each kernel, per step (us):")
    for name, t in times.idle_before.most_common(12):
        print(f"   {t / n:9.1f}  {name}")
    graphs, plan = started.warm.runner.graphs.decode, started.engine.last_step
    if graphs is not None and not plan.prefills:
        size = next(s for s in graphs.batch_sizes if s >= len(plan.decodes))
        graph = graphs._graphs[size]
        start, stop = torch.cuda.Event(True), torch.cuda.Event(True)
        graph.replay()
        start.record()
        for _ in range(n):
            graph.replay()
        stop.record()
        stop.synchronize()
        print(f"-- the batch-{size} decode graph replayed alone: "
              f"{start.elapsed_time(stop) / n:.3f} ms per replay")


if __name__ == "__main__":
    main()
