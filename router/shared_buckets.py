"""Rate-limit buckets shared by a router's worker processes (--workers), in shared memory.

Every worker takes from the same per-tenant buckets, so limits stay exact whichever worker a
client's connection lands on. (With --rate-limit-redis-url, Redis is the store shared by every
replica and this table is what the workers fall back to while Redis is away.) The table is one
file mapped into every worker, on /dev/shm where it exists, guarded by an flock: one lock and
one unlock per request. Each entry is a bucket key's 64-bit digest and its TAT (GCRA's
theoretical arrival time, router/ratelimit.py). Open addressing, linear probing: an entry whose
TAT has passed is a full bucket, the same as no entry, so its slot is taken again.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import mmap
import os
import struct
from pathlib import Path

from router.ratelimit import PERIOD_S, Decision, RateLimits, decide

log = logging.getLogger(__name__)

SLOTS = 1 << 16  # 1 MiB of table: far more tenants and client addresses than one minute sees
PROBES = 64
_ENTRY = struct.Struct("<Qd")  # key digest (0: never used), TAT in wall-clock seconds


def create(directory: Path) -> Path:
    """The table's file, zeroed, for the workers to map; made once by the parent process."""
    path = directory / "ratelimit-buckets"
    with open(path, "wb") as f:
        f.truncate(SLOTS * _ENTRY.size)
    return path


def _digest(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") or 1


class SharedBuckets:
    """The same interface as ratelimit.LocalBuckets, over the shared table."""

    def __init__(self, path: Path):
        self._fd = os.open(path, os.O_RDWR)
        self._map = mmap.mmap(self._fd, SLOTS * _ENTRY.size)
        self._evicted = False

    def take(self, keys: tuple[str, str], limits: RateLimits, costs: tuple[int, int],
             now: float) -> Decision:
        with self._locked():
            slots = [self._slot(_digest(k), now) for k in keys]
            tats = [self._tat(slot, digest, now) for slot, digest in slots]
            decision = decide(tats, limits, costs, now)
            if decision.allowed:
                for (slot, digest), tat, limit, cost in zip(slots, tats, limits.per_kind, costs):
                    if limit > 0:
                        self._write(slot, digest, max(tat, now) + cost * PERIOD_S / limit)
        return decision

    def give_back(self, key: str, limit: int, cost: int) -> None:
        if limit <= 0:
            return
        digest = _digest(key)
        with self._locked():
            for slot in self._window(digest):
                found, tat = _ENTRY.unpack_from(self._map, slot * _ENTRY.size)
                if found == digest:
                    self._write(slot, digest, tat - cost * PERIOD_S / limit)
                    return
                if found == 0:
                    return

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)

    @contextlib.contextmanager
    def _locked(self):
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _window(self, digest: int) -> list[int]:
        first = digest % SLOTS
        return [(first + i) % SLOTS for i in range(PROBES)]

    def _slot(self, digest: int, now: float) -> tuple[int, int]:
        """The key's slot: where it is, else the first free or expired one in its window, else
        (a full window, which takes tens of thousands of live buckets) the one nearest to
        full, whose tenant thereby gets a full bucket back early."""
        free = None
        oldest, oldest_tat = None, float("inf")
        for slot in self._window(digest):
            found, tat = _ENTRY.unpack_from(self._map, slot * _ENTRY.size)
            if found == digest:
                return slot, digest
            if free is None and (found == 0 or tat < now):
                free = slot
            if found == 0:
                break  # the key was never stored past here
            if tat < oldest_tat:
                oldest, oldest_tat = slot, tat
        if free is None:
            if not self._evicted:
                log.warning("the shared rate-limit table is full around a key: a bucket nearest "
                            "to full is given up early")
                self._evicted = True
            free = oldest
        self._write(free, digest, now)  # claimed: a TAT of now is a full bucket
        return free, digest

    def _tat(self, slot: int, digest: int, now: float) -> float:
        found, tat = _ENTRY.unpack_from(self._map, slot * _ENTRY.size)
        return tat if found == digest else now

    def _write(self, slot: int, digest: int, tat: float) -> None:
        _ENTRY.pack_into(self._map, slot * _ENTRY.size, digest, tat)
