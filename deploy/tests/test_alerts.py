"""The chart's alert rules under promtool (Debian's prometheus package): they load, and the unit
tests in alerts/ fire each alert when it should and not otherwise."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.chart import render

ALERT_TESTS = Path(__file__).parent / "alerts"
# keda-values.yaml turns the PrometheusRule on with the default thresholds.
RULES_VALUES = "keda-values.yaml"


def promtool() -> str:
    found = shutil.which("promtool")
    assert found, "promtool is missing: `make system-packages` installs Debian's prometheus"
    return found


@pytest.fixture(scope="module")
def rules_dir(tmp_path_factory) -> Path:
    """The rendered rule groups as a plain rules file, with the unit tests beside it."""
    folder = tmp_path_factory.mktemp("alerts")
    rule = render(RULES_VALUES).one("PrometheusRule", "sluice")
    (folder / "sluice-rules.yaml").write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    for test in ALERT_TESTS.glob("*.yaml"):
        shutil.copy(test, folder / test.name)
    return folder


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([promtool(), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_rendered_rules_pass_promtool_check(rules_dir):
    rules = yaml.safe_load((rules_dir / "sluice-rules.yaml").read_text())["groups"][0]["rules"]
    result = run("check", "rules", "sluice-rules.yaml", cwd=rules_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def test_alert_unit_tests_pass_under_promtool(rules_dir):
    tests = sorted(p.name for p in rules_dir.glob("*-test.yaml"))
    assert tests
    result = run("test", "rules", *tests, cwd=rules_dir)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_unit_test_that_fires_it(rules_dir):
    rules = yaml.safe_load((rules_dir / "sluice-rules.yaml").read_text())["groups"][0]["rules"]
    fired = {case["alertname"]
             for path in ALERT_TESTS.glob("*-test.yaml")
             for test in yaml.safe_load(path.read_text())["tests"]
             for case in test.get("alert_rule_test", []) if case["exp_alerts"]}
    assert {r["alert"] for r in rules} == fired
