"""The router's one configuration object, built from flags and the environment at start."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from router.auth import Keys, load_keys
from router.content_filter import ContentFilter, load_filter
from sluice import logs, tracing
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
    request_timeout_s: float  # 0: none
    shutdown_grace_s: float
    keys: Keys | None  # None: no authentication, limits per client address
    requests_per_minute: int  # defaults for keys that set none, and for client addresses
    tokens_per_minute: int
    rate_limit_redis_url: str | None
    content_filter: ContentFilter | None
    log_prompts: bool
    log_format: str
    tracing: tracing.TracingConfig


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
    parser.add_argument("--request-timeout", type=float, default=0.0,
                        help="seconds a request may take, queue wait included, before it ends "
                             "with 504 (timeout); 0: no limit")
    parser.add_argument("--shutdown-grace", type=float, default=30.0,
                        help="on SIGTERM, seconds in-flight requests get to finish while new "
                             "ones get 503")
    parser.add_argument("--api-keys-file", default=None,
                        help="YAML file of API keys, each naming a tenant and its limits "
                             "(docs/operations.md); clients then need 'Authorization: Bearer KEY'")
    parser.add_argument("--api-keys", default=None,
                        help="the same YAML document inline (say from a Secret as an "
                             "environment variable); not with --api-keys-file")
    parser.add_argument("--requests-per-minute", type=int, default=0,
                        help="limit per tenant (or client address without keys) unless its key "
                             "sets one; 0: no limit")
    parser.add_argument("--tokens-per-minute", type=int, default=0,
                        help="prompt + max_new_tokens per minute, likewise; 0: no limit")
    parser.add_argument("--rate-limit-redis-url", default=None,
                        help="share rate limits between router replicas through this Redis, "
                             "e.g. redis://redis:6379/0; default: limits kept in this process")
    parser.add_argument("--content-filter", default=None,
                        help="YAML file of word lists and regexes for prompts and outputs "
                             "(docs/operations.md)")
    parser.add_argument("--content-filter-hook", default=None,
                        help="module:function that checks text too (with --content-filter) or "
                             "alone (docs/operations.md)")
    parser.add_argument("--log-prompts", action="store_true",
                        help="put prompt text in request log lines (off: never logged)")


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
    logs.add_arguments(parser)
    tracing.add_arguments(parser)
    apply_environment(parser, environ)
    args = parser.parse_args(argv)
    for flag in ("max_concurrent_requests", "max_best_of", "max_client_batch_size"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    for name in ("request_timeout", "shutdown_grace", "requests_per_minute", "tokens_per_minute"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must not be negative")
    if args.api_keys_file and args.api_keys:
        parser.error("give --api-keys-file or --api-keys, not both")
    try:
        keys = load_keys(args.api_keys_file, args.api_keys, args.requests_per_minute,
                         args.tokens_per_minute)
        content_filter = load_filter(args.content_filter, args.content_filter_hook)
    except (OSError, ValueError) as exc:
        parser.error(str(exc))
    return RouterConfig(
        host=args.host, port=args.port, shard_uri=args.shard_uri,
        max_concurrent_requests=args.max_concurrent_requests,
        max_stop_sequences=args.max_stop_sequences, max_top_n_tokens=args.max_top_n_tokens,
        max_best_of=args.max_best_of, max_client_batch_size=args.max_client_batch_size,
        served_model_name=args.served_model_name, request_timeout_s=args.request_timeout,
        shutdown_grace_s=args.shutdown_grace, keys=keys,
        requests_per_minute=args.requests_per_minute, tokens_per_minute=args.tokens_per_minute,
        rate_limit_redis_url=args.rate_limit_redis_url, content_filter=content_filter,
        log_prompts=args.log_prompts, log_format=args.log_format,
        tracing=tracing.config_from(args, environ, "sluice-router"))
