"""Shared fixtures of the shard's unit tests: tiny random checkpoints, written once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Our Triton kernels run under Triton's interpreter on the CPU (test_triton_kernels.py).
    # Read when a kernel is defined, so before any test imports one.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from shard.tests.tiny_model import write_tiny_model

# GPU tests (test_*_cuda.py) exist only where a GPU does (the lent H100 or H200): elsewhere
# they are not collected at all, rather than reported as skipped.
collect_ignore_glob = [] if torch.cuda.is_available() else ["test_*_cuda.py"]


@pytest.fixture(scope="package", autouse=True)
def one_torch_thread():
    """The models here are tiny: one thread is as fast, and much faster on a shared, busy CPU
    (torch's spinning worker threads degrade badly when other processes take the cores)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def pdl_off_after_each_test():
    """--pdl is a process-wide switch that runtime.build sets: a shard one test starts must
    not choose how the next test's kernels launch."""
    yield
    if torch.cuda.is_available():
        from shard import pdl

        pdl.configure(False)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """Random Llama with GQA (4 query heads, 2 key/value heads), untied embeddings."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny-llama"))
