"""From a validated request to one in the queue: prompt filter, rate limits, deadline.

Route handlers call `admit` where they would submit to the dispatcher; everything a request
reserved (its rate-limit tokens, its timer) is settled when its Generation closes.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from starlette.requests import Request

from router.auth import Tenant
from router.errors import ContentFiltered, Overloaded, RateLimited, RequestTimeout
from router.ratelimit import RateLimits
from router.shard_client import Generation
from router.telemetry import RequestTelemetry
from router.validation import Prepared

if TYPE_CHECKING:
    from router.state import RouterState

log = logging.getLogger(__name__)

# Longer prompts are decoded for the filter on a worker thread, as they are encoded.
_INLINE_DECODE_TOKENS = 512


def _limits(state: RouterState, tenant: Tenant | None) -> RateLimits:
    if tenant is not None:
        return RateLimits(tenant.requests_per_minute, tenant.tokens_per_minute)
    return RateLimits(state.config.requests_per_minute, state.config.tokens_per_minute)


async def _prompt_text(state: RouterState, input_ids) -> str:
    ids = list(input_ids)
    if len(ids) <= _INLINE_DECODE_TOKENS:
        return state.tokenizer.decode(ids)
    return await asyncio.to_thread(state.tokenizer.decode, ids)


async def admit(state: RouterState, request: Request, runs: list[Prepared]) -> list[Generation]:
    """Check and queue the runs of one request (its choices, best_of candidates, prompts);
    raises the RouterError that refuses it. One rate-limit decision takes the request and all
    its tokens; each run refunds what it did not generate. The request's telemetry (spans,
    metrics, log line) follows its first run."""
    telemetry: RequestTelemetry = request.state.telemetry
    prompts = list(dict.fromkeys(tuple(run.request.input_ids) for run in runs))
    input_tokens = sum(len(p) for p in prompts)
    max_new_tokens = sum(run.request.stopping.max_new_tokens for run in runs)
    telemetry.validated(input_tokens, max_new_tokens)
    content_filter = state.config.content_filter
    if content_filter is not None or state.config.log_prompts:
        texts = [await _prompt_text(state, p) for p in prompts]
        if state.config.log_prompts:
            telemetry.fields["prompt"] = texts[0] if len(texts) == 1 else texts
        if content_filter is not None and any(content_filter.prompt_blocked(t) for t in texts):
            state.metrics.filtered.labels("prompt").inc()
            raise ContentFiltered(
                "the prompt was rejected by the content filter",
                param="messages" if request.url.path.endswith("/chat/completions") else "prompt")

    tenant: Tenant | None = request.state.tenant
    limits = _limits(state, tenant)
    # Without keys, each client address is its own tenant.
    client = request.client.host if request.client else "unknown"
    bucket = f"tenant:{tenant.name}" if tenant else f"client:{client}"
    reserved = input_tokens + max_new_tokens
    if limits.requests_per_minute or limits.tokens_per_minute:
        decision = await state.limiter.acquire(bucket, limits, reserved)
        if not decision.allowed:
            state.metrics.rate_limited.labels(tenant.name if tenant else "anonymous").inc()
            what = ("the request is larger than the tokens per minute allowed"
                    if decision.retry_after_s is None else "rate limit reached")
            raise RateLimited(f"{what}: {limits.requests_per_minute or 'unlimited'} requests and "
                              f"{limits.tokens_per_minute or 'unlimited'} tokens per minute; "
                              f"this request needs {reserved} tokens", headers=decision.headers())
        telemetry.ratelimit_headers = decision.headers()

    try:
        gens = state.submit([run.request for run in runs])
    except Overloaded:
        _refund(state, bucket, limits, reserved)
        raise
    telemetry.queued()
    for index, gen in enumerate(gens):
        _settle_on_close(state, gen, telemetry if index == 0 else None, bucket, limits)
    return gens


def _settle_on_close(state: RouterState, gen: Generation, telemetry: RequestTelemetry | None,
                     bucket: str, limits: RateLimits) -> None:
    """Arm the run's output filter and deadline; when it closes, refund its unused tokens."""
    gen.telemetry = telemetry
    if state.config.content_filter is not None:
        gen.output_guard = state.config.content_filter.output_guard()
    timer = None
    if state.config.request_timeout_s > 0:
        timer = asyncio.get_running_loop().call_later(
            state.config.request_timeout_s, gen.fail, RequestTimeout(
                f"the request took longer than {state.config.request_timeout_s:g} s "
                f"(--request-timeout), queue wait included"))
    max_new_tokens = gen.request.stopping.max_new_tokens

    def settle(gen: Generation) -> None:
        if timer is not None:
            timer.cancel()
        outcome = gen.outcome or "cancelled"
        if outcome == "content_filter":
            state.metrics.filtered.labels("output").inc()
        if telemetry is not None:
            telemetry.generation_ended(outcome)
        # The reservation was prompt + max_new_tokens; what was used is prompt + generated.
        _refund(state, bucket, limits, max_new_tokens - gen.generated_tokens)

    gen.on_close.append(settle)


def _refund(state: RouterState, bucket: str, limits: RateLimits, tokens: int) -> None:
    if tokens > 0 and limits.tokens_per_minute:
        state.spawn(state.limiter.refund(bucket, limits, tokens))
