"""The ranks of one shard group: starting them, what crosses between them, watching them.

`sluice shard` is rank 0. With --num-shard N > 1 it starts ranks 1..N-1 as child processes
(`python -m shard.worker` with its own command line, and RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT in their environment, as TGI's launcher does), each on its own device. They die
with it (PDEATHSIG); when one of them dies, or a step hangs longer than --rank-timeout, rank 0
fails the whole group: health NOT_SERVING, every stream ends with an error, the process exits
non-zero (Kubernetes restarts the pod). Never a silent hang on a collective.

Two process groups join the ranks: the forward's (NCCL on CUDA, gloo on CPU) for the model's
all-reduces and gathers and the sampled tokens, and a gloo group on the host for each step's
plan (one broadcast of a packed int64 tensor) and start-up agreements.
"""

from __future__ import annotations

import ctypes
import datetime
import logging
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from shard import plan as step_plan
from shard.parallel import TensorParallel
from shard.runner import ModelRunner, StepOutput

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
# Collectives themselves never time out (a rank idle between requests waits for plans as long
# as it takes); the watchdog below bounds a step instead.
_NO_TIMEOUT = datetime.timedelta(days=365)
_JOIN_TIMEOUT = datetime.timedelta(minutes=10)  # every rank must reach the store by then


@dataclass(slots=True, frozen=True)
class RankSetup:
    """Where this process sits in its group: from the environment TGI's launcher also sets."""

    rank: int
    world_size: int
    master_addr: str
    master_port: int

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> "RankSetup":
        try:
            return cls(int(environ["RANK"]), int(environ["WORLD_SIZE"]),
                       environ.get("MASTER_ADDR", "127.0.0.1"), int(environ["MASTER_PORT"]))
        except KeyError as exc:
            raise ValueError(f"a shard worker needs {exc.args[0]} in its environment "
                             "(sluice shard starts workers itself)") from None


@dataclass(slots=True)
class Group:
    """This rank's membership: the forward's collectives (tp) and the host group for plans.
    One rank alone has no process group at all."""

    tp: TensorParallel
    host_group: object | None  # a gloo ProcessGroup, None with one rank

    @property
    def rank(self) -> int:
        return self.tp.rank

    @property
    def world_size(self) -> int:
        return self.tp.world_size


def alone() -> Group:
    return Group(TensorParallel(), None)


def create_store(world_size: int) -> dist.TCPStore:
    """Rank 0's rendezvous on loopback, on a port the OS picks (handed to the workers)."""
    return dist.TCPStore("127.0.0.1", 0, world_size, True, timeout=_JOIN_TIMEOUT,
                         wait_for_workers=False)


def join(setup: RankSetup, device: torch.device, store: dist.TCPStore | None = None) -> Group:
    """Join the group (rank 0 passes the store it created; workers connect to it)."""
    if store is None:
        store = dist.TCPStore(setup.master_addr, setup.master_port, setup.world_size, False,
                              timeout=_JOIN_TIMEOUT)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=store, rank=setup.rank, world_size=setup.world_size,
                            timeout=_NO_TIMEOUT)
    host_group = dist.new_group(backend="gloo", timeout=_NO_TIMEOUT)
    return Group(TensorParallel(setup.rank, setup.world_size), host_group)


def smallest(value: int, group: Group) -> int:
    """The smallest of every rank's `value` (the KV budget every rank can hold)."""
    if group.host_group is None:
        return value
    t = torch.tensor([value], dtype=torch.long)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group.host_group)
    return int(t)


def gather(value: int, group: Group) -> list[int]:
    """Every rank's `value`, in rank order (rank 0 reports them)."""
    if group.host_group is None:
        return [value]
    parts = [torch.zeros(1, dtype=torch.long) for _ in range(group.world_size)]
    dist.all_gather(parts, torch.tensor([value], dtype=torch.long), group=group.host_group)
    return [int(p) for p in parts]


class PlanChannel:
    """Rank 0 sends each step's packed plan; the other ranks receive it. Plans up to INLINE
    integers (every decode step of up to ~400 sequences) take one broadcast; longer ones a
    second for the rest."""

    INLINE = 2048

    def __init__(self, group: Group):
        self.group = group.host_group
        self._buffer = torch.zeros(self.INLINE, dtype=torch.long)

    def send(self, packed: torch.Tensor) -> None:
        n = packed.shape[0]
        self._buffer[:min(n, self.INLINE)] = packed[:self.INLINE]
        dist.broadcast(self._buffer, src=0, group=self.group)
        if n > self.INLINE:
            dist.broadcast(packed[self.INLINE:].contiguous(), src=0, group=self.group)

    def receive(self) -> torch.Tensor:
        dist.broadcast(self._buffer, src=0, group=self.group)
        n = step_plan.length_of(self._buffer)
        if n <= self.INLINE:
            return self._buffer[:n].clone()
        rest = torch.empty(n - self.INLINE, dtype=torch.long)
        dist.broadcast(rest, src=0, group=self.group)
        return torch.cat([self._buffer, rest])


