"""A test double of the Kubernetes API server, for EndpointSlice discovery only: it speaks the
list and watch protocol of discovery.k8s.io/v1 EndpointSlices (a JSON list with a
resourceVersion; a chunked stream of watch events) to the real `kubernetes` client. There is no
API server to run here; everything else in the tests is real."""

from __future__ import annotations

import json
import queue
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

PREFIX = "/apis/discovery.k8s.io/v1/namespaces/"


def endpoint_slice(name: str, service: str, port: int,
                   endpoints: list[tuple[str, bool | None]]) -> dict:
    """A slice of `service` whose endpoints are (address, ready); None leaves ready unset."""
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [address],
                       "conditions": {} if ready is None else {"ready": ready}}
                      for address, ready in endpoints],
        "ports": [{"name": "grpc", "port": port, "protocol": "TCP"},
                  {"name": "metrics", "port": 9000, "protocol": "TCP"}],
    }


class FakeKubeAPI:
    def __init__(self, namespace: str):
        self.namespace = namespace
        self.version = 1
        self.slices: dict[str, dict] = {}
        self.watchers: list[queue.Queue] = []
        self.requests: list[str] = []
        self._lock = threading.Lock()
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                api._get(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def kubeconfig(self, folder: Path) -> Path:
        path = folder / "kubeconfig"
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {"server": self.url}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test",
                                                      "namespace": self.namespace}}],
            "users": [{"name": "test", "user": {"token": "test-token"}}]}))
        return path

    def put(self, item: dict) -> None:
        """Create or replace a slice; watchers get ADDED or MODIFIED."""
        with self._lock:
            kind = "MODIFIED" if item["metadata"]["name"] in self.slices else "ADDED"
            self._store(item)
            self._notify(kind, item)

    def delete(self, name: str) -> None:
        with self._lock:
            item = self.slices.pop(name)
            self.version += 1
            item["metadata"]["resourceVersion"] = str(self.version)
            self._notify("DELETED", item)

    def stop(self) -> None:
        for watcher in list(self.watchers):
            watcher.put(None)
        self.server.shutdown()

    def _store(self, item: dict) -> None:
        self.version += 1
        item["metadata"]["resourceVersion"] = str(self.version)
        item["metadata"]["namespace"] = self.namespace
        self.slices[item["metadata"]["name"]] = item

    def _notify(self, kind: str, item: dict) -> None:
        for watcher in self.watchers:
            watcher.put({"type": kind, "object": json.loads(json.dumps(item))})

    def _get(self, handler: BaseHTTPRequestHandler) -> None:
        url = urlparse(handler.path)
        query = parse_qs(url.query)
        self.requests.append(handler.path)
        wanted = f"{PREFIX}{self.namespace}/endpointslices"
        selector = query.get("labelSelector", [""])[0]
        if url.path != wanted or not selector.startswith("kubernetes.io/service-name="):
            _send_json(handler, 404, {"kind": "Status", "status": "Failure", "code": 404})
            return
        service = selector.split("=", 1)[1]
        if query.get("watch", ["false"])[0] != "true":
            with self._lock:
                items = [s for s in self.slices.values()
                         if s["metadata"]["labels"]["kubernetes.io/service-name"] == service]
                listed = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSliceList",
                          "metadata": {"resourceVersion": str(self.version)}, "items": items}
            _send_json(handler, 200, listed)
            return
        events: queue.Queue = queue.Queue()
        with self._lock:
            self.watchers.append(events)
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        try:
            while (event := events.get()) is not None:
                if event["object"]["metadata"]["labels"].get(
                        "kubernetes.io/service-name") != service:
                    continue
                line = json.dumps(event).encode() + b"\n"
                handler.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                handler.wfile.flush()
            handler.wfile.write(b"0\r\n\r\n")
        except OSError:
            pass
        finally:
            with self._lock:
                self.watchers.remove(events)


def _send_json(handler: BaseHTTPRequestHandler, status: int, payload: dict) -> None:
    body = json.dumps(payload).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)
