"""The engine on the GPU: bf16 model against transformers, CUDA-graph decode against eager.

Collected only where a CUDA GPU is present (see conftest.py); run on the lent H100.
"""

from __future__ import annotations

import gc

import pytest
import torch

from shard import decode_gemm as shard_decode_gemm
from shard import fused_mlp as shard_fused_mlp
from shard import loader
from shard.attention import (FlashAttention, TorchVarlenAttention, flash_unavailable,
                             select_backend)
from shard import plan as step_plan
from shard.cuda_graphs import DecodeGraphs, PiecewiseGraphs
from shard.parallel import TensorParallel
from shard.server import Started
from shard.source import ModelSource
from shard.tests import in_process
from shard.tests.test_llama_matches_transformers import paged_logits
from shard.tests.test_warm_up import assert_no_compiling_after_warm_up
from shard.tests.tiny_model import write_tiny_model

CUDA = torch.device("cuda")
# head_dim 64: FlashAttention-4's smallest supported head size.
SHAPE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4,
             num_key_value_heads=2, num_hidden_layers=3, initializer_range=0.05)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("cuda") / "llama", **SHAPE)


def relative_error(a, b) -> float:
    return ((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm()).item()


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("attention, decode", [("torch", "triton"), ("torch", "flash"),
                                               ("flash", "triton"), ("flash", "flash")])
@pytest.mark.parametrize("fused_rotary, quack, gemv", [
    (False, False, False), (True, False, False), (True, True, False), (True, False, True),
    (True, True, True)], ids=["separate", "fused-rotary", "fused-rotary-mlp-gemm",
                              "fused-rotary-gemv", "all"])
def test_bfloat16_model_on_the_gpu_is_as_close_to_float32_as_transformers_bfloat16(
        folder, attention, decode, compiled, fused_rotary, quack, gemv, monkeypatch):
    """The float32 equivalence is proven on the CPU (our model against transformers to 1e-3)
    and the kernels against float64. On the GPU, in bfloat16, our model must be no further
    from transformers' float32 logits than transformers' own bfloat16 model is. (Both round at
    different points: on this small random model a fixed tolerance would measure the model's
    sensitivity, not our code.)"""
    from transformers import AutoModelForCausalLM

    if attention == "flash" and flash_unavailable(CUDA):
        pytest.fail(f"flash backend expected on this GPU: {flash_unavailable(CUDA)}")
    # quack: every step through the fused gate/up, however small (the 16-token chunks in
    # quack's default configuration, the last 8 tokens in the one sized to the GPU), and its
    # other products through --decode-gemm's narrow tiles. gemv: the 16-token chunks and the
    # decodes through shard/gemv.py's kernels instead (they take 1-16 rows first).
    monkeypatch.setattr(shard_fused_mlp, "MIN_ROWS", 1)
    monkeypatch.setattr(shard_fused_mlp, "MIN_TOKENS", 16)
    monkeypatch.setattr(shard_decode_gemm, "MIN_ROWS", 1)
    monkeypatch.setattr(shard_decode_gemm, "MAX_ROWS", 10**6)
    ours = loader.load(ModelSource("tiny", folder), TensorParallel(), CUDA,
                       torch.bfloat16, select_backend(attention, CUDA, decode),
                       compiled=compiled, fused_rotary=fused_rotary, fused_mlp=quack,
                       decode_gemm=quack, gemv=gemv).model
    assert ours.layers[0].self_attn.ops.fused_rotary == fused_rotary
    assert (ours.layers[0].mlp.ops.swiglu_linear is not None) == (quack or gemv)
    product = ours.layers[0].self_attn.o_proj.product
    assert ours.layers[0].mlp.ops.gemv == gemv == hasattr(product, "larger")
    assert (getattr(product, "larger", product) is shard_decode_gemm.linear) == quack
    prompt = torch.randint(3, 320, (40,), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        truth = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()(
            prompt[None]).logits[0]
        hf_bf16 = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to(
            CUDA).eval()(prompt[None].to(CUDA)).logits[0].float()
    got = paged_logits(ours, prompt, [], block_size=16, max_prefill_tokens=16, device=CUDA)
    reference_error = relative_error(hf_bf16, truth)
    assert relative_error(got, truth) <= 1.25 * reference_error + 1e-3, reference_error


def run_greedy(folder, graphs: str, prompts: list[torch.Tensor], max_new: int, *flags: str
               ) -> tuple[Started, list[list[int]]]:
    started = in_process.start(["--model", str(folder), "--max-batch-total-tokens", "4096",
                                "--cuda-graphs", graphs, "--max-batch-size", "16", *flags])
    from shard.tests.test_engine import Driver, Recorder, request

    engine = started.engine
    driver, stream = Driver(engine), Recorder(engine)
    driver.submit(stream, [request(stream, i, p, max_new) for i, p in enumerate(prompts)])
    driver.run_until_done()
    return started, [stream.tokens(i) for i in range(len(prompts))]


def step_batch(started: Started, step, admitted=()):
    """The batch the runner builds for `step` (taking in `admitted`), not run: in inference
    mode, as ModelRunner.execute builds it (a decode graph's staging is an inference
    tensor)."""
    with torch.inference_mode():
        return started.warm.runner.prepare(step_plan.make(step, list(admitted)))


@pytest.mark.parametrize("attention", ["flash", "torch"])
@pytest.mark.parametrize("graphs", [("auto", "16,32"), ("0", "0")], ids=["graphs", "eager"])
def test_steps_after_warm_up_compile_nothing(folder, graphs, attention):
    """Decode graphs, eager steps (past the largest piecewise bucket, or all of them) and the
    greedy pick at every batch size find their compiled code (test_warm_up.py)."""
    assert_no_compiling_after_warm_up(
        ["--model", str(folder), "--max-batch-total-tokens", "4096", "--max-batch-size", "16",
         "--cuda-graphs", graphs[0], "--cuda-graph-tokens", graphs[1], "--attention", attention])


@pytest.mark.parametrize("attention", ["flash", "torch"])
@pytest.mark.parametrize("gemv", ["off", "on"], ids=["cublas", "gemv-pdl"])
def test_cuda_graph_decode_gives_the_logits_of_eager_decode(folder, attention, gemv):
    """Under flash, and under torch with its decode rows through the Triton kernel; with
    --gemv and --pdl, the captured step's products and norms are shard/gemv.py's kernels and
    our kernels launch early (shard/pdl.py)."""
    from shard import pdl

    if attention == "flash" and flash_unavailable(CUDA):
        pytest.fail(f"flash backend expected on this GPU: {flash_unavailable(CUDA)}")
    started, _ = run_greedy(folder, "1,2,4,8", [torch.arange(3, 20)], 2,
                            "--attention", attention, "--gemv", gemv, "--pdl", gemv)
    engine, runner = started.engine, started.warm.runner
    assert runner.model.layers[0].mlp.ops.gemv == (gemv == "on") == pdl.enabled(CUDA)
    expected = FlashAttention if attention == "flash" else TorchVarlenAttention
    assert isinstance(runner.attention, expected) and runner.graphs.decode is not None
    # The same decode step, replayed from a graph and run eagerly, gives the same logits.
    from shard.tests.test_engine import Recorder, request

    stream = Recorder(engine)
    seqs = [request(stream, 100 + i, torch.arange(5, 12 + i), 4) for i in range(3)]
    engine.submit(stream, seqs)
    engine.run_iteration()  # prefill
    step = engine.scheduler.schedule()
    assert not step.prefills and len(step.decodes) == 3
    batch = step_batch(started, step)
    # The step's tensors went straight into the size-4 graph's inputs (batch.Staging).
    staged = runner.graphs.decode.staging[4]
    assert batch.positions.data_ptr() == staged.positions.data_ptr()
    assert batch.layout.block_table.data_ptr() == staged.block_table.data_ptr()
    with torch.inference_mode():
        # Each sequence's input token, which the graph reads itself: its prefill's pick.
        inputs = runner.last_tokens[batch.sample_slots].clone()
        logits = runner.graphs.decode.replay(batch)
        graphed = logits.float().clone()
        # The greedy graph picks over the same logits what the sampler's stage picks, and
        # keeps the tokens where the next step reads them: each sequence's slot, and the
        # padding row's in the slot past them all.
        runner.last_tokens.fill_(-1)
        picked = runner.graphs.decode.greedy(3)
        kept = runner.last_tokens.clone()
        tokens, chosen, reported = runner.sampler.greedy_stage(logits)
        hidden = runner.model(batch.input_ids, batch.positions, runner.kv_cache.layers,
                              runner.attention.prepare(batch.layout))
        eager = runner.model.compute_logits(hidden).float()
    assert torch.equal(batch.input_ids, inputs) and batch.input_ids.shape == (3,)
    assert relative_error(graphed, eager) < 1e-2
    assert torch.equal(picked.tokens, tokens) and torch.equal(picked.tokens, graphed.argmax(-1))
    assert torch.equal(picked.logprobs, chosen) and torch.equal(picked.reported, reported)
    padding = runner.graphs.decode.logits[3].argmax()
    expected_kept = torch.full_like(kept, -1)
    expected_kept[batch.sample_slots] = picked.tokens
    expected_kept[-1] = padding
    assert torch.equal(kept, expected_kept)


@pytest.mark.parametrize("attention", ["flash", "torch"])
def test_engine_replays_a_graph_for_every_step_a_graph_holds(folder, attention, monkeypatch):
    """Mixed requests to their lengths: every decode-only step replays a decode graph, every
    step with a prompt chunk (all within the token buckets) replays the piecewise graphs, and
    no step runs the model eagerly; every decode-only step picks its greedy tokens in a graph
    too."""
    replays = {"decode": 0, "piecewise": 0, "eager": 0, "greedy": 0}
    for name, cls, method in (("decode", DecodeGraphs, "replay"),
                              ("piecewise", PiecewiseGraphs, "run"),
                              ("greedy", DecodeGraphs, "greedy")):
        real = getattr(cls, method)

        def counted(self, *args, real=real, name=name, **kwargs):
            replays[name] += 1
            return real(self, *args, **kwargs)

        monkeypatch.setattr(cls, method, counted)
    prompts = [torch.randint(3, 320, (n,), generator=torch.Generator().manual_seed(n))
               for n in (3, 17, 40, 9, 64)]
    started = in_process.start(["--model", str(folder), "--max-batch-total-tokens", "4096",
                                "--max-batch-size", "16", "--attention", attention])
    from shard.tests.test_engine import Driver, Recorder, request

    replays.update(decode=0, piecewise=0, greedy=0)  # warm-up's own steps replayed graphs too
    model = started.warm.runner.model
    real_forward = type(model).forward
    monkeypatch.setattr(type(model), "forward", lambda self, *args, **kwargs: (
        replays.__setitem__("eager", replays["eager"] + 1) or real_forward(self, *args,
                                                                           **kwargs)))
    engine = started.engine
    driver, stream = Driver(engine), Recorder(engine)
    driver.submit(stream, [request(stream, i, p, 12) for i, p in enumerate(prompts)])
    steps = {"decode": 0, "piecewise": 0}
    while driver.busy():
        driver.step()
        if engine.last_step is not None:
            steps["piecewise" if engine.last_step.prefills else "decode"] += 1
    assert [len(stream.tokens(i)) for i in range(5)] == [12] * 5
    assert replays == {**steps, "eager": 0, "greedy": steps["decode"]}
    assert steps["decode"] >= 10


def test_torch_backend_without_triton_decode_rows_captures_no_decode_graphs(folder):
    """varlen_attn over gathered contexts depends on their lengths: its decode steps run
    eagerly (the piecewise graphs still hold the layers of steps with prompts)."""
    started, tokens = run_greedy(folder, "auto", [torch.arange(3, 20)], 5,
                                 "--attention", "torch", "--decode-attention", "flash")
    graphs = started.warm.runner.graphs
    assert graphs.decode is None and graphs.piecewise is not None
    assert len(tokens[0]) == 5


def test_async_scheduling_gives_the_tokens_of_synchronous_steps(folder):
    """Greedy tokens of requests joining at once, with graphs and compiled stages (the CUDA
    defaults), are the same whether step n+1 is launched before step n's tokens are read."""
    prompts = [torch.randint(3, 320, (n,), generator=torch.Generator().manual_seed(n))
               for n in (5, 30, 12, 61, 2)]
    started, overlapped = run_greedy(folder, "auto", prompts, 9)
    assert started.engine.async_scheduling and started.built.compiled
    layer = started.built.loaded.model.layers[0]
    assert layer.self_attn.ops.fused_rotary  # the CUDA default
    # And on Hopper with quack installed (the image's flash extra), the fused MLP (--gemv's
    # kernels are off by default).
    assert layer.mlp.ops.fused_mlp and not layer.mlp.ops.gemv
    # Same kernels both ways (compiled and eager stages round differently in bfloat16).
    _, synchronous = run_greedy(folder, "auto", prompts, 9, "--async-scheduling", "off")
    assert overlapped == synchronous


@pytest.mark.parametrize("quack", [False, True], ids=["cublas", "quack"])
@pytest.mark.parametrize("attention", ["flash", "torch"])
def test_piecewise_graphs_give_the_hidden_states_and_cache_of_an_eager_step(
        folder, attention, quack, monkeypatch):
    """A step with prefill chunks and decodes, padded to its token bucket: the real rows get the
    hidden states an eager forward gives, the real K/V land in their slots, and the padding rows
    write only the scratch block. quack: every step's gate/up (graphs captured in warm-up
    included) is quack's fused product, whatever its size (this step's, padded to 64 rows, in
    quack's default configuration, the decode graphs' in the one sized to the GPU), and every
    other product --decode-gemm's narrow tiles."""
    monkeypatch.setattr(shard_fused_mlp, "MIN_ROWS", 1)
    monkeypatch.setattr(shard_fused_mlp, "MIN_TOKENS", 64)
    monkeypatch.setattr(shard_decode_gemm, "MIN_ROWS", 1)
    monkeypatch.setattr(shard_decode_gemm, "MAX_ROWS", 10**6)
    setting = "on" if quack else "off"
    started, _ = run_greedy(folder, "auto", [torch.arange(3, 20)], 2, "--attention", attention,
                            "--fused-mlp", setting, "--decode-gemm", setting)
    layer = started.built.loaded.model.layers[0]
    assert (layer.mlp.ops.swiglu_linear is not None) == quack
    assert (layer.mlp.down_proj.product is shard_decode_gemm.linear) == quack
    engine, runner = started.engine, started.warm.runner
    batch = mixed_step(started)
    scratch = engine.allocator.num_blocks
    with torch.inference_mode():
        before = [(k.clone(), v.clone()) for k, v in runner.kv_cache.layers]
        meta = runner.attention.prepare(batch.layout)
        graphed = runner.graphs.piecewise.run(batch, meta).clone()
        after_graphs = [(k.clone(), v.clone()) for k, v in runner.kv_cache.layers]
        for (k, v), (k0, v0) in zip(runner.kv_cache.layers, before):  # undo, then eagerly
            k.copy_(k0)
            v.copy_(v0)
        eager = runner.model(batch.input_ids, batch.positions, runner.kv_cache.layers,
                             runner.attention.prepare(batch.layout))
    assert relative_error(graphed, eager) < 1e-2
    written = batch.layout.slot_mapping.cpu()
    for layer, ((k, v), (k0, v0)) in enumerate(zip(after_graphs, before)):
        heads, dim = k.shape[-2:]
        for got, eager_cache, old in ((k, runner.kv_cache.layers[layer][0], k0),
                                      (v, runner.kv_cache.layers[layer][1], v0)):
            got, eager_cache, old = (t.view(-1, heads, dim).cpu() for t in (got, eager_cache, old))
            assert relative_error(got[written], eager_cache[written]) < 1e-2, f"layer {layer}"
            untouched = torch.ones(got.shape[0], dtype=torch.bool)
            untouched[written] = False
            untouched.view(-1, engine.allocator.block_size)[scratch] = False
            assert torch.equal(got[untouched], old[untouched]), f"layer {layer}: padding leaked"


def mixed_step(started: Started):
    """The batch of a step with two decodes and a 33-token prompt, built but not run."""
    engine = started.engine
    assert started.warm.runner.graphs.piecewise is not None
    from shard.tests.test_engine import Recorder, request

    stream = Recorder(engine)
    engine.submit(stream, [request(stream, 200 + i, torch.arange(5, 12 + i), 6)
                           for i in range(2)])
    engine.run_iteration()  # their prefill: now they decode
    engine.scheduler.add(request(stream, 300, torch.randint(3, 320, (33,)), 2))
    admitted = engine.scheduler.admit()
    step = engine.scheduler.schedule()
    assert len(step.decodes) == 2 and sum(n for _, n in step.prefills) == 33
    batch = step_batch(started, step, admitted)
    assert batch.input_ids.shape[0] == 35
    assert started.warm.runner.graphs.piecewise.fits(35)  # padded to 64
    return batch


@pytest.mark.parametrize("attention", ["flash", "torch"])
def test_piecewise_graphs_give_the_sampling_rows_of_an_eager_step(folder, attention):
    """--last-layer-rows sampled: the step's 3 sampling rows through the tail graph of 4 rows,
    20 rows (more than the largest tail, 16: the whole last piece, then those rows), and none
    (no tail at all), each against the same rows of an eager forward of every row. Running the
    step again rewrites the same keys and values, so each run sees the same cache."""
    started, _ = run_greedy(folder, "auto", [torch.arange(3, 20)], 2, "--attention", attention)
    runner = started.warm.runner
    piecewise = runner.graphs.piecewise
    assert piecewise.row_sizes == [1, 2, 4, 8, 16]
    batch = mixed_step(started)
    with torch.inference_mode():
        eager = runner.model(batch.input_ids, batch.positions, runner.kv_cache.layers,
                             runner.attention.prepare(batch.layout)).clone()
        eager_rows = runner.model(batch.input_ids, batch.positions, runner.kv_cache.layers,
                                  runner.attention.prepare(batch.layout), batch.sample_rows)
        assert relative_error(eager_rows, eager[batch.sample_rows]) < 1e-2
        for rows in (batch.sample_rows, torch.arange(34, 14, -1, device=CUDA),
                     batch.sample_rows[:0]):
            meta = runner.attention.prepare(batch.layout)
            graphed = piecewise.run(batch, meta, rows).clone()
            assert graphed.shape == (rows.shape[0], eager.shape[1])
            if rows.shape[0]:
                assert relative_error(graphed, eager[rows]) < 1e-2, rows.shape[0]
    assert batch.sample_rows.shape[0] == 3


def test_captures_hold_when_an_old_graph_is_garbage(folder, monkeypatch):
    """A graph left in a reference cycle (as a dropped runtime leaves its graphs) is destroyed
    whenever Python's cycle collector runs; in the middle of a capture that invalidates the
    capture. Here such a cycle is made as each of warm-up's first captures begins, with the
    collector due at the next allocation: the captures must hold, and the runtime serve."""
    def captured_graph() -> torch.cuda.CUDAGraph:
        graph, x = torch.cuda.CUDAGraph(), torch.zeros(1, device=CUDA)
        with torch.cuda.graph(graph):
            x.add_(1)
        return graph

    spares = [captured_graph() for _ in range(4)]
    threshold = gc.get_threshold()
    real_begin, real_end = torch.cuda.CUDAGraph.capture_begin, torch.cuda.CUDAGraph.capture_end

    def capture_begin(self, *args, **kwargs):
        real_begin(self, *args, **kwargs)
        if spares:
            cycle = [spares.pop()]
            cycle.append(cycle)  # garbage now, freed when the collector next runs,
            gc.set_threshold(1, *threshold[1:])  # which is at the next allocation

    def capture_end(self, *args, **kwargs):
        gc.set_threshold(*threshold)
        real_end(self, *args, **kwargs)

    monkeypatch.setattr(torch.cuda.CUDAGraph, "capture_begin", capture_begin)
    monkeypatch.setattr(torch.cuda.CUDAGraph, "capture_end", capture_end)
    try:
        started, tokens = run_greedy(folder, "auto", [torch.arange(3, 20)], 4)
    finally:
        gc.set_threshold(*threshold)
    assert not spares and len(tokens[0]) == 4
    graphs = started.warm.runner.graphs
    assert graphs.decode is not None and graphs.piecewise is not None


def test_engine_runs_every_chunked_step_through_piecewise_graphs(folder, monkeypatch):
    """Prompts in chunks of 48 tokens beside decodes: every step with a chunk replays the
    piecewise graphs (whose rows the test above checks against eager), and every request
    reaches its length."""
    calls = []
    real_run = PiecewiseGraphs.run
    monkeypatch.setattr(PiecewiseGraphs, "run", lambda self, batch, meta, rows=None: calls.append(
        batch.input_ids.shape[0] - batch.layout.num_decodes) or real_run(self, batch, meta, rows))
    prompts = [torch.randint(3, 320, (n,), generator=torch.Generator().manual_seed(n))
               for n in (5, 30, 12, 61, 2, 100)]
    _, tokens = run_greedy(folder, "auto", prompts, 8, "--max-batch-prefill-tokens", "48")
    assert [len(t) for t in tokens] == [8] * 6
    # Every prompt token went through them: 210, plus the warm-up request's 16; no step with
    # a chunk ran eagerly (the buckets reach 48 + 16 tokens).
    assert sum(calls) == 210 + 16 and max(calls) <= 48


def test_a_steps_integer_tensors_reach_the_gpu_16_byte_aligned():
    """Triton specializes a kernel on whether each pointer argument is 16-byte aligned: a step
    whose token count was odd left its positions 8-byte aligned and compiled
    _rotary_cache_kernel again in the middle of serving."""
    from shard.batch import to_device

    tensors = [torch.arange(3), torch.arange(10, 15), torch.arange(7, dtype=torch.int32),
               torch.arange(4).view(2, 2), torch.arange(1)]
    got = to_device(CUDA, *tensors)
    for sent, arrived in zip(tensors, got):
        assert arrived.device.type == "cuda" and arrived.dtype == sent.dtype
        assert torch.equal(arrived.cpu(), sent)
        assert arrived.data_ptr() % 16 == 0
