"""`sluice serve`: a shard group and a router as child processes of one supervisor.

It starts the shard, waits for it to listen, starts the router against it, waits until the
router's /health is green, and then prints {"event": "ready", "service": "serve", "address"},
with the shard's gRPC address ("shard_address") and, with --metrics-port, its metrics address
("metrics_address"): the ports each bound, which --shard-port 0 and --metrics-port 0 leave to
the system.
On SIGINT or SIGTERM it stops the router first (so in-flight requests end), then the shard.
Children also get SIGTERM from the kernel if the supervisor dies, so none is orphaned.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence

from router import config as router_config
from shard import config as shard_config
from sluice import logs, tracing
from sluice.flags import apply_environment

_PR_SET_PDEATHSIG = 1
# What a part gets beyond --shutdown-grace to stop before it is killed.
_STOP_MARGIN_S = 10.0


def _die_with_parent() -> None:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _forwarded(args: argparse.Namespace, add_arguments: Callable) -> list[str]:
    """The flags of one part, with the values serve parsed, as that part's command line."""
    part = argparse.ArgumentParser(add_help=False)
    add_arguments(part)
    argv = []
    for action in part._actions:
        value, flag = getattr(args, action.dest), action.option_strings[0]
        if value is None or value is False:
            continue
        if value is True:
            argv.append(flag)
        elif isinstance(value, list):
            for item in value:
                argv += [flag, str(item)]
        else:
            argv += [flag, str(value)]
    return argv


class Child:
    """A part running as a child process; its stdout is scanned for the ready line."""

    def __init__(self, name: str, argv: list[str]):
        self.name = name
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, bufsize=1,
                                        preexec_fn=_die_with_parent)

    def wait_ready(self, timeout_s: float) -> dict:
        """The part's ready line (its "address", ...); then its stdout is passed through."""
        deadline = time.monotonic() + timeout_s
        for line in self.process.stdout:  # ends when the child exits
            try:
                event = json.loads(line)
            except ValueError:
                event = None
            if isinstance(event, dict) and event.get("event") == "ready":
                threading.Thread(target=self._pass_through, daemon=True).start()
                return event
            sys.stdout.write(line)
            if time.monotonic() > deadline:
                break
        raise RuntimeError(f"the {self.name} did not start (exit code {self.process.poll()})")

    def _pass_through(self) -> None:
        for line in self.process.stdout:
            sys.stdout.write(line)

    def stop(self, grace_s: float) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _wait_healthy(address: str, timeout_s: float, router: Child) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and router.process.poll() is None:
        try:
            with urllib.request.urlopen(f"http://{address}/health", timeout=2) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise RuntimeError("the router did not become healthy")


def _common_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags both parts take: each gets the same value."""
    logs.add_arguments(parser)
    tracing.add_arguments(parser)


def parse(argv: Sequence[str] | None, environ) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="sluice serve",
        description="Serve a model on this machine: one shard group and one router.")
    parser.add_argument("--host", default="127.0.0.1", help="HTTP listen address")
    parser.add_argument("--port", type=int, default=8080, help="HTTP listen port (0: any free)")
    parser.add_argument("--shard-port", type=int, default=0,
                        help="the shard group's gRPC port on 127.0.0.1 (0: any free)")
    parser.add_argument("--startup-timeout", type=float, default=900.0,
                        help="seconds to wait for the model to load and the router to be ready")
    shard_config.add_arguments(parser)
    router_config.add_arguments(parser)  # its --shutdown-grace bounds the whole stop, too
    _common_arguments(parser)
    apply_environment(parser, environ)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse(argv, os.environ)
    if args.num_threads is None and args.device != "cuda":
        # The router and its clients share this machine: leave them a core, and split the
        # rest between the ranks. On a 2-core machine one core for the model served faster
        # than torch's default of every core (measured with benchmarks/load.py).
        ranks = int(args.num_shard) if args.num_shard.isdigit() else 1
        args.num_threads = max(1, ((os.cpu_count() or 2) - 1) // ranks)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    python = [sys.executable, "-m"]
    children: list[Child] = []
    code = 0
    try:
        shard = Child("shard", python + ["shard", "--host", "127.0.0.1", "--port",
                                         str(args.shard_port), "--shutdown-grace",
                                         str(args.shutdown_grace)]
                      + _forwarded(args, shard_config.add_arguments)
                      + _forwarded(args, _common_arguments))
        children.append(shard)
        shard_ready = shard.wait_ready(args.startup_timeout)
        shard_address = shard_ready["address"]
        router = Child("router", python + ["router", "--host", args.host, "--port",
                                           str(args.port), "--shard-uri", shard_address]
                       + _forwarded(args, router_config.add_arguments)
                       + _forwarded(args, _common_arguments))
        children.append(router)
        address = router.wait_ready(args.startup_timeout)["address"]
        _wait_healthy(address, args.startup_timeout, router)
        ready = {"event": "ready", "service": "serve", "address": address,
                 "shard_address": shard_address}
        if "metrics_address" in shard_ready:
            ready["metrics_address"] = shard_ready["metrics_address"]
        print(json.dumps(ready), flush=True)
        print(f"sluice: serving on http://{address} (Ctrl-C stops)", file=sys.stderr, flush=True)
        while not stop.wait(0.2):
            for child in children:
                if child.process.poll() is not None:
                    print(f"sluice: the {child.name} exited with code "
                          f"{child.process.returncode}; stopping", file=sys.stderr, flush=True)
                    code = 1
                    stop.set()
    except RuntimeError as exc:
        print(f"sluice: {exc}", file=sys.stderr, flush=True)
        code = 1
    finally:
        # The router first: it drains (up to --shutdown-grace), then the shard stops.
        for child in reversed(children):
            child.stop(args.shutdown_grace + _STOP_MARGIN_S)
    sys.exit(code)
