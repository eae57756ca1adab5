"""Requests and tokens per minute, per tenant: in this process, or shared through Redis.

The algorithm is GCRA (a token bucket kept as one timestamp per limit): a tenant may spend its
whole minute's allowance at once, and it comes back continuously, limit/60 per second. Unlike
fixed windows there is no double burst at a window edge, the state is one number per limit
(O(1) per request, in Redis too), and Retry-After is exact. A request reserves prompt +
max_new_tokens; refund() gives back what it did not generate once it ends.

With Redis, every router replica spends from the same buckets (one Lua script per request, so
both limits are checked and taken atomically). If Redis fails, the router logs a warning and
keeps limiting with its own in-process buckets until Redis answers again (tried every few
seconds): requests never fail for Redis.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

PERIOD_S = 60.0
REDIS_RETRY_S = 5.0
_KINDS = ("requests", "tokens")


@dataclass(slots=True, frozen=True)
class RateLimits:
    """A tenant's allowance per minute (requests, tokens), as its key or the flags set it."""

    requests_per_minute: int  # 0: no limit
    tokens_per_minute: int

    @property
    def per_kind(self) -> tuple[int, int]:
        return self.requests_per_minute, self.tokens_per_minute


@dataclass(slots=True, frozen=True)
class Usage:
    """One limit as a decision left it, in the terms of OpenAI's x-ratelimit-* headers."""

    limit: int
    remaining: int
    reset_s: float  # until the bucket is full again


@dataclass(slots=True, frozen=True)
class Decision:
    allowed: bool
    retry_after_s: float | None  # when refused: None if the request can never fit
    usage: dict[str, Usage]  # by kind ("requests", "tokens"), only the limited kinds

    def headers(self) -> dict[str, str]:
        headers = {}
        for kind, u in self.usage.items():
            headers[f"x-ratelimit-limit-{kind}"] = str(u.limit)
            headers[f"x-ratelimit-remaining-{kind}"] = str(u.remaining)
            headers[f"x-ratelimit-reset-{kind}"] = duration(u.reset_s)
        if not self.allowed and self.retry_after_s is not None:
            headers["retry-after"] = str(max(1, math.ceil(self.retry_after_s)))
        return headers


def duration(seconds: float) -> str:
    """OpenAI's reset format: 250ms, 1.5s, 6m0s."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    minutes, rest = divmod(round(seconds, 3), 60)
    rest_text = f"{rest:.3f}".rstrip("0").rstrip(".")
    return f"{int(minutes)}m{rest_text}s" if minutes else f"{rest_text}s"


def decide(tats: list[float], limits: RateLimits, costs: tuple[int, int], now: float) -> Decision:
    """The decision for these costs given each bucket's theoretical arrival time (TAT)."""
    usage, allowed, retry_after = {}, True, 0.0
    for kind, tat, limit, cost in zip(_KINDS, tats, limits.per_kind, costs):
        if limit <= 0:
            continue
        interval = PERIOD_S / limit
        tat = max(tat, now)
        new_tat = tat + cost * interval
        if cost > limit:
            allowed, retry_after = False, None
        elif new_tat - now > PERIOD_S:
            allowed = False
            if retry_after is not None:
                retry_after = max(retry_after, new_tat - now - PERIOD_S)
        usage[kind] = (limit, interval, tat, new_tat)
    result = {}
    for kind, (limit, interval, tat, new_tat) in usage.items():
        end = new_tat if allowed else tat  # a refused request takes nothing
        # Rounded first: Redis keeps TATs to the microsecond, which must not cost a request.
        remaining = math.floor(round((PERIOD_S - (end - now)) / interval, 4))
        result[kind] = Usage(limit, max(0, remaining), end - now)
    return Decision(allowed, retry_after if not allowed else 0.0, result)


class LocalBuckets:
    """The buckets of this process."""

    def __init__(self) -> None:
        self._tats: dict[str, float] = {}
        self._updates = 0

    def take(self, keys: tuple[str, str], limits: RateLimits, costs: tuple[int, int],
             now: float) -> Decision:
        decision = decide([self._tats.get(k, now) for k in keys], limits, costs, now)
        if decision.allowed:
            for key, limit, cost in zip(keys, limits.per_kind, costs):
                if limit > 0:
                    self._tats[key] = max(self._tats.get(key, now), now) + cost * PERIOD_S / limit
        self._sweep(now)
        return decision

    def give_back(self, key: str, limit: int, cost: int) -> None:
        if key in self._tats and limit > 0:
            self._tats[key] -= cost * PERIOD_S / limit

    def _sweep(self, now: float) -> None:
        # A bucket whose TAT has passed is full: the same as no entry. Forget those now and
        # then, so that one entry per client address seen does not grow forever.
        self._updates += 1
        if self._updates % 1024 == 0:
            self._tats = {k: t for k, t in self._tats.items() if t > now}


