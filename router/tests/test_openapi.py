"""The OpenAPI document is built from the routing table itself: every route is described."""

from __future__ import annotations

from starlette.routing import Route

from router import app as router_app
from router.config import parse


def test_every_route_but_the_description_itself_and_metrics_is_in_the_document():
    app = router_app.build(parse(["--shard-uri", "127.0.0.1:1"], {}))
    served = {(r.path, m.lower()) for r in app.routes if isinstance(r, Route)
              for m in r.methods if m != "HEAD"}
    spec = app.state.openapi
    described = {(path, method) for path, ops in spec["paths"].items() for method in ops}
    # /metrics speaks Prometheus' text format, not the API: it stays out of the description.
    assert served - described == {("/openapi.json", "get"), ("/docs", "get"), ("/metrics", "get")}
    assert described <= served


def test_request_and_answer_schemas_are_referenced_and_defined():
    spec = router_app.build(parse(["--shard-uri", "127.0.0.1:1"], {})).state.openapi
    schemas = spec["components"]["schemas"]
    generate = spec["paths"]["/generate"]["post"]
    assert generate["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/TGIRequest"}
    assert generate["responses"]["422"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/TGIError"}
    chat = spec["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert chat["429"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/OpenAIError"}
    # Fields absent unless asked are not required; always-present nullable ones are.
    assert "details" not in schemas["GenerateResponse"]["required"]
    assert {"generated_text", "details"} <= set(schemas["StreamResponse"]["required"])
    assert "usage" not in schemas["ChatCompletionChunk"]["required"]
