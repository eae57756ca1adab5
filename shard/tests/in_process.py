"""A one-rank shard started in the test process, as `sluice shard` starts one (build, warm
up, the serving engine), for tests that drive its engine step by step."""

from __future__ import annotations

from shard.config import parse
from shard.server import Started, start as start_shard


def start(argv: list[str]) -> Started:
    """`argv`: `sluice shard`'s flags (--metrics-port gives the engine its metrics)."""
    return start_shard(parse(argv, {}), argv)
