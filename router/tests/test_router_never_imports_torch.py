"""The router's install and imports never pull torch (DESIGN.md: the router never imports torch)."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys


def test_router_modules_import_without_torch():
    code = ("import sys, router.app, router.server, sluice.cli, sluice.serve; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_router_help_runs_without_torch():
    code = ("import sys; from sluice.cli import main; sys.argv = ['sluice', 'router', '--help']\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "assert 'torch' not in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert "--shard-uri" in out.stdout and "[env: SHARD_URI]" in out.stdout


def test_base_install_requires_no_torch():
    base = [r for r in importlib.metadata.requires("sluice") if "extra ==" not in r]
    assert not [r for r in base if r.lower().startswith(("torch", "transformers"))]
