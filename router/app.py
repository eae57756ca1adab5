"""The router's HTTP application: routes, error mapping, and the lifespan of its state."""

from __future__ import annotations

import contextlib
import logging

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

import sluice
from router import hold, openai_api, openai_chat, openai_completions, openapi, streaming, tgi
from router import openai_responses as openai_out
from router import tgi_responses as tgi_out
from router.config import RouterConfig
from router.errors import Draining, RouterError, ShardUnavailable
from router.middleware import RequestMiddleware
from router.openapi import Operation
from router.schemas import ChatCompletionRequest, CompletionRequest, TGIRequest
from router.state import RouterState
from router.workers import Worker

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
        raise Draining("the router is shutting down")
    ready = len(state.dispatcher.ready_groups())
    hold = state.config.hold_without_groups
    # With --workers, any worker may take the next connection: green once all of them can
    # serve it (one still connecting would answer 503; held requests wait instead).
    waiting = [] if hold or not ready else state.unready_workers()
    if waiting:
        raise ShardUnavailable(
            f"router worker{'s' if len(waiting) > 1 else ''} "
            f"{', '.join(map(str, waiting))} of {state.worker.count} not connected to a shard "
            "group yet")
    if ready:
        return streaming.json_response(tgi_out.Health(status="ok", shard_groups_ready=ready))
    if not hold:
        raise ShardUnavailable("no shard group is connected")
    # Scale to zero: the router is healthy without groups; it holds requests until one comes.
    return streaming.json_response(tgi_out.Health(
        status="ok", shard_groups_ready=0,
        detail=f"no shard group is ready: requests wait up to "
               f"{state.config.request_timeout_s:g} s for one (--hold-without-groups)"))


async def info(request: Request) -> Response:
    state: RouterState = request.app.state.router
    i, limits, config = state.info, state.limits, state.config
    return streaming.json_response(tgi_out.Info(
        model_id=i.model_id, model_sha=None, model_dtype=i.model_dtype,
        quantization=i.quantization, model_device_type=i.device_type,
        model_pipeline_tag="text-generation",
        max_concurrent_requests=config.max_concurrent_requests, max_best_of=config.max_best_of,
        max_stop_sequences=limits.max_stop_sequences, max_input_tokens=limits.max_input_tokens,
        max_total_tokens=limits.max_total_tokens,
        max_batch_prefill_tokens=i.max_batch_prefill_tokens, max_batch_size=i.max_batch_size,
        max_client_batch_size=config.max_client_batch_size, validation_workers=1,
        router="sluice", version=sluice.__version__, sha=None, docker_label=None,
        attention_backend=i.attention_backend, num_shard=i.num_shards,
        shard_groups=[tgi_out.ShardGroupInfo(
            uri=g.uri, ready=g.ready, state=g.state.value,
            free_budget_tokens=g.free_budget_tokens,
            max_batch_total_tokens=g.info.max_batch_total_tokens if g.info else None,
            prefill_chunk_tokens=g.info.prefill_chunk_tokens if g.info else None)
            for g in state.groups.all()]))


TGI, OPENAI, SERVICE = "TGI", "OpenAI", "Service"
OPERATIONS = [
    Operation("/", "POST", tgi.compat_generate, "Generate: a list of one answer, or SSE when "
              "`stream` is true", TGI, TGIRequest, tgi_out.GenerateResponse, answer_is_list=True,
              events=tgi_out.StreamResponse),
    Operation("/generate", "POST", tgi.generate, "Generate text", TGI, TGIRequest,
              tgi_out.GenerateResponse),
    Operation("/generate_stream", "POST", tgi.generate_stream, "Generate text as SSE, a token "
              "per event", TGI, TGIRequest, events=tgi_out.StreamResponse, json=False),
    Operation("/tokenize", "POST", tgi.tokenize, "Tokenize a prompt", TGI, TGIRequest,
              tgi_out.SimpleToken, answer_is_list=True),
    Operation("/info", "GET", info, "The model, its limits and the shard groups", SERVICE,
              answer=tgi_out.Info),
    Operation("/health", "GET", health, "200 once a shard group is connected (with "
              "--hold-without-groups: 200 unless draining)", SERVICE,
              answer=tgi_out.Health),
    Operation("/v1/chat/completions", "POST", openai_chat.chat_completions, "Chat completion",
              OPENAI, ChatCompletionRequest, openai_out.ChatCompletion,
              events=openai_out.ChatCompletionChunk, openai=True),
    Operation("/v1/completions", "POST", openai_completions.completions, "Text completion",
              OPENAI, CompletionRequest, openai_out.Completion, events=openai_out.Completion,
              openai=True),
    Operation("/v1/models", "GET", openai_api.models, "The served model", OPENAI,
              answer=openai_out.ModelList, openai=True),
]


async def openapi_json(request: Request) -> Response:
    limits = openapi.ServedLimits.of(request.app.state.router)
    return JSONResponse(request.app.state.openapi.document(limits))


async def docs(request: Request) -> Response:
    return HTMLResponse(openapi.docs_page("/openapi.json"))


async def metrics(request: Request) -> Response:
    state: RouterState = request.app.state.router
    return Response(await state.metrics_text(), media_type=CONTENT_TYPE_LATEST)


# The routes that need a shard group's tokenizer or limits: with --hold-without-groups they
# wait for one. /info and /health answer at once, describing the router as it is.
NEEDS_GROUP = frozenset({"/", "/generate", "/generate_stream", "/tokenize",
                         "/v1/chat/completions", "/v1/completions", "/v1/models"})


def _endpoint(config: RouterConfig, op: Operation):
    if config.hold_without_groups and op.path in NEEDS_GROUP:
        return hold.until_group_ready(op.endpoint)
    return op.endpoint


def build(config: RouterConfig, worker: Worker | None = None) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        state = RouterState(config, worker)
        app.state.router = state
        await state.start()
        try:
            yield
        finally:
            await state.stop()

    routes = [Route(op.path, _endpoint(config, op), methods=[op.method]) for op in OPERATIONS]
    # Prometheus' text format, outside the API description.
    routes += [Route("/openapi.json", openapi_json, methods=["GET"]),
               Route("/docs", docs, methods=["GET"]),
               Route("/metrics", metrics, methods=["GET"])]
    app = Starlette(routes=routes, lifespan=lifespan,
                    middleware=[Middleware(RequestMiddleware)], exception_handlers={
                        RouterError: _router_error, HTTPException: _http_error,
                        Exception: _unexpected})
    app.state.openapi = openapi.Description(OPERATIONS, sluice.__version__)
    return app
