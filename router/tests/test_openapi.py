"""The OpenAPI document is built from the routing table itself: every route is described, with
the limits of the router's flags, and of its shard groups once one is connected."""

from __future__ import annotations

from types import SimpleNamespace

from starlette.routing import Route

from router import app as router_app
from router.config import parse
from router.errors import ShardUnavailable
from router.openapi_limits import ServedLimits


def test_every_route_but_the_description_itself_and_metrics_is_in_the_document():
    app = router_app.build(parse(["--shard-uri", "127.0.0.1:1"], {}))
    served = {(r.path, m.lower()) for r in app.routes if isinstance(r, Route)
              for m in r.methods if m != "HEAD"}
    spec = app.state.openapi.document(None)
    described = {(path, method) for path, ops in spec["paths"].items() for method in ops}
    # /metrics speaks Prometheus' text format, not the API: it stays out of the description.
    assert served - described == {("/openapi.json", "get"), ("/docs", "get"), ("/metrics", "get")}
    assert described <= served


def test_request_and_answer_schemas_are_referenced_and_defined():
    spec = router_app.build(parse(["--shard-uri", "127.0.0.1:1"], {})).state.openapi.document(None)
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


class _State:
    """What ServedLimits reads of a RouterState: its config, and (ShardUnavailable until a group
    is connected) its groups' limits and Info."""

    def __init__(self, config, limits=None, info=None):
        self.config, self._limits, self._info = config, limits, info

    @property
    def limits(self):
        if self._limits is None:
            raise ShardUnavailable("no shard group is connected")
        return self._limits

    @property
    def info(self):
        if self._info is None:
            raise ShardUnavailable("no shard group is connected")
        return self._info


def test_limits_come_from_the_flags_and_once_a_group_is_connected_from_it_too():
    config = parse(["--shard-uri", "127.0.0.1:1", "--max-stop-sequences", "3",
                    "--max-top-n-tokens", "2", "--max-best-of", "4",
                    "--max-client-batch-size", "6"], {})
    alone = ServedLimits.of(_State(config))
    assert alone == ServedLimits(3, 2, 4, 6)
    limits = SimpleNamespace(max_input_tokens=40, max_total_tokens=48)
    connected = _State(config, limits, SimpleNamespace(vocab_size=320))
    assert ServedLimits.of(connected) == ServedLimits(3, 2, 4, 6, 40, 48, 320)


def test_the_document_states_the_limits_it_is_built_for_and_is_built_once_for_each():
    description = router_app.build(parse(["--shard-uri", "127.0.0.1:1"], {})).state.openapi
    limits = ServedLimits(max_stop_sequences=3, max_top_n_tokens=2, max_best_of=4,
                          max_client_batch_size=6, max_input_tokens=40, max_total_tokens=48,
                          vocab_size=320)
    spec = description.document(limits)
    assert description.document(limits) is spec
    schemas = spec["components"]["schemas"]
    tgi = schemas["TGIParameters"]["properties"]
    assert tgi["max_new_tokens"]["anyOf"][0]["maximum"] == 47
    assert tgi["stop"]["maxItems"] == 3
    assert tgi["top_n_tokens"]["anyOf"][0]["maximum"] == 2
    assert tgi["best_of"]["anyOf"][0]["maximum"] == 4
    assert "40 tokens" in schemas["TGIRequest"]["properties"]["inputs"]["description"]
    assert schemas["ChatCompletionRequest"]["properties"]["n"]["maximum"] == 6
    token_ids = schemas["CompletionRequest"]["properties"]["prompt"]["anyOf"][2]
    assert (token_ids["items"]["maximum"], token_ids["maxItems"]) == (319, 40)
    # Before a group connects: the flags' limits, none of the groups'.
    bare = description.document(ServedLimits(3, 2, 4, 6))["components"]["schemas"]
    assert "maximum" not in bare["TGIParameters"]["properties"]["max_new_tokens"]["anyOf"][0]
    assert bare["TGIParameters"]["properties"]["stop"]["maxItems"] == 3
    stream = spec["paths"]["/generate_stream"]["post"]["requestBody"]["content"]
    assert stream["application/json"]["schema"] == {
        "$ref": "#/components/schemas/TGIStreamRequest"}
