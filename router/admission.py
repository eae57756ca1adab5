"""From a validated request to one in the queue: prompt filter, rate limits, deadline.

Route handlers call `admit` where they would submit to the dispatcher; everything a request
reserved (its rate-limit tokens, its timer) is settled when its last run closes
(router/request.py), or at once when it cannot be queued.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from starlette.requests import Request

from router.auth import Tenant
from router.errors import ContentFiltered, RateLimited, RequestTimeout, RouterError
from router.ratelimit import RateLimits
from router.request import GenerationRequest
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


async def admit(state: RouterState, request: Request,
                runs: list[Prepared]) -> GenerationRequest:
    """Check and queue the runs of one request (its choices, best_of candidates, prompts);
    raises the RouterError that refuses it. One rate-limit decision takes the request and all
    its tokens; what its runs did not generate is refunded when the last one ends."""
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

    guard = content_filter.output_guard if content_filter is not None else None
    generation = GenerationRequest(
        [run.request for run in runs], telemetry, guard,
        lambda done: _settled(state, done, bucket, limits))
    try:
        state.dispatcher.submit(generation.runs)
    except RouterError:
        _refund(state, bucket, limits, reserved)  # it never ran: all of it goes back
        raise
    telemetry.queued()
    timeout_s = state.config.request_timeout_s
    if timeout_s > 0:
        # From its arrival: a request held for a first group (router/hold.py) has less left.
        left_s = timeout_s - (time.perf_counter() - telemetry.started_s)
        generation.fail_after(left_s, RequestTimeout(
            f"the request took longer than {timeout_s:g} s (--request-timeout), queue wait "
            f"included"))
    return generation


def _settled(state: RouterState, generation: GenerationRequest, bucket: str,
             limits: RateLimits) -> None:
    """Its last run closed: count how it ended, and refund what it reserved and did not use."""
    outcomes = {run.outcome for run in generation.runs}
    if "content_filter" in outcomes:
        state.metrics.filtered.labels("output").inc()
    generation.telemetry.generation_ended(generation.outcome)
    # The reservation was the prompts + max_new_tokens; what was used is prompts + generated.
    _refund(state, bucket, limits, generation.max_new_tokens - generation.generated_tokens)


def _refund(state: RouterState, bucket: str, limits: RateLimits, tokens: int) -> None:
    if tokens > 0 and limits.tokens_per_minute:
        state.spawn(state.limiter.refund(bucket, limits, tokens))
