"""--last-layer-rows sampled: past the last layer's attention, only the rows whose logits a step
reads go on (each prompt's last token, each decode). Every other row's keys and values still
reach the cache, and the rows that go on come out as they would have with all rows."""

from __future__ import annotations

import pytest
import torch

from shard import loader
from shard.attention import StepLayout, TorchAttention
from shard.kv_cache import KVCache
from shard.parallel import TensorParallel
from shard.source import ModelSource
from shard.tests.test_engine import CPU, make_engine, random_prompt, request
from shard.tests.test_engine import scheduling  # noqa: F401 (autouse: sync and async runs)

BLOCK = 4


@pytest.fixture(scope="module")
def model(tiny_llama):
    return loader.load(ModelSource("tiny", tiny_llama), TensorParallel(), CPU, torch.float32,
                       TorchAttention()).model


def prefill(model, lens: list[int], rows):
    """One forward over fresh prompts of these lengths: (hidden, the KV cache's layers)."""
    attention = TorchAttention()
    blocks = [-(-n // BLOCK) for n in lens]
    cache = KVCache(model.config, 1, sum(blocks), BLOCK, torch.float32, CPU)
    table = torch.zeros(len(lens), max(blocks), dtype=torch.int32)
    slots, first = [], 0
    for i, (n, b) in enumerate(zip(lens, blocks)):
        table[i, :b] = torch.arange(first, first + b)
        slots.append(first * BLOCK + torch.arange(n))
        first += b
    starts = [0]
    for n in lens:
        starts.append(starts[-1] + n)
    layout = StepLayout(0, starts, lens, torch.tensor(starts, dtype=torch.int32),
                        torch.tensor(lens, dtype=torch.int32), table, torch.cat(slots), BLOCK)
    ids = torch.cat([random_prompt(n, seed=n) for n in lens])
    positions = torch.cat([torch.arange(n) for n in lens])
    with torch.inference_mode():
        hidden = model(ids, positions, cache.layers, attention.prepare(layout), rows)
    return hidden, cache.layers


def test_the_named_rows_come_out_as_with_all_rows_in_their_order(model):
    every, every_cache = prefill(model, [5, 9, 3], None)
    rows = torch.tensor([13, 4, 16, 0])
    some, some_cache = prefill(model, [5, 9, 3], rows)
    assert some.shape == (4, model.config.hidden_size)
    torch.testing.assert_close(some, every[rows], rtol=1e-5, atol=1e-5)
    for (k, v), (k_all, v_all) in zip(some_cache, every_cache):
        assert torch.equal(k, k_all) and torch.equal(v, v_all)


def test_no_rows_still_fill_every_layers_cache(model):
    every, every_cache = prefill(model, [6, 2], None)
    none, none_cache = prefill(model, [6, 2], torch.zeros(0, dtype=torch.long))
    assert none.shape == (0, model.config.hidden_size)
    for (k, v), (k_all, v_all) in zip(none_cache, every_cache):
        assert torch.equal(k, k_all) and torch.equal(v, v_all)


class MLPRows:
    """The row count each call of the first and the last layer's MLP saw, per engine step."""

    def __init__(self, model):
        self.first, self.last = [], []
        self.hooks = [
            model.layers[0].mlp.register_forward_pre_hook(
                lambda _, args: self.first.append(args[0].shape[0])),
            model.layers[-1].mlp.register_forward_pre_hook(
                lambda _, args: self.last.append(args[0].shape[0]))]

    def remove(self):
        for hook in self.hooks:
            hook.remove()


@pytest.fixture
def mlp_rows(model):
    seen = MLPRows(model)
    yield seen
    seen.remove()


def test_a_prefill_steps_last_layer_takes_one_row_per_prompt(model, mlp_rows):
    engine, driver, stream = make_engine(model, max_prefill_tokens=64)
    driver.submit(stream, [request(stream, i, random_prompt(n, seed=i), 2)
                           for i, n in enumerate([5, 7, 9])])
    driver.run_until_done()
    assert mlp_rows.first == [21, 3]   # the prompts' 21 tokens, then 3 decodes
    assert mlp_rows.last == [3, 3]


def test_chunks_that_end_no_prompt_skip_the_last_layers_mlp(model, mlp_rows):
    engine, driver, stream = make_engine(model, max_prefill_tokens=8)
    driver.submit(stream, [request(stream, 0, random_prompt(20, seed=3), 2)])
    driver.run_until_done()
    assert mlp_rows.first == [8, 8, 4, 1]
    assert mlp_rows.last == [1, 1]     # the chunk that ends the prompt, then its decode


def test_all_sends_every_row_through_the_last_layer(model, mlp_rows):
    engine, driver, stream = make_engine(model, max_prefill_tokens=64, sampled_rows_only=False)
    driver.submit(stream, [request(stream, i, random_prompt(n, seed=i), 2)
                           for i, n in enumerate([5, 7, 9])])
    driver.run_until_done()
    assert mlp_rows.last == mlp_rows.first == [21, 3]


def test_a_step_with_prompt_logprobs_sends_every_row_through(model, mlp_rows):
    engine, driver, stream = make_engine(model, max_prefill_tokens=64)
    scored = request(stream, 1, random_prompt(7, seed=1), 2)
    scored.prefill_logprobs = True
    driver.submit(stream, [request(stream, 0, random_prompt(5, seed=0), 2), scored])
    driver.run_until_done()
    assert mlp_rows.last == mlp_rows.first == [12, 2]
    assert len(stream.tokens(1)) == 2


def test_both_settings_generate_the_same_tokens(model):
    prompts = [random_prompt(n, seed=10 + n) for n in (3, 30, 17, 8)]
    runs = []
    for sampled in (True, False):
        engine, driver, stream = make_engine(model, max_prefill_tokens=16,
                                             sampled_rows_only=sampled)
        driver.submit(stream, [request(stream, i, p, 12) for i, p in enumerate(prompts)])
        driver.run_until_done()
        runs.append([stream.tokens(i) for i in range(len(prompts))])
    assert runs[0] == runs[1]
    assert [len(t) for t in runs[0]] == [12] * 4
