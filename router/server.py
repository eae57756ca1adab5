"""The router process: the HTTP app on uvicorn.

When it listens it prints one JSON line on stdout, {"event": "ready", "service": "router",
"address": "HOST:PORT"}, so that --port 0 can be used and the chosen port learned.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import sys
from collections.abc import Sequence

import uvicorn

from router import app as router_app
from router import config as router_config


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


async def serve(config: router_config.RouterConfig) -> None:
    sock = _bind(config.host, config.port)
    server = uvicorn.Server(uvicorn.Config(
        router_app.build(config), log_level="warning", timeout_graceful_shutdown=30))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()  # start-up failed: raise its error
            return
        await asyncio.sleep(0.02)
    host, port = sock.getsockname()[:2]
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    logging.getLogger("router").info("router listening on http://%s", address)
    print(json.dumps({"event": "ready", "service": "router", "address": address}), flush=True)
    await task


def main(argv: Sequence[str] | None = None) -> None:
    config = router_config.parse(argv, os.environ)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(serve(config))
    except OSError as exc:
        logging.getLogger("router").error("cannot listen on %s:%d: %s", config.host,
                                          config.port, exc)
        sys.exit(2)
