"""`sluice`: the one command. `sluice serve` runs a shard group and a router together;
`sluice shard` and `sluice router` run one part alone, as Kubernetes does."""

from __future__ import annotations

import sys
from collections.abc import Sequence

USAGE = """usage: sluice {serve,shard,router} [--help] [flags]

  serve    start a shard group and a router on this machine, stop both on Ctrl-C
  shard    serve one model replica (shard group) over gRPC
  router   serve the TGI and OpenAI HTTP APIs in front of shard groups

Every flag also reads an environment variable of its name in capitals
(--max-batch-total-tokens <-> MAX_BATCH_TOTAL_TOKENS). `sluice COMMAND --help` lists them."""


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    command, rest = (args[0], args[1:]) if args else (None, [])
    # Imported lazily: the router must never import torch, which the shard needs.
    if command == "serve":
        from sluice.serve import main as run
    elif command == "shard":
        from shard.server import main as run
    elif command == "router":
        from router.server import main as run
    else:
        print(USAGE, file=sys.stderr if command not in ("-h", "--help") else sys.stdout)
        sys.exit(0 if command in ("-h", "--help") else 2)
    run(rest)
