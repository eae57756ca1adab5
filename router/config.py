"""The router's one configuration object, built from flags and the environment at start."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from router.auth import Keys, load_keys
from router.content_filter import ContentFilter, load_filter
from router.discovery import DnsName, ServiceName, parse_dns_name, parse_service_name
from sluice import logs, tracing
from sluice.flags import apply_environment


@dataclass(slots=True, frozen=True)
class RouterConfig:
    host: str
    port: int
    shard_uri: list[str]  # static groups
    shard_dns: DnsName | None
    shard_dns_server: tuple[str, int] | None  # None: the system's resolv.conf
    shard_service: ServiceName | None
    discovery_interval_s: float
    failover_timeout_s: float
    hold_without_groups: bool  # scale to zero: wait for a first group rather than 503
    workers: int
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
    parser.add_argument("--workers", type=int, default=None,
                        help="router processes sharing the port (SO_REUSEPORT), each with its "
                             "own streams to every group; rate limits stay exact across them; "
                             "default: the CPU cores this process may use (cgroup quota and "
                             "affinity), at least 1")
    parser.add_argument("--failover-timeout", type=float, default=30.0,
                        help="seconds a request whose shard group failed or drained may wait "
                             "for another group to take it (it goes on where it was: the "
                             "client sees no error), and queued requests while no group is "
                             "ready; then 503")
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
    parser.add_argument("--shard-uri", action="append", default=[],
                        help="HOST:PORT of a shard group's gRPC server; repeat, or give "
                             "a comma list")
    parser.add_argument("--shard-dns", default=None, metavar="NAME:PORT",
                        help="find shard groups at every A/AAAA address of NAME (a headless "
                             "Service, say), re-resolved every --discovery-interval")
    parser.add_argument("--shard-dns-server", default=None, metavar="IP[:PORT]",
                        help="the DNS server --shard-dns asks; default: resolv.conf's")
    parser.add_argument("--shard-service", default=None, metavar="[NAMESPACE/]NAME",
                        help="find shard groups as the ready endpoints of this Kubernetes "
                             "Service (its EndpointSlices, watched through the API server: "
                             "in-cluster config, else kubeconfig; the port named grpc); "
                             "NAMESPACE defaults to the router's own")
    parser.add_argument("--discovery-interval", type=float, default=5.0,
                        help="seconds between DNS resolutions, and between tries while the "
                             "Kubernetes API does not answer")
    parser.add_argument("--hold-without-groups", action="store_true",
                        help="scale to zero: while no shard group is ready, hold new requests "
                             "(counted in sluice_router_queue_size, so that the autoscaler "
                             "starts a group) until one is, up to --request-timeout, which must "
                             "be set; /health answers 200 without groups. Off: such requests "
                             "get 503 at once and /health is 503")
    add_arguments(parser)
    logs.add_arguments(parser)
    tracing.add_arguments(parser)
    apply_environment(parser, environ)
    args = parser.parse_args(argv)
    args.shard_uri = [u.strip() for item in args.shard_uri for u in item.split(",") if u.strip()]
    if not (args.shard_uri or args.shard_dns or args.shard_service):
        parser.error("say where the shard groups are: --shard-uri, --shard-dns or "
                     "--shard-service")
    if args.workers is None:
        args.workers = usable_cores()
    if args.discovery_interval <= 0:
        parser.error("--discovery-interval must be above 0")
    for flag in ("workers", "max_concurrent_requests", "max_best_of", "max_client_batch_size"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    for name in ("request_timeout", "shutdown_grace", "requests_per_minute", "tokens_per_minute",
                 "failover_timeout"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must not be negative")
    if args.hold_without_groups and not args.request_timeout:
        parser.error("--hold-without-groups needs --request-timeout (seconds above 0): a held "
                     "request must not wait forever for a shard group")
    if args.api_keys_file and args.api_keys:
        parser.error("give --api-keys-file or --api-keys, not both")
    try:
        keys = load_keys(args.api_keys_file, args.api_keys, args.requests_per_minute,
                         args.tokens_per_minute)
        content_filter = load_filter(args.content_filter, args.content_filter_hook)
        shard_dns = parse_dns_name(args.shard_dns) if args.shard_dns else None
        dns_server = parse_dns_server(args.shard_dns_server) if args.shard_dns_server else None
        service = parse_service_name(args.shard_service) if args.shard_service else None
    except (OSError, ValueError) as exc:
        parser.error(str(exc))
    return RouterConfig(
        host=args.host, port=args.port, shard_uri=args.shard_uri, shard_dns=shard_dns,
        shard_dns_server=dns_server, shard_service=service,
        discovery_interval_s=args.discovery_interval, failover_timeout_s=args.failover_timeout,
        hold_without_groups=args.hold_without_groups,
        workers=args.workers,
        max_concurrent_requests=args.max_concurrent_requests,
        max_stop_sequences=args.max_stop_sequences, max_top_n_tokens=args.max_top_n_tokens,
        max_best_of=args.max_best_of, max_client_batch_size=args.max_client_batch_size,
        served_model_name=args.served_model_name, request_timeout_s=args.request_timeout,
        shutdown_grace_s=args.shutdown_grace, keys=keys,
        requests_per_minute=args.requests_per_minute, tokens_per_minute=args.tokens_per_minute,
        rate_limit_redis_url=args.rate_limit_redis_url, content_filter=content_filter,
        log_prompts=args.log_prompts, log_format=args.log_format,
        tracing=tracing.config_from(args, environ, "sluice-router"))


def parse_dns_server(value: str) -> tuple[str, int]:
    """IP, IP:PORT or [IPv6]:PORT; the port defaults to 53."""
    host, port = value, "53"
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port = rest.removeprefix(":") or "53"
    elif value.count(":") == 1:
        host, port = value.split(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--shard-dns-server must be IP[:PORT], not {value!r}")
    return host, int(port)


def usable_cores() -> int:
    """CPU cores this process may use: its affinity, bounded by a cgroup v2 CPU quota (a
    Kubernetes CPU limit), at least 1."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()
        if quota != "max":
            cores = min(cores, int(-(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)
