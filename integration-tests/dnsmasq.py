"""A real DNS server on loopback for discovery tests: Debian's dnsmasq, answering from a hosts
file that the test rewrites (SIGHUP reloads it), authoritative for one test domain."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import dns.exception
import dns.rdatatype
import dns.resolver

from conftest import wait_until

DOMAIN = "sluice.test"
DNSMASQ = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Dnsmasq:
    def __init__(self, folder: Path):
        self.hosts = folder / "hosts"
        self.hosts.write_text("")
        self._names: dict[str, set[str]] = {}
        for _ in range(3):  # the free port may be taken before dnsmasq binds it
            self.port = _free_udp_port()
            self.process = subprocess.Popen(
                [DNSMASQ, "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv",
                 "--no-hosts", f"--addn-hosts={self.hosts}", "--listen-address=127.0.0.1",
                 "--bind-interfaces", f"--port={self.port}", f"--local=/{DOMAIN}/",
                 "--pid-file=", "--user=root", "--log-facility=-"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                self._wait_answering()
                return
            except RuntimeError:
                self.stop()
        raise RuntimeError("dnsmasq did not start")

    @property
    def server(self) -> str:
        """What --shard-dns-server takes."""
        return f"127.0.0.1:{self.port}"

    def resolver(self) -> dns.resolver.Resolver:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers, resolver.port, resolver.lifetime = ["127.0.0.1"], self.port, 2
        return resolver

    def lookup(self, name: str) -> set[str]:
        try:
            return {r.address for r in self.resolver().resolve(name, dns.rdatatype.A)}
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return set()

    def set(self, name: str, addresses: set[str], timeout_s: float = 10) -> None:
        """Make `name` resolve to exactly `addresses` (none: NXDOMAIN), and wait until it does."""
        self._names[name] = set(addresses)
        self.hosts.write_text("".join(f"{address} {n}\n" for n, addrs in self._names.items()
                                      for address in sorted(addrs)))
        self.process.send_signal(signal.SIGHUP)
        wait_until(lambda: self.lookup(name) == set(addresses),
                   f"dnsmasq answering {name} -> {addresses}", timeout_s,
                   report=lambda: self.lookup(name))

    def _wait_answering(self) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                self.lookup(f"nothing.{DOMAIN}")
                return
            except dns.exception.DNSException:
                time.sleep(0.05)
        raise RuntimeError("dnsmasq does not answer")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
