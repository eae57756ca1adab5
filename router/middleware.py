"""The edge of every HTTP request: request id, drain, API key, and its telemetry.

/health and /metrics pass straight through: probes and scrapes need no key, count in no
request metric, and keep answering while the router drains.
"""

from __future__ import annotations

import uuid

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from router.errors import ClientDisconnected, Draining, RouterError
from router.state import RouterState
from router.telemetry import RequestTelemetry

UNTRACKED = frozenset({"/health", "/metrics"})
ROUTES = frozenset({"/", "/generate", "/generate_stream", "/info", "/v1/chat/completions",
                    "/v1/completions", "/v1/models"})


class RequestMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNTRACKED:
            await self.app(scope, receive, send)
            return
        state: RouterState = scope["app"].state.router
        headers = Headers(scope=scope)
        request_id = headers.get("x-request-id") or uuid.uuid4().hex
        route = scope["path"] if scope["path"] in ROUTES else "other"  # bounded label values
        telemetry = RequestTelemetry(state.metrics, scope["method"], route, request_id,
                                     dict(headers))
        if state.worker is not None:
            telemetry.fields["worker"] = state.worker.index
        status = 500  # unless a response starts

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                extra = MutableHeaders(scope=message)
                extra["x-request-id"] = request_id
                if status < 400:
                    for name, value in telemetry.ratelimit_headers.items():
                        extra[name] = value
            await send(message)

        try:
            try:
                if state.draining:
                    raise Draining("the router is shutting down; retry on another replica")
                tenant = None
                if state.config.keys is not None:
                    tenant = state.config.keys.tenant(headers.get("authorization"))
                telemetry.set_tenant(tenant.name if tenant else "anonymous")
            except RouterError as exc:
                response = exc.response(openai=scope["path"].startswith("/v1/"))
                await response(scope, receive, send_with_headers)
                return
            scope.setdefault("state", {}).update(telemetry=telemetry, tenant=tenant)
            try:
                await self.app(scope, receive, send_with_headers)
            except ClientDisconnected:
                status = 499  # nginx's "client closed request": no answer, no server error
        finally:
            telemetry.ended(status)
