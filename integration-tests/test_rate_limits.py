"""API keys and rate limits against real routers, one shard group and a real redis-server."""

from __future__ import annotations

import asyncio
import signal

import httpx
import pytest

from conftest import Redis, start_router, start_shard, wait_until
from router.ratelimit import RateLimits, RateLimiter

KEYS = """
keys:
  sk-alpha: {tenant: alpha, requests_per_minute: 2, tokens_per_minute: 100000}
  sk-beta: {tenant: beta, requests_per_minute: 1000, tokens_per_minute: 1000}
  sk-gamma: {tenant: gamma}
"""
REQUEST = {"inputs": "abc", "parameters": {"max_new_tokens": 4}}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def shard(tiny_model):
    shard = start_shard(str(tiny_model))
    yield shard
    shard.stop()


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "keys.yaml"
    path.write_text(KEYS)
    return str(path)


@pytest.fixture
def router_pair(shard, keys_file, redis_server):
    """Two router replicas sharing limits through one Redis."""
    flags = ("--api-keys-file", keys_file, "--rate-limit-redis-url", redis_server.url)
    routers = [start_router(shard, flags=flags) for _ in range(2)]
    yield routers
    for router in routers:
        router.stop()


def post(router, key: str | None, body=REQUEST, path="/generate") -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{router.url}{path}", json=body, headers=headers, timeout=60)


def test_missing_and_unknown_keys_get_401_in_each_apis_shape(router_pair):
    router = router_pair[0]
    answer = post(router, None)
    assert answer.status_code == 401
    assert answer.headers["www-authenticate"] == "Bearer"
    assert answer.json() == {"error": "an API key is required: send 'Authorization: Bearer "
                                      "<key>'", "error_type": "authentication"}
    answer = post(router, "sk-nobody", CHAT, "/v1/chat/completions")
    assert answer.status_code == 401
    assert answer.json() == {"error": {"message": "the API key is not valid",
                                       "type": "invalid_request_error", "param": None,
                                       "code": "authentication"}}
    assert httpx.get(f"{router.url}/health").status_code == 200  # probes need no key
    assert httpx.get(f"{router.url}/metrics").status_code == 200


def test_two_routers_enforce_one_shared_limit_with_openai_headers(router_pair):
    a, b = router_pair
    first = post(a, "sk-alpha")
    assert first.status_code == 200
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert first.headers["x-ratelimit-limit-tokens"] == "100000"
    second = post(b, "sk-alpha", CHAT, "/v1/chat/completions")  # the other replica
    assert second.status_code == 200
    assert second.headers["x-ratelimit-remaining-requests"] == "0"
    for router, path, body in ((a, "/generate", REQUEST), (b, "/v1/chat/completions", CHAT)):
        refused = post(router, "sk-alpha", body, path)
        assert refused.status_code == 429
        # One request comes back every 30 s (2 per minute).
        assert 1 <= int(refused.headers["retry-after"]) <= 30
        assert refused.headers["x-ratelimit-remaining-requests"] == "0"
        error = refused.json()
        kind = error["error_type"] if path == "/generate" else error["error"]["code"]
        assert kind == "rate_limited"
    assert post(a, "sk-gamma").status_code == 200  # other tenants are not affected
    metrics = httpx.get(f"{a.url}/metrics").text
    assert 'sluice_router_rate_limited_total{tenant="alpha"} 1.0' in metrics


def test_tokens_are_reserved_and_corrected_when_a_request_ends_early(shard, router_pair):
    a, b = router_pair
    # beta: 1000 tokens per minute. A stream reserving 3 + 900 leaves room for no other such.
    long = {"prompt": "abc", "max_tokens": 900, "ignore_eos": True, "stream": True}
    again = {"prompt": "abc", "max_tokens": 900, "ignore_eos": True}
    with httpx.stream("POST", f"{a.url}/v1/completions", json=long, timeout=60,
                      headers={"Authorization": "Bearer sk-beta"}) as answer:
        assert answer.status_code == 200
        assert answer.headers["x-ratelimit-remaining-tokens"] == "97"
        lines = answer.iter_lines()
        next(line for line in lines if line.startswith("data:"))
        shard.process.send_signal(signal.SIGSTOP)  # freeze it mid-generation
        try:
            refused = post(b, "sk-beta", again, "/v1/completions")
            assert refused.status_code == 429
            assert refused.json()["error"]["type"] == "rate_limit_error"
        except BaseException:
            shard.process.send_signal(signal.SIGCONT)
            raise
    # The client left after a few tokens: the unused reservation is given back at once, so
    # the same request fits again (refill alone would take 48 s).
    shard.process.send_signal(signal.SIGCONT)
    def admitted() -> httpx.Response | None:
        answer = post(b, "sk-beta", again, "/v1/completions")
        return answer if answer.status_code != 429 else None
    answer = wait_until(admitted, "the same request admitted again", 10, interval_s=0.1)
    assert answer.status_code == 200
    assert answer.json()["usage"]["completion_tokens"] == 900


def test_a_redis_outage_degrades_to_local_limits_with_a_warning(shard, keys_file):
    redis = Redis()
    router = start_router(shard, flags=("--api-keys-file", keys_file,
                                        "--rate-limit-redis-url", redis.url))
    try:
        assert post(router, "sk-alpha").status_code == 200
        redis.stop()
        # Redis is gone: requests still run, within this router's own counters.
        statuses = [post(router, "sk-alpha").status_code for _ in range(3)]
        assert statuses == [200, 200, 429]
        warnings = [line for line in router.log_lines() if line.get("level") == "warning"
                    and "rate-limit Redis is unavailable" in line.get("message", "")]
        assert len(warnings) == 1
    finally:
        router.stop()
        redis.stop()


def test_without_keys_each_client_address_is_limited(shard):
    router = start_router(shard, flags=("--requests-per-minute", "1"))
    try:
        assert post(router, None).status_code == 200
        refused = post(router, None)
        assert refused.status_code == 429
        assert refused.json()["error_type"] == "rate_limited"
        assert refused.headers["x-ratelimit-limit-requests"] == "1"
    finally:
        router.stop()


def test_redis_backend_decides_exactly_as_the_local_one(redis_server):
    """The Lua script and the in-process buckets give the same answers on the same clock."""
    class Clock:
        now = 2_000_000.0

        def __call__(self):
            return self.now

    async def scenario(limiter: RateLimiter, clock: Clock) -> list:
        limits = RateLimits(requests_per_minute=4, tokens_per_minute=1000)
        seen = []
        for tokens, advance in [(300, 0), (300, 1), (500, 0), (100, 0), (200, 7.5), (10, 0),
                                (10, 0), (10, 30)]:
            clock.now += advance
            d = await limiter.acquire("eq", limits, tokens)
            seen.append((d.allowed, d.retry_after_s and round(d.retry_after_s, 3),
                         {k: (u.remaining, round(u.reset_s, 3)) for k, u in d.usage.items()}))
            if d.allowed and tokens == 300:
                await limiter.refund("eq", limits, 100)
        await limiter.close()
        return seen

    local_clock, redis_clock = Clock(), Clock()
    local = asyncio.run(scenario(RateLimiter(None, local_clock), local_clock))
    shared = asyncio.run(scenario(RateLimiter(redis_server.url, redis_clock), redis_clock))
    assert shared == local
    assert [allowed for allowed, *_ in local] == [True, True, True, True, False, False, False,
                                                  True]
    assert local[4][1] == 6.5  # the request limit frees up last: 75 s of TAT, 8.5 s in
