"""The engine's step loop, driven synchronously on a tiny random Llama.

The engine is built as shard/runtime.py builds it (model runner over the model and its KV
cache, scheduler over the allocator, torch attention), and `engine.run_iteration()` runs in the
test thread. A recording Stream keeps every
GenerateResponse, and checks on each one that the reported free budget is the allocator's.

Every test runs twice: with synchronous steps, and with async scheduling (step n+1 launched
before step n's tokens are read, as on CUDA), where tokens reach the streams one iteration
later but must be the same tokens, with the same finishes, budgets and cancellations.
"""

from __future__ import annotations

import pytest
import torch

from shard import loader
from shard.attention import TorchAttention
from shard.engine import Engine, ShardLimits, Stream
from shard.kv_cache import BlockAllocator, KVCache
from shard.parallel import TensorParallel
from shard.runner import Graphs, ModelRunner
from shard.sampling import Sampler, SamplingParams
from shard.scheduler import Scheduler, Sequence
from shard.source import ModelSource
from sluice.v1 import generate_pb2 as pb

CPU = torch.device("cpu")
NONE, LENGTH = pb.FINISH_REASON_NONE, pb.FINISH_REASON_LENGTH
EOS, STOP = pb.FINISH_REASON_EOS_TOKEN, pb.FINISH_REASON_STOP_TOKEN


ASYNC_SCHEDULING = False  # make_engine's default; the autouse fixture below sets it per run


@pytest.fixture(autouse=True, params=[False, True], ids=["sync", "async"])
def scheduling(request, monkeypatch):
    monkeypatch.setitem(globals(), "ASYNC_SCHEDULING", request.param)
    return request.param


@pytest.fixture(scope="module")
def model(tiny_llama):
    return loader.load(ModelSource("tiny", tiny_llama), TensorParallel(), CPU, torch.float32,
                       TorchAttention()).model