class GroupExecutor:
    """Rank 0's way to run a plan: broadcast it, then run it here like every other rank."""

    def __init__(self, runner: ModelRunner, channel: PlanChannel | None):
        self.runner = runner
        self.channel = channel

    def execute(self, plan: step_plan.StepPlan) -> StepOutput:
        if self.channel is not None:
            self.channel.send(plan.packed)
        return self.runner.execute(plan)

    def stop(self) -> None:
        """End the other ranks' step loops (they exit 0)."""
        if self.channel is not None:
            self.channel.send(step_plan.stop_plan().packed)


def follow(runner: ModelRunner, channel: PlanChannel) -> None:
    """A worker's step loop: run rank 0's plans until it says stop."""
    while True:
        plan = step_plan.StepPlan.unpack(channel.receive())
        if plan.stop:
            return
        runner.execute(plan)


def _die_with_parent() -> None:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class Workers:
    """Rank 0's children, ranks 1..N-1, each running `python -m shard.worker argv`."""

    def __init__(self, argv: list[str], world_size: int, master_port: int,
                 environ: Mapping[str, str]):
        self._stopping = False
        self.processes: dict[int, subprocess.Popen] = {}
        for rank in range(1, world_size):
            env = {**environ, "RANK": str(rank), "WORLD_SIZE": str(world_size),
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(master_port),
                   "LOCAL_RANK": str(rank)}
            self.processes[rank] = subprocess.Popen(
                [sys.executable, "-m", "shard.worker", *argv], env=env,
                preexec_fn=_die_with_parent)

    @property
    def pids(self) -> dict[int, int]:
        return {rank: p.pid for rank, p in self.processes.items()}

    def watch(self, on_death: Callable[[str], None]) -> None:
        """Call on_death(reason) from a thread when a worker exits before stop()."""
        for rank, process in self.processes.items():
            threading.Thread(target=self._wait, args=(rank, process, on_death),
                             name=f"rank {rank}", daemon=True).start()

    def _wait(self, rank: int, process: subprocess.Popen, on_death: Callable[[str], None]):
        process.wait()
        if not self._stopping:
            on_death(self._describe(rank, process))

    @staticmethod
    def _describe(rank: int, process: subprocess.Popen) -> str:
        code = process.returncode
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        return f"rank {rank} (pid {process.pid}) {how}"

    def death(self, timeout_s: float) -> str | None:
        """A worker that died, within timeout_s: a collective that fails on a dead peer may be
        noticed just before the death itself."""
        deadline = time.monotonic() + timeout_s
        while True:
            for rank, process in self.processes.items():
                if process.poll() is not None:
                    return self._describe(rank, process)
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.02)

    def stop(self, timeout_s: float) -> None:
        """Wait for the workers to leave (after the stop plan), then kill what remains."""
        self._stopping = True
        deadline = time.monotonic() + timeout_s
        for process in self.processes.values():
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()

    def kill(self, timeout_s: float = 5.0) -> None:
        """SIGKILL every worker left, then wait for them (within timeout_s) so that none
        outlives this process, not even for the moment the kernel takes to end it."""
        self._stopping = True
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
        deadline = time.monotonic() + timeout_s
        for process in self.processes.values():
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass  # unkillable (e.g. in uninterruptible I/O): exit all the same


class Watchdog:
    """Fails the group when one engine iteration takes longer than the rank timeout: a rank
    that hangs leaves the others waiting in a collective forever otherwise."""

    def __init__(self, busy_since: Callable[[], float | None], timeout_s: float,
                 on_hang: Callable[[str], None]):
        self._busy_since, self._timeout_s, self._on_hang = busy_since, timeout_s, on_hang
        threading.Thread(target=self._run, name="rank watchdog", daemon=True).start()

    def _run(self) -> None:
        while True:
            time.sleep(min(1.0, self._timeout_s / 4))
            since = self._busy_since()
            if since is not None and time.monotonic() - since > self._timeout_s:
                self._on_hang(f"an engine step has not finished in {self._timeout_s:g} s "
                              "(--rank-timeout): a rank hangs")
                return
