"""Sampling defaults per API, and the limits a request must respect."""

from __future__ import annotations

import pytest

from router.errors import ValidationError
from router.validation import RequestLimits, prepare, sampling

LIMITS = RequestLimits(max_input_tokens=10, max_total_tokens=16, max_stop_sequences=2,
                max_top_n_tokens=3)


def test_tgi_is_greedy_by_default_and_samples_when_any_warper_is_set():
    params, seed = sampling(temperature=None, greedy_by_default=True)
    assert params.temperature == 0.0 and seed is None
    # Each warper reaches the shard with its own value (these are exact in float32); the others
    # keep their neutral one.
    neutral = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "typical_p": 1.0}
    for kwargs in ({"do_sample": True}, {"temperature": 0.75}, {"top_k": 5}, {"top_p": 0.875},
                   {"typical_p": 0.5}):
        params, seed = sampling(greedy_by_default=True, **({"temperature": None} | kwargs))
        want = neutral | {k: v for k, v in kwargs.items() if k in neutral}
        assert {k: getattr(params, k) for k in neutral} == want, kwargs
        assert seed is not None and 0 <= seed < 2**64
        assert params.seed == seed


def test_penalties_reach_the_shard_with_their_values_and_default_to_neutral():
    params, _ = sampling(temperature=0.5, repetition_penalty=1.25, frequency_penalty=-0.5,
                         presence_penalty=0.75)
    assert (params.repetition_penalty, params.frequency_penalty,
            params.presence_penalty) == (1.25, -0.5, 0.75)
    params, _ = sampling(temperature=0.5)
    assert (params.repetition_penalty, params.frequency_penalty,
            params.presence_penalty) == (1.0, 0.0, 0.0)


def test_openai_samples_by_default_and_temperature_zero_is_greedy():
    params, seed = sampling(temperature=None)
    assert params.temperature == 1.0 and seed is not None
    params, seed = sampling(temperature=0.0, seed=5)
    assert params.temperature == 0.0 and seed is None


def test_given_seed_is_used_as_is():
    params, seed = sampling(temperature=0.8, seed=2**64 - 1)
    assert seed == params.seed == 2**64 - 1


def test_max_new_tokens_defaults_to_what_fits_in_max_total_tokens():
    params, _ = sampling(temperature=0)
    prepared = prepare(LIMITS, [1, 2, 3], max_new_tokens=None, sampling_params=params,
                       seed=None, stop=[])
    assert prepared.request.stopping.max_new_tokens == 13
    assert prepared.input_length == 3


def test_truncate_keeps_the_last_tokens():
    params, _ = sampling(temperature=0)
    prepared = prepare(LIMITS, list(range(20)), max_new_tokens=2, sampling_params=params,
                       seed=None, stop=[], truncate=4)
    assert list(prepared.request.input_ids) == [16, 17, 18, 19]


@pytest.mark.parametrize("ids, max_new, stop, top_n, message", [
    ([], 1, [], 0, "empty"),
    (list(range(11)), 1, [], 0, "at most 10 tokens"),
    ([1, 2], 15, [], 0, "must be <= 16"),
    ([1], 1, ["a", "b", "c"], 0, "at most 2 stop"),
    ([1], 1, [], 4, "top_n_tokens must be <= 3"),
])
def test_limits_are_enforced_with_a_clear_message(ids, max_new, stop, top_n, message):
    params, _ = sampling(temperature=0)
    with pytest.raises(ValidationError, match=message):
        prepare(LIMITS, ids, max_new_tokens=max_new, sampling_params=params, seed=None,
                stop=stop, top_n_tokens=top_n)