# Both limits are read, checked and taken in one atomic step; the Python side does the same
# arithmetic on the TATs returned (decide), so both backends answer alike.
_TAKE = """
local now, period = tonumber(ARGV[1]), tonumber(ARGV[2])
local limits = {tonumber(ARGV[3]), tonumber(ARGV[4])}
local costs = {1, tonumber(ARGV[5])}
local tats, fresh, allowed = {}, {}, 1
for i = 1, 2 do
  local tat = tonumber(redis.call('GET', KEYS[i])) or now
  if tat < now then tat = now end
  tats[i] = tat
  if limits[i] > 0 then
    fresh[i] = tat + costs[i] * period / limits[i]
    if costs[i] > limits[i] or fresh[i] - now > period then allowed = 0 end
  end
end
if allowed == 1 then
  for i = 1, 2 do
    if limits[i] > 0 then
      redis.call('SET', KEYS[i], string.format('%.6f', fresh[i]), 'PX',
                 math.ceil((fresh[i] - now) * 1000) + 1000)
    end
  end
end
return {string.format('%.6f', tats[1]), string.format('%.6f', tats[2])}
"""

_GIVE_BACK = """
local tat = tonumber(redis.call('GET', KEYS[1]))
if tat then
  redis.call('SET', KEYS[1], string.format('%.6f', tat - tonumber(ARGV[1])), 'KEEPTTL')
end
"""


class RateLimiter:
    """Takes from and gives back to each tenant's buckets, in Redis when configured."""

    def __init__(self, redis_url: str | None, clock: Callable[[], float] = time.time,
                 shared=None):
        self._clock = clock  # wall time: replicas sharing Redis compare their TATs
        # This process's buckets, or with --workers the table the workers share
        # (router/shared_buckets.py): used without Redis, and while Redis is away.
        self._local = shared if shared is not None else LocalBuckets()
        self._redis = None
        self._redis_down_until = 0.0
        if redis_url:
            self._redis = aioredis.from_url(redis_url, socket_timeout=0.5,
                                            socket_connect_timeout=0.5)
            self._take = self._redis.register_script(_TAKE)
            self._give_back = self._redis.register_script(_GIVE_BACK)

    async def acquire(self, tenant: str, limits: RateLimits, tokens: int) -> Decision:
        """Take one request and `tokens` tokens from the tenant's buckets, if both fit."""
        keys = (f"sluice:ratelimit:{tenant}:requests", f"sluice:ratelimit:{tenant}:tokens")
        costs, now = (1, tokens), self._clock()
        if self._use_redis(now):
            try:
                tats = await self._take(keys=list(keys), args=[
                    now, PERIOD_S, limits.requests_per_minute, limits.tokens_per_minute, tokens])
                self._redis_up()
                return decide([float(t) for t in tats], limits, costs, now)
            except (RedisError, OSError) as exc:
                self._redis_failed(exc, now)
        return self._local.take(keys, limits, costs, now)

    async def refund(self, tenant: str, limits: RateLimits, tokens: int) -> None:
        """Give back tokens reserved but not generated."""
        if tokens <= 0 or limits.tokens_per_minute <= 0:
            return
        key = f"sluice:ratelimit:{tenant}:tokens"
        seconds = tokens * PERIOD_S / limits.tokens_per_minute
        now = self._clock()
        if self._use_redis(now):
            try:
                await self._give_back(keys=[key], args=[seconds])
                return
            except (RedisError, OSError) as exc:
                self._redis_failed(exc, now)
        self._local.give_back(key, limits.tokens_per_minute, tokens)

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()

    def _use_redis(self, now: float) -> bool:
        return self._redis is not None and now >= self._redis_down_until

    def _redis_failed(self, exc: Exception, now: float) -> None:
        if self._redis_down_until == 0.0:
            log.warning("rate-limit Redis is unavailable (%s): limiting with this router's own "
                        "counters until it answers again", exc)
        self._redis_down_until = now + REDIS_RETRY_S

    def _redis_up(self) -> None:
        if self._redis_down_until != 0.0:
            log.info("rate-limit Redis answers again: limits are shared once more")
            self._redis_down_until = 0.0
