"""The integration tests' process helpers (start_shard, start_router, free_port), shared
rather than copied. integration-tests/ is not a package and pytest owns the module name
`conftest`, so its conftest.py is loaded from its file under a name of its own."""

from __future__ import annotations

import importlib.util

from tests.chart import ROOT

_spec = importlib.util.spec_from_file_location("sluice_integration_processes",
                                               ROOT / "integration-tests/conftest.py")
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)

free_port = _module.free_port
start_router = _module.start_router
start_shard = _module.start_shard
