"""A shard group's rank 1..N-1: `python -m shard.worker` with the shard's own command line.

Rank 0 (`sluice shard`) starts these with RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT in
their environment (shard/ranks.py). A worker builds and warms up its slice of the model in
lockstep with rank 0, then runs rank 0's plans until told to stop; it prints nothing on
stdout (rank 0's ready line is the group's), ignores SIGINT and SIGTERM, and dies with rank 0.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Sequence

import torch

from shard import config as shard_config
from shard import ranks, runtime
from shard.server import _device
from sluice import logs

log = logging.getLogger("shard")


def main(argv: Sequence[str] | None = None) -> None:
    # Rank 0 alone decides when the group stops (its stop plan, or PDEATHSIG when it dies): a
    # SIGINT or SIGTERM sent to the whole process group (Ctrl-C, an init that forwards to the
    # group) must not kill a worker mid-drain, which rank 0 would take for a lost rank.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    config = shard_config.parse(list(sys.argv[1:] if argv is None else argv), os.environ)
    logs.configure(config.log_format)
    setup = ranks.RankSetup.from_environ(os.environ)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    device = _device(config.device, setup.rank)
    group = ranks.join(setup, device)
    warm = runtime.warm_up(runtime.build(config, group, device), None)
    ranks.follow(warm.runner, ranks.PlanChannel(group))
    log.info("rank %d stopping", setup.rank)


if __name__ == "__main__":
    main()
