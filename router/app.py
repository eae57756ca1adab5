"""The router's HTTP application: routes, error mapping, and the lifespan of its state."""

from __future__ import annotations

import contextlib
import logging

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import sluice
from router import openai_api, tgi
from router.config import RouterConfig
from router.errors import RouterError
from router.middleware import RequestMiddleware
from router.state import RouterState

log = logging.getLogger(__name__)


def _is_openai(request: Request) -> bool:
    return request.url.path.startswith("/v1/")


async def _router_error(request: Request, exc: RouterError) -> Response:
    return exc.response(openai=_is_openai(request))


async def _http_error(request: Request, exc: HTTPException) -> Response:
    error = RouterError(str(exc.detail))
    error.status, error.error_type = exc.status_code, "http"
    return error.response(openai=_is_openai(request))


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s", request.url.path)
    return RouterError("internal server error").response(openai=_is_openai(request))


async def health(request: Request) -> Response:
    state: RouterState = request.app.state.router
    if state.draining:
        return JSONResponse({"error": "the router is shutting down",
                             "error_type": "unavailable"}, 503)
    ready = len(state.dispatcher.ready_groups)
    if not ready:
        return JSONResponse({"error": "no shard group is connected",
                             "error_type": "unavailable"}, 503)
    return JSONResponse({"status": "ok", "shard_groups_ready": ready})


async def info(request: Request) -> Response:
    state: RouterState = request.app.state.router
    i, limits = state.info, state.limits
    return JSONResponse({
        "model_id": i.model_id,
        "model_sha": None,
        "model_dtype": i.model_dtype,
        "quantization": i.quantization,
        "model_device_type": i.device_type,
        "model_pipeline_tag": "text-generation",
        "max_concurrent_requests": state.config.max_concurrent_requests,
        "max_best_of": 1,
        "max_stop_sequences": limits.max_stop_sequences,
        "max_input_tokens": limits.max_input_tokens,
        "max_total_tokens": limits.max_total_tokens,
        "max_batch_prefill_tokens": i.max_batch_prefill_tokens,
        "max_batch_size": i.max_batch_size,
        "max_client_batch_size": 1,
        "validation_workers": 1,
        "router": "sluice",
        "version": sluice.__version__,
        "sha": None,
        "docker_label": None,
        "attention_backend": i.attention_backend,
        "num_shard": i.num_shards,
        "shard_groups": [
            {"uri": g.uri, "ready": g.ready, "free_budget_tokens": g.free_budget_tokens,
             "max_batch_total_tokens": g.info.max_batch_total_tokens if g.info else None}
            for g in state.dispatcher.groups],
    })


async def metrics(request: Request) -> Response:
    state: RouterState = request.app.state.router
    return state.metrics.response()


def build(config: RouterConfig) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        state = RouterState(config)
        app.state.router = state
        await state.start()
        try:
            yield
        finally:
            await state.stop()

    routes = [
        Route("/", tgi.compat_generate, methods=["POST"]),
        Route("/generate", tgi.generate, methods=["POST"]),
        Route("/generate_stream", tgi.generate_stream, methods=["POST"]),
        Route("/info", info, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/v1/chat/completions", openai_api.chat_completions, methods=["POST"]),
        Route("/v1/completions", openai_api.completions, methods=["POST"]),
        Route("/v1/models", openai_api.models, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan,
                     middleware=[Middleware(RequestMiddleware)], exception_handlers={
                         RouterError: _router_error, HTTPException: _http_error,
                         Exception: _unexpected})
