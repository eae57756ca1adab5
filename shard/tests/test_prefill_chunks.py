"""--prefill-chunk-ms: while sequences decode, a step holds at most the tokens that warm-up
measured to run within the target, so running streams are not stalled behind a long prompt."""

from __future__ import annotations

import pytest
import torch

from shard.config import parse
from shard.scheduler import largest_within
from shard.server import Started
from shard.tests import in_process
from shard.tests.test_engine import Driver, Recorder, random_prompt, request
from shard.tests.test_scheduler import finish_prefill, make_scheduler, seq
from shard.tests.tiny_model import write_tiny_model


# -- choosing the bound ------------------------------------------------------------------------

def test_the_bound_is_the_largest_size_within_the_target_found_by_bisection():
    sizes = list(range(256, 4097, 256))  # 16 sizes
    asked = []

    def seconds(tokens: int) -> float:
        asked.append(tokens)
        return 0.002 + tokens * 20e-6  # 2 ms + 20 µs per token

    assert largest_within(0.040, sizes, seconds) == 1792  # 37.84 ms; 2048 takes 42.96
    assert asked[0] == 4096 and len(asked) <= 1 + 4  # the largest, then log2(15) rounded up
    assert largest_within(0.100, sizes, seconds) == 0  # the largest fits: no bound
    assert largest_within(0.001, sizes, seconds) == 256  # nothing fits: the smallest
    assert largest_within(seconds(512), sizes, seconds) == 512  # exactly at the target counts


# -- the scheduler under the bound -------------------------------------------------------------

def test_the_prefill_budget_beside_decodes_is_the_bound_less_the_decodes():
    scheduler = make_scheduler(max_prefill_tokens=1000)
    assert scheduler.prefill_budget(10) == 1000  # no bound set
    scheduler.step_tokens_while_decoding = 256
    assert scheduler.prefill_budget(0) == 1000  # nothing decodes: the whole budget
    assert scheduler.prefill_budget(10) == 246
    assert scheduler.prefill_budget(250) == 64  # a quarter of the bound at least
    scheduler.step_tokens_while_decoding = 2000
    assert scheduler.prefill_budget(10) == 1000  # never above --max-batch-prefill-tokens


def test_a_step_beside_decodes_splits_the_bounded_budget_oldest_prompt_first():
    scheduler = make_scheduler(num_blocks=100, block_size=4, max_prefill_tokens=64)
    scheduler.step_tokens_while_decoding = 32
    decoding = [seq(1, 4, 8), seq(2, 4, 8)]
    prompts = [seq(3, 20, 2), seq(4, 30, 2)]
    for s in decoding + prompts:
        scheduler.add(s)
    scheduler.admit()
    for s in decoding:
        finish_prefill(s)
    step = scheduler.schedule()
    assert step.decodes == decoding
    assert [(s.request_id, n) for s, n in step.prefills] == [(3, 20), (4, 10)]  # 32 - 2 decodes
    for s in decoding:
        s.num_generated = s.max_new_tokens  # done: nothing decodes any more
    step = scheduler.schedule()
    assert not step.decodes
    assert [(s.request_id, n) for s, n in step.prefills] == [(3, 20), (4, 30)]  # all 64


# -- measured in warm-up, reported, obeyed -----------------------------------------------------

def start(folder, *flags: str) -> Started:
    return in_process.start(["--model", str(folder), "--device", "cpu",
                             "--max-batch-total-tokens", "4096", "--max-batch-prefill-tokens",
                             "1024", *flags])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("llama"))


@pytest.mark.parametrize("flags, bound", [
    ((), 0),  # auto: off on the cpu
    (("--prefill-chunk-ms", "0"), 0),
    (("--prefill-chunk-ms", "1e9"), 0),  # 1,024 tokens run within it: no bound needed
    (("--prefill-chunk-ms", "1e-6"), 256),  # nothing does: the smallest step, 256 tokens
])
def test_warm_up_measures_the_bound_and_info_reports_it(folder, flags, bound):
    started = start(folder, *flags)
    assert started.engine.scheduler.step_tokens_while_decoding == bound
    assert started.info().prefill_chunk_tokens == bound
    assert started.engine.allocator.free_tokens == 4096  # the timed requests left nothing behind


def test_the_timed_warm_up_steps_stay_out_of_the_metrics(folder):
    started = start(folder, "--prefill-chunk-ms", "1e-6", "--metrics-port", "0")
    assert started.engine.scheduler.step_tokens_while_decoding == 256  # it did time steps
    registry = started.engine.metrics.registry
    assert registry.get_sample_value("sluice_shard_step_duration_seconds_count") == 0
    assert registry.get_sample_value("sluice_shard_prefill_tokens_total") == 0


def test_a_long_prompt_beside_a_decoding_stream_advances_in_bounded_steps(folder):
    engine = start(folder, "--prefill-chunk-ms", "1e-6").engine
    driver, stream = Driver(engine), Recorder(engine)
    long_prompt = random_prompt(700, seed=7)
    driver.submit(stream, [request(stream, 1, long_prompt, 3)])  # alone: one step of 700
    driver.run_until_done()
    alone = stream.tokens(1)

    driver.submit(stream, [request(stream, 0, random_prompt(8, seed=8), 40)])
    driver.step()  # its prefill; from now on it decodes
    driver.submit(stream, [request(stream, 2, long_prompt, 3)])
    chunks = []
    while True:
        driver.step()
        step = engine.last_step
        assert len(step.decodes) + sum(n for _, n in step.prefills) <= 256
        chunks += [n for s, n in step.prefills if s.request_id == 2]
        if sum(chunks) == 700:
            break
    assert chunks == [255, 255, 190]  # 256 less the one decode beside them
    driver.run_until_done()
    assert stream.tokens(2) == alone and len(stream.tokens(0)) == 40 and not stream.errors()


def test_the_flag_rejects_what_is_not_a_duration():
    for value in ("-1", "fast", "inf", "nan"):
        with pytest.raises(SystemExit):
            parse(["--prefill-chunk-ms", value], {})
    assert parse(["--prefill-chunk-ms", "25"], {}).prefill_chunk_ms == "25"
