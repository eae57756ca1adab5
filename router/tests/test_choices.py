"""Several runs per HTTP request: their seeds (router/tests/test_sse.py streams them)."""

from __future__ import annotations

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
