"""Warm-up compiles everything a step runs. Compiling mid-run would stall every running
request for a second or more; here (CPU, Inductor's C++ backend, `--compile on`) and on the
GPU (test_engine_cuda.py, graphs and compiled stages by default) a run after warm-up must
compile nothing, whatever its step sizes."""

from __future__ import annotations

import pytest
import torch

from shard import ranks, runtime
from shard.config import parse
from shard.server import Started
from shard.tests import in_process
from shard.tests.test_engine import Driver, Recorder, request
from shard.tests.tiny_model import write_tiny_model

# 263 prompt tokens, in one step or in chunks of --max-batch-prefill-tokens; then decode
# batches shrinking from 6 rows to 1 as the requests reach their lengths (2 + 3 i tokens).
PROMPT_LENGTHS = (3, 17, 40, 9, 64, 130)


def assert_no_compiling_after_warm_up(argv: list[str]) -> Started:
    torch._dynamo.reset()  # other tests compiled the same functions for other models
    started = in_process.start(argv)
    assert started.built.compiled
    engine = started.engine
    driver, stream = Driver(engine), Recorder(engine)
    prompts = [torch.randint(3, 320, (n,), generator=torch.Generator().manual_seed(n))
               for n in PROMPT_LENGTHS]
    with torch._dynamo.config.patch(error_on_recompile=True):
        driver.submit(stream, [request(stream, i, p, 2 + 3 * i) for i, p in enumerate(prompts)])
        driver.run_until_done()
    assert [len(stream.tokens(i)) for i in range(len(prompts))] == [
        2 + 3 * i for i in range(len(prompts))]
    return started


def test_steps_after_warm_up_compile_nothing_on_the_cpu(tmp_path):
    folder = write_tiny_model(tmp_path / "llama")
    started = assert_no_compiling_after_warm_up(
        ["--model", str(folder), "--device", "cpu", "--compile", "on", "--async-scheduling", "on",
         "--max-batch-total-tokens", "4096", "--max-batch-size", "16",
         "--max-batch-prefill-tokens", "100"])
    assert started.engine.async_scheduling
    # The fused rotary kernel is Triton, CUDA only: auto leaves the separate stages on a CPU;
    # the fused MLP is quack's Hopper GEMM: auto leaves gate/up and SiLU x up apart.
    assert not started.built.loaded.model.layers[0].self_attn.ops.fused_rotary
    assert started.built.loaded.model.layers[0].mlp.ops.swiglu_linear is None
    assert not started.built.loaded.model.layers[0].mlp.ops.gemv  # Triton's kernels: CUDA only


def test_fused_rotary_on_a_cpu_is_refused_with_the_reason(tmp_path):
    folder = write_tiny_model(tmp_path / "llama")
    with pytest.raises(ValueError, match="--fused-rotary on needs a CUDA device"):
        build(["--model", str(folder), "--device", "cpu", "--fused-rotary", "on"])


def test_fused_mlp_on_a_cpu_is_refused_with_the_reason(tmp_path):
    folder = write_tiny_model(tmp_path / "llama")
    with pytest.raises(ValueError, match=r"--fused-mlp on: the fused MLP is a CUDA kernel "
                                         r"\(quack's Hopper GEMM\) \(use --fused-mlp off\)"):
        build(["--model", str(folder), "--device", "cpu", "--fused-mlp", "on"])


def test_gemv_on_a_cpu_is_refused_with_the_reason(tmp_path):
    folder = write_tiny_model(tmp_path / "llama")
    with pytest.raises(ValueError, match=r"--gemv on needs a CUDA device \(its kernels are "
                                         r"Triton's\)"):
        build(["--model", str(folder), "--device", "cpu", "--gemv", "on"])


def test_pdl_on_a_cpu_is_refused_with_the_reason(tmp_path):
    folder = write_tiny_model(tmp_path / "llama")
    with pytest.raises(ValueError, match=r"--pdl on needs a CUDA device of compute capability "
                                         r"9.0 or later"):
        build(["--model", str(folder), "--device", "cpu", "--pdl", "on"])
    build(["--model", str(folder), "--device", "cpu", "--pdl", "auto"])  # auto: off here


def build(argv: list[str]) -> runtime.Built:
    return runtime.build(parse(argv, {}), ranks.alone(), torch.device("cpu"))
