"""A real Prometheus (Debian's package) on a free loopback port, scraping the targets it is given,
with its HTTP API for instant queries."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import httpx
import yaml

from tests.processes import free_port

SCRAPE_INTERVAL_S = 1


class Prometheus:
    def __init__(self, folder: Path, jobs: dict[str, tuple[str, dict[str, str]]],
                 rule_files: tuple[str, ...] = ()):
        """jobs: name -> (host:port, the labels the chart's monitors would attach)."""
        binary = shutil.which("prometheus")
        assert binary, "prometheus is missing: `make system-packages` installs Debian's package"
        config = {
            "global": {"scrape_interval": f"{SCRAPE_INTERVAL_S}s",
                       "evaluation_interval": f"{SCRAPE_INTERVAL_S}s"},
            "rule_files": list(rule_files),
            "scrape_configs": [{"job_name": name,
                                "static_configs": [{"targets": [target], "labels": labels}]}
                               for name, (target, labels) in jobs.items()],
        }
        (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
        for _ in range(3):  # the free port may be taken before Prometheus binds it
            self.port = free_port()
            self.log = open(folder / f"prometheus-{self.port}.log", "w")
            self.process = subprocess.Popen(
                [binary, f"--config.file={folder / 'prometheus.yml'}",
                 f"--storage.tsdb.path={folder / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                stdout=self.log, stderr=subprocess.STDOUT)
            if self._wait_ready(timeout_s=60):
                return
            self.stop()
        raise RuntimeError(f"prometheus did not start: {(folder / 'prometheus.yml').read_text()}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _wait_ready(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        return False

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        """The instant vector (or scalar) of `expr`; a parse or evaluation error raises."""
        params = {"query": expr} | ({"time": f"{at:.3f}"} if at is not None else {})
        answer = httpx.get(f"{self.url}/api/v1/query", params=params, timeout=30).json()
        if answer["status"] != "success":
            raise ValueError(f"{expr}: {answer['errorType']}: {answer['error']}")
        result = answer["data"]["result"]
        if answer["data"]["resultType"] == "scalar":
            return [{"metric": {}, "value": result}]
        return result

    def rules(self) -> list[dict]:
        groups = httpx.get(f"{self.url}/api/v1/rules", timeout=10).json()["data"]["groups"]
        return [rule for group in groups for rule in group["rules"]]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
