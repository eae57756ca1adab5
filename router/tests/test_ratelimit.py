"""GCRA limits with a fake clock: spend a minute's allowance, refill, refunds, headers."""

from __future__ import annotations

import asyncio

import pytest

from router.ratelimit import RateLimits, RateLimiter, duration


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def acquire(limiter: RateLimiter, limits: RateLimits, tokens: int, tenant: str = "t"):
    return asyncio.run(limiter.acquire(tenant, limits, tokens))


def test_a_minutes_requests_can_be_spent_at_once_then_one_comes_back_per_interval():
    clock = Clock()
    limiter = RateLimiter(None, clock)
    limits = RateLimits(requests_per_minute=3, tokens_per_minute=0)
    remaining = [acquire(limiter, limits, 10).usage["requests"].remaining for _ in range(3)]
    assert remaining == [2, 1, 0]
    refused = acquire(limiter, limits, 10)
    assert not refused.allowed
    assert refused.retry_after_s == pytest.approx(20.0)  # 60 s / 3 requests
    assert refused.headers()["retry-after"] == "20"
    clock.now += 19.9
    assert not acquire(limiter, limits, 10).allowed
    clock.now += 0.1
    assert acquire(limiter, limits, 10).allowed


def test_tokens_are_reserved_and_refunds_give_back_what_was_not_generated():
    clock = Clock()
    limiter = RateLimiter(None, clock)
    limits = RateLimits(requests_per_minute=0, tokens_per_minute=600)
    first = acquire(limiter, limits, 500)
    assert first.allowed and first.usage["tokens"].remaining == 100
    assert "requests" not in first.usage  # no request limit: no request headers
    assert not acquire(limiter, limits, 200).allowed
    asyncio.run(limiter.refund("t", limits, 300))  # it generated 300 fewer than reserved
    again = acquire(limiter, limits, 200)
    assert again.allowed and again.usage["tokens"].remaining == 200


def test_a_refused_request_takes_nothing_from_either_limit():
    clock = Clock()
    limiter = RateLimiter(None, clock)
    limits = RateLimits(requests_per_minute=5, tokens_per_minute=100)
    assert acquire(limiter, limits, 90).allowed
    refused = acquire(limiter, limits, 20)
    assert not refused.allowed
    assert refused.usage["requests"].remaining == 4  # the refused request was not counted
    assert refused.retry_after_s == pytest.approx(6.0)  # 10 tokens at 0.6 s each


def test_a_request_larger_than_the_whole_limit_can_never_pass():
    limiter = RateLimiter(None, Clock())
    refused = acquire(limiter, RateLimits(0, 100), 101)
    assert not refused.allowed and refused.retry_after_s is None
    assert "retry-after" not in refused.headers()


def test_tenants_have_separate_buckets():
    limiter = RateLimiter(None, Clock())
    limits = RateLimits(1, 0)
    assert acquire(limiter, limits, 1, "a").allowed
    assert acquire(limiter, limits, 1, "b").allowed
    assert not acquire(limiter, limits, 1, "a").allowed


def test_headers_follow_openai():
    limiter = RateLimiter(None, Clock())
    headers = acquire(limiter, RateLimits(60, 6000), 100).headers()
    assert headers == {
        "x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "59",
        "x-ratelimit-reset-requests": "1s",
        "x-ratelimit-limit-tokens": "6000", "x-ratelimit-remaining-tokens": "5900",
        "x-ratelimit-reset-tokens": "1s"}


@pytest.mark.parametrize("seconds, text", [(0.25, "250ms"), (1.5, "1.5s"), (360, "6m0s"),
                                           (61.25, "1m1.25s"), (0, "0ms")])
def test_durations_in_openais_format(seconds, text):
    assert duration(seconds) == text
