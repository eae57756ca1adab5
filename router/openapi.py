"""GET /openapi.json and GET /docs: the API described from the same models that parse requests
and write answers, and the same table that routes them, so the description cannot drift; with
the limits the server enforces now written in (router/openapi_limits.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from router import openai_responses, tgi_responses
from router.openapi_limits import STREAM_VARIANTS, ServedLimits, constrain

_REF = "#/components/schemas/{model}"

# Statuses each kind of route can answer besides 200, as router/errors.py maps failures.
_POST_ERRORS = {"400": "the body is not JSON",
                "401": "a missing or unknown API key (when keys are configured)",
                "422": "invalid parameters, limits exceeded, or a prompt the content filter "
                       "rejects",
                "424": "the shard group failed the request",
                "429": "too many requests in flight (max_concurrent_requests), or a rate limit "
                       "(Retry-After says when to retry)",
                "503": "no shard group is connected, or the router is shutting down",
                "504": "the request took longer than --request-timeout"}
_GET_ERRORS = {"503": "no shard group is connected"}


@dataclass(frozen=True, slots=True)
class Operation:
    """One route: how it is served and how it is described."""

    path: str
    method: str  # "GET" or "POST"
    endpoint: Callable
    summary: str
    tag: str
    body: type[BaseModel] | None = None
    answer: type[BaseModel] | None = None  # the JSON answer's model
    answer_is_list: bool = False
    events: type[BaseModel] | None = None  # the model of each SSE event, if it may stream
    json: bool = True  # False: it only streams
    openai: bool = False  # errors in OpenAI's shape rather than TGI's


class Description:
    """A router's OpenAPI document, built once for each set of limits it meets (they change when
    the first shard group connects)."""

    def __init__(self, operations: list[Operation], version: str):
        self._operations = operations
        self._version = version
        self._built: dict[ServedLimits | None, dict] = {}

    def document(self, limits: ServedLimits | None) -> dict:
        if limits not in self._built:
            self._built[limits] = document(self._operations, self._version, limits)
        return self._built[limits]


def document(operations: list[Operation], version: str, limits: ServedLimits | None = None
             ) -> dict:
    models: list[type[BaseModel]] = [tgi_responses.TGIError, openai_responses.OpenAIError]
    for op in operations:
        models += [m for m in (op.body, op.answer, op.events) if m is not None]
    inputs = [(m, "validation") for m in {op.body for op in operations if op.body}]
    outputs = [(m, "serialization") for m in dict.fromkeys(models) if m not in
               {op.body for op in operations}]
    refs, schemas = models_json_schema(inputs + outputs, ref_template=_REF)
    components = schemas.get("$defs", {})
    constrain(components, limits)

    def ref(model: type[BaseModel], mode: str) -> dict:
        return refs[(model, mode)]

    paths: dict[str, dict] = {}
    for op in operations:
        content: dict[str, Any] = {}
        if op.json and op.answer is not None:
            schema = ref(op.answer, "serialization")
            content["application/json"] = {
                "schema": {"type": "array", "items": schema} if op.answer_is_list else schema}
        error = ref(openai_responses.OpenAIError if op.openai else tgi_responses.TGIError,
                    "serialization")
        if op.events is not None:
            content["text/event-stream"] = {"schema": _event_schema(
                ref(op.events, "serialization"), error, done=op.openai)}
        responses = {"200": {"description": "OK", "content": content}}
        errors = _POST_ERRORS if op.method == "POST" else _GET_ERRORS
        responses |= {status: {"description": why, "content": {"application/json": {
            "schema": error}}} for status, why in errors.items()}
        operation: dict[str, Any] = {"summary": op.summary, "tags": [op.tag],
                                     "operationId": op.endpoint.__name__ + "_" + op.tag.lower(),
                                     "responses": responses}
        if op.body is not None:
            body = ref(op.body, "validation")
            if not op.json and op.body.__name__ in STREAM_VARIANTS:  # it only streams
                body = {"$ref": _REF.format(model=STREAM_VARIANTS[op.body.__name__])}
            operation["requestBody"] = {"required": True, "content": {
                "application/json": {"schema": body}}}
        paths.setdefault(op.path, {})[op.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "Sluice", "version": version,
                 "description": "Text generation with the TGI and OpenAI APIs."},
        "paths": paths,
        "components": {"schemas": components},
    }


def _event_schema(event: dict, error: dict, done: bool) -> dict:
    """One server-sent event: its data is JSON, an event or (last) an error; OpenAI streams
    end with `data: [DONE]`. OpenAPI 3.1 has a text/event-stream `schema` describe one event."""
    data = {"type": "string", "contentMediaType": "application/json",
            "contentSchema": {"anyOf": [event, error]}}
    if done:
        data = {"anyOf": [{"const": "[DONE]"}, data]}
    return {"type": "object", "required": ["data"], "properties": {"data": data}}


def docs_page(spec_url: str) -> str:
    """Swagger UI, loaded from a CDN, rendering `spec_url`."""
    return f"""<!doctype html>
<html>
<head>
  <meta charset="utf-8">
  <title>Sluice API</title>
  <link rel="stylesheet" href="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui.css">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui-bundle.js"></script>
  <script>SwaggerUIBundle({{url: "{spec_url}", dom_id: "#swagger-ui"}});</script>
</body>
</html>
"""
