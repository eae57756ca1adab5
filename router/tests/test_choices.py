"""Several runs per HTTP request: their seeds, and their streams merged as tokens arrive."""

from __future__ import annotations

import asyncio

import pytest

from router.streaming import merge
from router.validation import RequestLimits, choices, prepare, sampling

LIMITS = RequestLimits(max_input_tokens=10, max_total_tokens=16, max_stop_sequences=2,
                max_top_n_tokens=3)


def test_choices_sample_with_consecutive_seeds_and_are_otherwise_the_same_request():
    params, seed = sampling(temperature=0.7, seed=2**64 - 1)
    prepared = prepare(LIMITS, [1, 2, 3], max_new_tokens=4, sampling_params=params, seed=seed,
                       stop=["x"], prefill_logprobs=True)
    runs = choices(prepared, 3)
    assert [r.seed for r in runs] == [2**64 - 1, 0, 1]  # wraps within uint64
    assert [r.request.sampling.seed for r in runs] == [2**64 - 1, 0, 1]
    for run in runs:
        assert list(run.request.input_ids) == [1, 2, 3]
        assert run.request.prefill_logprobs and run.request.stopping.max_new_tokens == 4
        assert run.stop == ["x"] and run.input_length == 3
    assert prepared.request.sampling.seed == 2**64 - 1  # the original is left alone


def test_greedy_choices_carry_no_seed():
    params, seed = sampling(temperature=0.0)
    runs = choices(prepare(LIMITS, [1], max_new_tokens=1, sampling_params=params, seed=seed,
                           stop=[]), 2)
    assert [r.seed for r in runs] == [None, None]


async def _items(values, delay_s=0.0, fail_after=None):
    for i, value in enumerate(values):
        if fail_after is not None and i == fail_after:
            raise ValueError("stream failed")
        await asyncio.sleep(delay_s)
        yield value


def test_merge_yields_every_item_with_its_stream_index_in_arrival_order():
    async def run():
        return [x async for x in merge([_items("abc", 0.01), _items("de")])]

    got = asyncio.run(run())
    assert sorted(got) == [(0, "a"), (0, "b"), (0, "c"), (1, "d"), (1, "e")]
    assert [v for i, v in got if i == 0] == list("abc")
    assert got[:2] == [(1, "d"), (1, "e")]  # the fast stream is not held behind the slow one


def test_merge_ends_with_the_first_failure():
    async def run():
        return [x async for x in merge([_items("abc", 0.05), _items("de", fail_after=1)])]

    with pytest.raises(ValueError, match="stream failed"):
        asyncio.run(run())
