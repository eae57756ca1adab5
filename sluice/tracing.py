"""OpenTelemetry set-up shared by the router and the shard: flags, the exporter, the provider.

Tracing is on when --otlp-endpoint (or the standard OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT) is
set. The SDK reads the other standard variables itself (OTEL_EXPORTER_OTLP_HEADERS, _TIMEOUT,
OTEL_BSP_* for batching, OTEL_TRACES_SAMPLER, OTEL_RESOURCE_ATTRIBUTES).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlparse

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

import sluice

log = logging.getLogger(__name__)
PROTOCOLS = ("grpc", "http/protobuf")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--otlp-endpoint", default=None,
                        help="export traces over OTLP to this collector, e.g. "
                             "http://otel-collector:4317 (grpc) or http://otel-collector:4318 "
                             "(http/protobuf); default: OTEL_EXPORTER_OTLP_ENDPOINT, else off")
    parser.add_argument("--otlp-protocol", default=None, choices=PROTOCOLS,
                        help="OTLP transport; default: OTEL_EXPORTER_OTLP_PROTOCOL, else grpc")


@dataclass(slots=True, frozen=True)
class TracingConfig:
    enabled: bool
    endpoint: str | None  # None with enabled: the exporter reads the OTEL_* endpoint itself
    protocol: str
    service_name: str


def config_from(args: argparse.Namespace, environ: Mapping[str, str],
                service_name: str) -> TracingConfig:
    env_endpoint = (environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                    or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))
    protocol = (args.otlp_protocol or environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc")
    if protocol not in PROTOCOLS:
        raise SystemExit(f"error: OTLP protocol {protocol!r} is not supported; use one of "
                         f"{', '.join(PROTOCOLS)}")
    return TracingConfig(enabled=bool(args.otlp_endpoint or env_endpoint),
                         endpoint=args.otlp_endpoint, protocol=protocol,
                         service_name=environ.get("OTEL_SERVICE_NAME", service_name))


def _exporter(config: TracingConfig):
    if config.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(endpoint=config.endpoint)  # http:// means no TLS
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    endpoint = config.endpoint
    if endpoint is not None and urlparse(endpoint).path in ("", "/"):
        endpoint = endpoint.rstrip("/") + "/v1/traces"  # a collector's base URL, as TGI takes it
    return OTLPSpanExporter(endpoint=endpoint)


def start(config: TracingConfig) -> TracerProvider | None:
    """Install the global tracer provider; without tracing the API's no-op tracer stays."""
    if not config.enabled:
        return None
    provider = TracerProvider(resource=Resource.create(
        {"service.name": config.service_name, "service.version": sluice.__version__}))
    provider.add_span_processor(BatchSpanProcessor(_exporter(config)))
    trace.set_tracer_provider(provider)
    log.info("exporting traces over OTLP (%s) to %s", config.protocol,
             config.endpoint or "the OTEL_EXPORTER_OTLP_* endpoint")
    return provider


def stop(provider: TracerProvider | None) -> None:
    """Send the spans still batched, then stop exporting."""
    if provider is not None:
        provider.shutdown()
