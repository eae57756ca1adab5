"""The router's one configuration object, built from flags and the environment at start."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from sluice.flags import apply_environment


@dataclass(slots=True, frozen=True)
class RouterConfig:
    host: str
    port: int
    shard_uri: list[str]
    max_concurrent_requests: int
    max_stop_sequences: int
    max_top_n_tokens: int
    max_best_of: int
    max_client_batch_size: int
    served_model_name: str | None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The router's flags; `sluice serve` shares them (minus --shard-uri, which it assigns)."""
    parser.add_argument("--max-concurrent-requests", type=int, default=128,
                        help="requests queued or running at once; more get 429 (overloaded)")
    parser.add_argument("--max-stop-sequences", type=int, default=4,
                        help="most stop sequences one request may give")
    parser.add_argument("--max-top-n-tokens", type=int, default=5,
                        help="most alternatives per token a request may ask for")
    parser.add_argument("--max-best-of", type=int, default=2,
                        help="most sequences a TGI request may ask for with best_of")
    parser.add_argument("--max-client-batch-size", type=int, default=4,
                        help="most choices one /v1 request may ask for: prompts times n")
    parser.add_argument("--served-model-name", default=None,
                        help="model name in /v1 answers; default: the shard group's model id")


def parse(argv: Sequence[str] | None, environ: Mapping[str, str]) -> RouterConfig:
    parser = argparse.ArgumentParser(
        prog="sluice router",
        description="Serve the TGI and OpenAI HTTP APIs in front of shard groups.")
    parser.add_argument("--host", default="127.0.0.1", help="HTTP listen address")
    parser.add_argument("--port", type=int, default=8080, help="HTTP listen port (0: any free)")
    parser.add_argument("--shard-uri", action="append", required=True,
                        help="HOST:PORT of a shard group's gRPC server; repeat for several "
                             "(the environment variable takes a comma-separated list)")
    add_arguments(parser)
    apply_environment(parser, environ)
    args = parser.parse_args(argv)
    for flag in ("max_concurrent_requests", "max_best_of", "max_client_batch_size"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    return RouterConfig(**vars(args))
