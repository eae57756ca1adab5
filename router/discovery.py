"""Where shard groups are: a DNS name's addresses, or a Kubernetes Service's EndpointSlices.

Each source calls `found(source, uris)` with the whole set it sees now (router/groups.py keeps
the union). A source that cannot look (DNS times out, the API server is away) logs it and keeps
its last answer: groups are not dropped because discovery hiccups, only because they left.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import dns.asyncresolver
import dns.exception
import dns.resolver

log = logging.getLogger(__name__)

Found = Callable[[str, set[str]], None]
_IN_CLUSTER_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
# A watch ends after this long and is started again from a fresh list: a slice missed by a
# broken watch is seen within it.
_WATCH_S = 300


def uri(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(slots=True, frozen=True)
class DnsName:
    name: str
    port: int


def parse_dns_name(value: str) -> DnsName:
    """NAME:PORT, as --shard-dns takes it; ValueError says what is wrong."""
    name, sep, port = value.rpartition(":")
    if not sep or not name or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--shard-dns must be NAME:PORT (a port from 1 to 65535), not {value!r}")
    return DnsName(name, int(port))


async def watch_dns(target: DnsName, server: tuple[str, int] | None, interval_s: float,
                    found: Found) -> None:
    """Resolve the name's A and AAAA records now and every `interval_s`, asking `server`
    (IP, port) or else resolv.conf's servers, with its search domains."""
    resolver = dns.asyncresolver.Resolver(configure=server is None)
    if server is not None:
        resolver.nameservers = [server[0]]
        resolver.port = server[1]
    resolver.lifetime = max(1.0, min(interval_s, 5.0))
    failing = False
    while True:
        addresses = await _resolve(resolver, target.name)
        if addresses is None:
            if not failing:
                log.warning("--shard-dns %s: the name does not resolve now; keeping the shard "
                            "groups found before", target.name)
            failing = True
        else:
            if failing:
                log.info("--shard-dns %s resolves again", target.name)
            failing = False
            found("dns", {uri(a, target.port) for a in addresses})
        await asyncio.sleep(interval_s)


async def _resolve(resolver: dns.asyncresolver.Resolver, name: str) -> set[str] | None:
    """Every address of `name`; empty when it has none (NXDOMAIN: a headless Service with no
    ready pod); None when the question went unanswered."""
    addresses: set[str] = set()
    for rdtype in ("A", "AAAA"):
        try:
            answer = await resolver.resolve(name, rdtype, search=True)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            continue
        except dns.exception.DNSException:
            return None
        addresses.update(r.address for r in answer)
    return addresses


@dataclass(slots=True, frozen=True)
class ServiceName:
    namespace: str | None  # None: the pod's own, else the kubeconfig context's
    name: str


def parse_service_name(value: str) -> ServiceName:
    namespace, _, name = value.rpartition("/")
    if not name or "/" in namespace:
        raise ValueError(f"--shard-service must be [NAMESPACE/]NAME, not {value!r}")
    return ServiceName(namespace or None, name)


async def watch_service(service: ServiceName, interval_s: float, found: Found) -> None:
    """List and watch the Service's EndpointSlices (kubernetes client, on a thread of its own:
    the client blocks), reporting the ready endpoints after every change."""
    loop = asyncio.get_running_loop()
    stop = threading.Event()

    def report(uris: set[str]) -> None:
        loop.call_soon_threadsafe(found, "kubernetes", uris)

    thread = threading.Thread(target=_watch_slices, args=(service, interval_s, report, stop),
                              name="endpointslices", daemon=True)
    thread.start()
    try:
        await asyncio.Event().wait()  # until cancelled with the router
    finally:
        stop.set()


def _watch_slices(service: ServiceName, interval_s: float, report: Callable[[set[str]], None],
                  stop: threading.Event) -> None:
    from kubernetes import client, config, watch  # only routers that watch need it

    try:
        config.load_incluster_config()
        namespace = service.namespace or _IN_CLUSTER_NAMESPACE.read_text().strip()
    except config.ConfigException:
        config.load_kube_config()
        _, context = config.list_kube_config_contexts()
        namespace = service.namespace or context["context"].get("namespace") or "default"
    api = client.DiscoveryV1Api()
    selector = f"kubernetes.io/service-name={service.name}"
    where = f"--shard-service {namespace}/{service.name}"
    failing = False
    while not stop.is_set():
        try:
            listed = api.list_namespaced_endpoint_slice(namespace, label_selector=selector,
                                                        _request_timeout=30)
            slices = {s.metadata.name: s for s in listed.items}
            report(ready_endpoints(slices.values(), where))
            if failing:
                log.info("%s: the Kubernetes API answers again", where)
                failing = False
            stream = watch.Watch().stream(
                api.list_namespaced_endpoint_slice, namespace, label_selector=selector,
                resource_version=listed.metadata.resource_version, timeout_seconds=_WATCH_S,
                _request_timeout=_WATCH_S + 30)
            for event in stream:
                if stop.is_set():
                    return
                kind, item = event["type"], event["object"]
                if kind == "ERROR":
                    break  # the version expired, say: list again
                if kind == "DELETED":
                    slices.pop(item.metadata.name, None)
                elif kind in ("ADDED", "MODIFIED"):
                    slices[item.metadata.name] = item
                report(ready_endpoints(slices.values(), where))
        except Exception as exc:  # the API server away or refusing: keep the last answer
            if not failing:
                log.warning("%s: cannot list or watch EndpointSlices (%s); keeping the shard "
                            "groups found before, trying again every %g s", where, exc,
                            interval_s)
                failing = True
            stop.wait(interval_s)


def ready_endpoints(slices, where: str) -> set[str]:
    """HOST:PORT of every ready endpoint (a condition left unset counts as ready, as the API
    says) on the gRPC port: the port named grpc, or the slice's only port."""
    uris = set()
    for item in slices:
        ports = item.ports or []
        port = next((p.port for p in ports if p.name == "grpc"), None)
        if port is None and len(ports) == 1:
            port = ports[0].port
        if port is None:
            log.warning("%s: EndpointSlice %s names no port 'grpc' among %d; skipped", where,
                        item.metadata.name, len(ports))
            continue
        for endpoint in item.endpoints or []:
            conditions = endpoint.conditions
            if conditions is not None and conditions.ready is False:
                continue
            uris.update(uri(address, port) for address in endpoint.addresses or [])
    return uris