class Recorder(Stream):
    """A router stream that keeps what the engine sends it."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.responses: list[pb.GenerateResponse] = []

    def send(self, response: pb.GenerateResponse) -> None:
        # Sent at the end of a step: the budget it reports is the allocator's at that moment.
        assert response.free_budget_tokens == self.engine.allocator.free_tokens
        self.responses.append(response)

    def tokens(self, request_id: int) -> list[int]:
        return [t for r in self.responses for i, t in zip(r.tokens.ids, r.tokens.token_ids)
                if i == request_id]

    def finish_reasons(self, request_id: int) -> list[int]:
        return [f for r in self.responses for i, f in zip(r.tokens.ids, r.tokens.finish_reasons)
                if i == request_id]

    def admitted(self) -> list[list[int]]:
        return [list(r.admitted_ids) for r in self.responses]

    def errors(self) -> dict[int, str]:
        return {e.id: e.message for r in self.responses for e in r.errors}

    def finished(self, request_id: int) -> bool:
        reasons = self.finish_reasons(request_id)
        return request_id in self.errors() or bool(reasons) and reasons[-1] != NONE


class Driver:
    """Steps the engine in the test thread.

    Engine.run_iteration() sleeps on its inbox when the scheduler is idle (the engine thread's wait for
    work). Here that would hang the test, so the driver refuses to step an idle engine that has
    no command pending, and says so.
    """

    def __init__(self, engine: Engine):
        self.engine = engine
        self.mail = False
        self.steps = 0

    def submit(self, stream: Stream, sequences: list[Sequence]) -> None:
        self.engine.submit(stream, sequences)
        self.mail = True

    def cancel(self, stream: Stream, request_ids: list[int]) -> None:
        self.engine.cancel(stream, request_ids)
        self.mail = True

    def close(self, stream: Stream) -> None:
        self.engine.close_stream(stream)
        self.mail = True

    def open(self, stream: Stream) -> None:
        self.engine.open_stream(stream)
        self.mail = True

    def step(self) -> None:
        scheduler = self.engine.scheduler
        if scheduler.idle and not self.mail:
            raise AssertionError(
                f"the engine would sleep on its inbox with {len(scheduler.waiting)} requests "
                f"waiting and {len(scheduler.running)} running")
        self.mail = False
        self.engine.run_iteration()
        self.steps += 1

    def busy(self) -> bool:
        s = self.engine.scheduler
        return self.mail or bool(s.running) or bool(s.waiting)

    def run_until_done(self, max_steps: int = 1000) -> None:
        for _ in range(max_steps):
            if not self.busy():
                return
            self.step()
        raise AssertionError(f"not done after {max_steps} steps")


def make_engine(model, total_tokens: int = 1024, block_size: int = 4, max_prefill_tokens: int = 64,
                max_batch_size: int = 16, eos_token_ids: tuple[int, ...] = (2,),
                async_scheduling: bool | None = None, sampled_rows_only: bool = True):
    num_blocks = total_tokens // block_size
    allocator = BlockAllocator(num_blocks, block_size)
    kv_cache = KVCache(model.config, 1, num_blocks, block_size, torch.float32, CPU)
    max_total = min(total_tokens, model.config.max_position_embeddings)
    limits = ShardLimits(max_input_tokens=max_total - 1, max_total_tokens=max_total,
                         max_batch_prefill_tokens=max_prefill_tokens,
                         max_batch_size=max_batch_size)
    if async_scheduling is None:
        async_scheduling = ASYNC_SCHEDULING
    scheduler = Scheduler(allocator, max_batch_size, max_prefill_tokens, max_total)
    runner = ModelRunner(model, kv_cache, TorchAttention(), TensorParallel(), CPU, max_batch_size,
                         scheduler.max_blocks, block_size,
                         Sampler(model.config.vocab_size, max_batch_size, CPU), Graphs(),
                         sampled_rows_only)
    engine = Engine(runner.execute, scheduler, limits, model.config.vocab_size, eos_token_ids,
                    async_scheduling)
    return engine, Driver(engine), Recorder(engine)


def request(stream: Stream, request_id: int, prompt: list[int] | torch.Tensor, max_new_tokens: int,
            ignore_eos: bool = True, stop_token_ids=(), sampling=SamplingParams()) -> Sequence:
    return Sequence(request_id=request_id, stream=stream,
                    prompt=torch.as_tensor(prompt, dtype=torch.long), sampling=sampling,
                    max_new_tokens=max_new_tokens, ignore_eos=ignore_eos,
                    stop_token_ids=frozenset(stop_token_ids))


def random_prompt(length: int, seed: int, vocab: int = 320) -> torch.Tensor:
    return torch.randint(3, vocab, (length,), generator=torch.Generator().manual_seed(seed))


def generate_alone(model, prompt, max_new_tokens: int, **engine_kwargs) -> list[int]:
    engine, driver, stream = make_engine(model, **engine_kwargs)
    driver.submit(stream, [request(stream, 0, prompt, max_new_tokens)])
    driver.run_until_done()
    assert stream.finish_reasons(0)[-1] == LENGTH
    return stream.tokens(0)


# -- continuous batching -----------------------------------------------------------------------

PROMPT_LENS = [3, 40, 17, 8, 25, 5, 33, 12]
MAX_NEW = [20, 1, 7, 15, 3, 20, 10, 5]
SUBMIT_AT_STEP = [0, 0, 2, 2, 5, 6, 6, 12]


def test_requests_joining_mid_generation_produce_the_same_tokens_as_alone(model):
    prompts = [random_prompt(n, seed=i) for i, n in enumerate(PROMPT_LENS)]
    alone = [generate_alone(model, p, n, max_prefill_tokens=16)
             for p, n in zip(prompts, MAX_NEW)]
    engine, driver, stream = make_engine(model, max_prefill_tokens=16)
    largest_batch = 0
    for step in range(200):
        new = [request(stream, i, prompts[i], MAX_NEW[i])
               for i, at in enumerate(SUBMIT_AT_STEP) if at == step]
        if new:
            driver.submit(stream, new)
        if step > max(SUBMIT_AT_STEP) and not driver.busy():
            break
        driver.step()
        largest_batch = max(largest_batch, len(engine.scheduler.running))
    assert largest_batch >= 4  # they really ran together
    for i in range(len(PROMPT_LENS)):
        assert stream.tokens(i) == alone[i], f"request {i}"
        assert len(alone[i]) == MAX_NEW[i]
        assert stream.finish_reasons(i) == [NONE] * (MAX_NEW[i] - 1) + [LENGTH]
    assert engine.allocator.free_tokens == engine.allocator.total_tokens


def test_each_step_emits_one_message_per_stream_with_all_its_new_tokens(model):
    engine, driver, stream = make_engine(model)
    driver.submit(stream, [request(stream, i, random_prompt(4, i), 3) for i in range(5)])
    driver.run_until_done()
    # Prefill + 2 decodes, all together. Async: the first iteration only admits, and a fourth
    # launches nothing and emits the last decode's tokens.
    overlap = engine.async_scheduling
    assert len(stream.responses) == driver.steps == (4 if overlap else 3)
    with_tokens = stream.responses[1:] if overlap else stream.responses
    assert list(stream.responses[0].admitted_ids) == list(range(5))
    for r in with_tokens:
        assert sorted(r.tokens.ids) == list(range(5))
        assert len(r.tokens.token_ids) == len(r.tokens.logprobs) == 5


def test_a_prompt_longer_than_the_prefill_budget_is_prefilled_in_chunks_when_alone(model):
    prompt = random_prompt(40, seed=3)
    whole = generate_alone(model, prompt, 4, max_prefill_tokens=64)
    engine, driver, stream = make_engine(model, max_prefill_tokens=16)
    driver.submit(stream, [request(stream, 0, prompt, 4)])
    driver.run_until_done()
    # Chunks of 16, 16 and 8 tokens; the first two chunks sample nothing (the first step
    # reports the admission, the second sends nothing), then 3 decodes (async: one more
    # iteration emits the last).
    assert driver.steps == 3 + 3 + engine.async_scheduling
    assert [len(r.tokens.ids) for r in stream.responses] == [0, 1, 1, 1, 1]
    assert stream.tokens(0) == whole and not stream.errors()


# -- the budget --------------------------------------------------------------------------------

BUDGET = 48  # 12 blocks of 4; each request below reserves 6 + 10 tokens = 4 blocks


def budget_requests(stream, ids, max_new_tokens=10):
    return [request(stream, i, random_prompt(6, seed=i), max_new_tokens) for i in ids]


def test_requests_beyond_the_budget_wait_without_error_and_are_admitted_later(model):
    engine, driver, stream = make_engine(model, total_tokens=BUDGET)
    assert engine.allocator.free_tokens == BUDGET
    driver.submit(stream, budget_requests(stream, range(5)))
    driver.step()
    first = stream.responses[0]
    assert list(first.admitted_ids) == [0, 1, 2]
    assert first.waiting_requests == 2 and not first.errors
    assert first.free_budget_tokens == 0
    driver.run_until_done()
    admitted = [ids for ids in stream.admitted() if ids]
    assert admitted == [[0, 1, 2], [3, 4]]
    # The waiting requests go in at the step after the running ones free their blocks.
    freed_at = next(i for i, r in enumerate(stream.responses)
                    if any(f != NONE for f in r.tokens.finish_reasons))
    assert list(stream.responses[freed_at + 1].admitted_ids) == [3, 4]
    assert not stream.errors()
    for i in range(5):
        assert len(stream.tokens(i)) == 10 and stream.finish_reasons(i)[-1] == LENGTH
    assert engine.allocator.free_tokens == BUDGET
    assert stream.responses[-1].free_budget_tokens == BUDGET
    assert stream.responses[-1].waiting_requests == 0


def test_cancel_frees_running_and_waiting_requests(model):
    engine, driver, stream = make_engine(model, total_tokens=BUDGET)
    driver.submit(stream, budget_requests(stream, range(5)))
    driver.step()
    driver.step()
    assert engine.allocator.free_tokens == 0 and len(engine.scheduler.waiting) == 2
    driver.cancel(stream, [0, 3])  # one running, one waiting
    driver.step()
    assert list(stream.responses[-1].admitted_ids) == [4]  # 0's blocks went to 4, not to 3
    # Emitted: the step before's tokens (async; 0's, in flight, is dropped) or this step's.
    emitted = [1, 2] if engine.async_scheduling else [1, 2, 4]
    assert sorted(stream.responses[-1].tokens.ids) == emitted
    tokens_of_0 = len(stream.tokens(0))
    driver.cancel(stream, [1, 2, 4])
    driver.step()
    assert engine.allocator.free_tokens == BUDGET
    assert engine.scheduler.idle
    assert stream.responses[-1].free_budget_tokens == BUDGET
    assert not stream.responses[-1].HasField("tokens")
    assert len(stream.tokens(0)) == tokens_of_0 and not stream.tokens(3)
    assert not stream.errors()


def test_a_draining_engine_refuses_new_requests_as_retryable_and_finishes_the_running(model):
    engine, driver, stream = make_engine(model, total_tokens=BUDGET)
    other = Recorder(engine)
    driver.open(other)
    driver.submit(stream, budget_requests(stream, range(2)))
    driver.step()
    driver.cancel(stream, [])  # a command, so that the drain below is taken in the same way
    engine.drain()
    driver.step()
    assert all(r.draining for r in other.responses[-1:] + stream.responses[-1:])
    driver.submit(stream, budget_requests(stream, [7]))
    driver.run_until_done()
    refused = [e for r in stream.responses for e in r.errors]
    assert [(e.id, e.retryable) for e in refused] == [(7, True)]
    assert "draining" in refused[0].message
    assert [len(stream.tokens(i)) for i in (0, 1)] == [10, 10]
    assert engine.allocator.free_tokens == BUDGET and engine.idle


def test_a_drain_that_hands_over_ends_running_and_waiting_requests_as_retryable(model):
    engine, driver, stream = make_engine(model, total_tokens=BUDGET)
    driver.submit(stream, budget_requests(stream, range(4)))  # 3 run, 1 waits
    driver.step()
    driver.step()
    engine.drain(hand_over=True)
    driver.mail = True
    driver.step()
    errors = {e.id: e.retryable for r in stream.responses for e in r.errors}
    assert errors == {0: True, 1: True, 2: True, 3: True}
    assert all(len(stream.tokens(i)) < 10 for i in range(4))
    assert engine.allocator.free_tokens == BUDGET and engine.scheduler.idle


def test_closing_a_stream_cancels_its_running_and_waiting_requests(model):
    engine, driver, leaving = make_engine(model, total_tokens=BUDGET)
    staying = Recorder(engine)
    driver.submit(staying, budget_requests(staying, [0]))
    driver.submit(leaving, budget_requests(leaving, range(1, 5)))
    driver.step()
    driver.step()
    assert len(engine.scheduler.running) == 3 and len(engine.scheduler.waiting) == 2
    seen_by_leaving = len(leaving.responses)
    driver.close(leaving)
    driver.step()
    assert engine.allocator.free_tokens == BUDGET - 16  # only `staying`'s reservation is left
    assert not engine.scheduler.waiting
    assert staying.responses[-1].free_budget_tokens == BUDGET - 16
    driver.run_until_done()
    assert len(leaving.responses) == seen_by_leaving  # a closed stream hears nothing more
    assert len(staying.tokens(0)) == 10 and staying.finish_reasons(0)[-1] == LENGTH
    assert engine.allocator.free_tokens == BUDGET


def test_every_stream_learns_when_the_budget_moves(model):
    engine, driver, busy = make_engine(model, total_tokens=BUDGET)
    watcher = Recorder(engine)
    driver.open(watcher)
    driver.submit(busy, budget_requests(busy, [0], max_new_tokens=3))
    driver.run_until_done()
    budgets = [r.free_budget_tokens for r in watcher.responses]
    # 6 + 3 tokens reserve 3 blocks at admission, in the same step as the opening; the end
    # gives them back.
    assert budgets == [BUDGET - 12, BUDGET]
    assert budgets[-1] == BUDGET
    assert all(not r.HasField("tokens") for r in watcher.responses)


def test_a_request_larger_than_the_whole_budget_is_refused_and_others_still_run(model):
    engine, driver, stream = make_engine(model, total_tokens=BUDGET)
    too_big = request(stream, 7, random_prompt(40, seed=7), 20)  # 60 tokens > 48
    driver.submit(stream, [*budget_requests(stream, [0]), too_big, *budget_requests(stream, [1])])
    driver.run_until_done()
    errors = stream.errors()
    assert list(errors) == [7] and errors[7]
    assert 7 not in [i for ids in stream.admitted() for i in ids] and not stream.tokens(7)
    for i in (0, 1):
        assert len(stream.tokens(i)) == 10 and stream.finish_reasons(i)[-1] == LENGTH
    assert engine.allocator.free_tokens == BUDGET


@pytest.mark.parametrize("prompt, max_new_tokens, top_n, message", [
    ([], 3, 0, "empty"),
    ([5] * 64, 3, 0, "max_input_tokens"),
    ([5, 320, 6], 3, 0, "outside the vocabulary"),
    ([5, 6], 0, 0, "max_new_tokens"),
    ([5, 6], 3, 321, "top_n_tokens"),
])
def test_unrunnable_requests_get_an_error_and_never_reach_the_forward(model, prompt,
                                                                      max_new_tokens, top_n,
                                                                      message):
    engine, driver, stream = make_engine(model, total_tokens=64)
    bad = request(stream, 9, prompt, max_new_tokens)
    bad.top_n_tokens = top_n
    driver.submit(stream, [bad, *budget_requests(stream, [0])])
    driver.run_until_done()
    assert message in stream.errors()[9]
    assert not stream.tokens(9)
    assert len(stream.tokens(0)) == 10 and stream.finish_reasons(0)[-1] == LENGTH
    assert engine.allocator.free_tokens == 64


def test_reported_free_budget_is_the_allocators_in_every_response(model):
    # The Recorder asserts it on each send; here a busy mix of admissions, waits and ends.
    engine, driver, stream = make_engine(model, total_tokens=64, max_prefill_tokens=8)
    driver.open(stream)
    for i in range(6):
        driver.submit(stream, [request(stream, i, random_prompt(5 + 3 * i, seed=i), 2 + i)])
        driver.step()
    driver.run_until_done()
    budgets = {r.free_budget_tokens for r in stream.responses}
    assert len(budgets) > 3 and 64 in budgets
    assert len(stream.responses) > 6


# -- finish reasons ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def greedy_run(model):
    """A prompt, its first 12 greedy tokens, and a token that first appears at index >= 2."""
    prompt = random_prompt(9, seed=21)
    tokens = generate_alone(model, prompt, 12)
    k = next(i for i in range(2, len(tokens)) if tokens[i] not in tokens[:i])
    return prompt, tokens, k


def finish_one(model, prompt, max_new_tokens, eos_token_ids=(2,), **kwargs):
    engine, driver, stream = make_engine(model, eos_token_ids=eos_token_ids)
    driver.submit(stream, [request(stream, 0, prompt, max_new_tokens, **kwargs)])
    driver.run_until_done()
    assert engine.allocator.free_tokens == engine.allocator.total_tokens
    return stream.tokens(0), stream.finish_reasons(0)


def test_length_finish_at_max_new_tokens(model, greedy_run):
    prompt, tokens, _ = greedy_run
    for n in (1, 5):
        got, reasons = finish_one(model, prompt, n)
        assert got == tokens[:n] and reasons == [NONE] * (n - 1) + [LENGTH]


def test_eos_finish_when_the_model_emits_an_eos_id(model, greedy_run):
    prompt, tokens, k = greedy_run
    got, reasons = finish_one(model, prompt, 12, eos_token_ids=(2, tokens[k]),
                              ignore_eos=False)
    assert got == tokens[:k + 1]
    assert reasons == [NONE] * k + [EOS]


def test_ignore_eos_generates_through_eos_ids(model, greedy_run):
    prompt, tokens, k = greedy_run
    got, reasons = finish_one(model, prompt, 12, eos_token_ids=(2, tokens[k]), ignore_eos=True)
    assert got == tokens and reasons == [NONE] * 11 + [LENGTH]


def test_stop_token_finish(model, greedy_run):
    prompt, tokens, k = greedy_run
    got, reasons = finish_one(model, prompt, 12, stop_token_ids={tokens[k]}, ignore_eos=True)
    assert got == tokens[:k + 1] and reasons == [NONE] * k + [STOP]


def test_eos_on_the_last_allowed_token_reports_eos(model, greedy_run):
    prompt, tokens, k = greedy_run
    got, reasons = finish_one(model, prompt, k + 1, eos_token_ids=(tokens[k],), ignore_eos=False)
    assert got == tokens[:k + 1] and reasons[-1] == EOS
