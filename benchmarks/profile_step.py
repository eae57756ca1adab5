"""Where one engine step's time goes: wall time per step, the Python functions (cProfile) and
the device kernels (torch.profiler), for a steady decode batch, prefill-only steps, or mixed steps
(the decode batch plus one fresh prompt of --chunk tokens per step).

    python benchmarks/profile_step.py --model benchmarks/configs/llama-3.2-1b --load-format dummy \\
        --phase decode --batch 1 --input-len 512
    python benchmarks/profile_step.py ... --phase prefill --input-len 4096
    python benchmarks/profile_step.py ... --phase mixed --batch 192 --chunk 1024

Flags this script does not know go to the shard unchanged (`sluice shard --help`).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from shard import config as shard_config  # noqa: E402
from shard.engine import Stream  # noqa: E402
from shard.sampling import SamplingParams  # noqa: E402
from shard.scheduler import Sequence  # noqa: E402
from shard.server import Runtime  # noqa: E402


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

    def __init__(self, runtime: Runtime, args):
        self.engine = runtime.engine
        self.vocab = runtime.loaded.config.vocab_size
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
            self.engine.submit(self.sink, self._sequences(self.args.batch, 3 * self.args.steps + 8))
            while any(s.prefilling for s in self.engine.scheduler.running) or \
                    self.engine.scheduler.waiting or not self.engine.scheduler.running:
                self.engine.step()

    def step(self) -> None:
        if self.args.phase == "prefill":
            self.engine.submit(self.sink, self._sequences(self.args.batch, 1))
        elif self.args.phase == "mixed":
            self.engine.submit(self.sink, self._sequences(1, 1, self.args.chunk))
        self.engine.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--phase", choices=["decode", "prefill", "mixed"], default="decode")
    parser.add_argument("--batch", type=int, default=1, help="sequences per step")
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=1024,
                        help="mixed: prompt tokens added to each step")
    parser.add_argument("--steps", type=int, default=30, help="steps per measurement")
    parser.add_argument("--top", type=int, default=25, help="rows of each table")
    args, shard_argv = parser.parse_known_args()
    config = shard_config.parse(shard_argv, os.environ)
    runtime = Runtime(config)
    runtime.warm_up()
    device = runtime.device
    work = Workload(runtime, args)
    work.start()
    for _ in range(3):
        work.step()
    _sync(device)

    start = time.perf_counter()
    for _ in range(args.steps):
        work.step()
    _sync(device)
    wall_ms = 1000 * (time.perf_counter() - start) / args.steps
    plan = runtime.engine.last_step
    print(f"== {args.phase}, batch {args.batch}, input {args.input_len}: {wall_ms:.3f} ms/step "
          f"(last step: {len(plan.decodes)} decodes, "
          f"{sum(n for _, n in plan.prefills)} prefill tokens; graphs "
          f"{'on' if runtime.engine.graphs else 'off'}, {runtime.attention.name} attention)")

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
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = prof.key_averages()
    print(f"-- torch.profiler, by {key}, over {args.steps} steps")
    # The table ends with "Self CUDA time total": the kernels' time over the steps profiled.
    print(events.table(sort_by=key, row_limit=args.top, max_name_column_width=60))


if __name__ == "__main__":
    main()
