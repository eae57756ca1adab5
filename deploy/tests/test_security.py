"""checkov's Kubernetes checks on the rendered matrix: none fails, and each skip says why.

checkov pins packaging<24, which pytest 9 cannot run with, so it lives in its own virtual
environment (.venv-checkov, made by the Makefile) and runs as a command."""

from __future__ import annotations

import json
import re
import subprocess

import yaml

from tests.chart import CHART, MATRIX, ROOT, render

CHECKOV = ROOT / ".venv-checkov/bin/checkov"
SKIP = re.compile(r"checkov\.io/skip\d+: (CKV2?_K8S_\d+)=(.*)")


def test_checkov_fails_no_check_on_any_rendered_values_file(tmp_path):
    assert CHECKOV.exists(), "checkov is missing: run `make checkov` (make test does)"
    for name in MATRIX:
        (tmp_path / f"{name.removesuffix('.yaml')}.yaml").write_text(
            yaml.safe_dump_all(render(name).manifests))
    result = subprocess.run(
        [str(CHECKOV), "--directory", str(tmp_path), "--framework", "kubernetes", "--quiet",
         "--compact", "--skip-download", "--output", "json"],
        capture_output=True, text=True, timeout=300)
    report = json.loads(result.stdout)
    summary = report["summary"]
    failed = [(f["check_id"], f["resource"], f["file_path"])
              for f in report["results"].get("failed_checks", [])]
    assert failed == [] and summary["failed"] == 0, failed
    assert summary["parsing_errors"] == 0 and summary["passed"] > 0, summary
    assert result.returncode == 0, result.stderr[-2000:]


def test_every_checkov_skip_in_the_chart_says_why():
    skips = [m.groups() for path in (CHART / "templates").glob("*.yaml")
             for m in SKIP.finditer(path.read_text())]
    assert skips
    for check, reason in skips:
        assert len(reason.split()) >= 6, f"{check}: say why it does not apply"
