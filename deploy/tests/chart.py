"""The chart rendered by the real Helm engine (helm-python-sdk, Helm v4) and read back as objects.

Every test reads manifests through `render`, so that the matrix (default values plus each
`ci/*-values.yaml`, chart-testing's convention) is rendered once per values file.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import helm_python as helm
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy/helm/sluice"
GRAFANA = ROOT / "deploy/grafana"
RELEASE = "ci"
NAMESPACE = "sluice-test"
# The matrix: the chart's defaults, then every values file of ci/ (by its name).
VALUES_FILES = sorted(p.name for p in (CHART / "ci").glob("*-values.yaml"))
MATRIX = ["default", *VALUES_FILES]


@dataclass(frozen=True, slots=True)
class Rendered:
    values_name: str
    manifests: tuple[dict, ...]  # every Kubernetes object, in template order

    def of_kind(self, kind: str) -> list[dict]:
        return [m for m in self.manifests if m["kind"] == kind]

    def one(self, kind: str, name_suffix: str) -> dict:
        found = [m for m in self.of_kind(kind) if m["metadata"]["name"].endswith(name_suffix)]
        assert len(found) == 1, (kind, name_suffix, [m["metadata"]["name"] for m in found])
        return found[0]


def values_of(values_name: str) -> dict:
    if values_name == "default":
        return {}
    return yaml.safe_load((CHART / "ci" / values_name).read_text()) or {}


def render_values(values: dict) -> Rendered:
    """Render with these values over the chart's defaults (as `helm template -f`)."""
    with helm.Chart.load(CHART) as chart:
        # The SDK leaves .Values empty when given None: always pass a mapping.
        files = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    manifests = []
    for path, text in sorted(files.items(), key=lambda item: item[0]):
        if path.endswith("NOTES.txt"):
            continue
        manifests += [doc for doc in yaml.safe_load_all(text) if doc]
    return Rendered("custom", tuple(manifests))


@functools.cache
def render(values_name: str) -> Rendered:
    rendered = render_values(values_of(values_name))
    return Rendered(values_name, rendered.manifests)


def dashboards() -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted(GRAFANA.glob("*.json"))}


def containers(rendered: Rendered) -> list[tuple[dict, dict]]:
    """(workload, container) for every container of every Deployment."""
    return [(d, c) for d in rendered.of_kind("Deployment")
            for c in d["spec"]["template"]["spec"]["containers"]]


def pod_spec(rendered: Rendered, component: str) -> dict:
    """The pod template spec of the router or the shard Deployment."""
    return rendered.one("Deployment", f"-{component}")["spec"]["template"]["spec"]


def env_of(container: dict) -> dict[str, str | None]:
    return {e["name"]: e.get("value") for e in container["env"]}
