"""What the request handlers enforce beyond the models' types, written into the OpenAPI schemas.

The pydantic models in router/schemas.py carry each field's type and fixed range. The rest is
checked by the handlers: limits that come from the router's flags and from the shard groups
(max_new_tokens, stop sequences, top-n, best_of, choices, token ids), TGI fields accepted only
at their neutral value (watermark, adapter_id, grammar), and combinations (best_of > 1 needs
sampling and no seed; streaming takes neither best_of > 1 nor decoder_input_details). Stating
them here lets clients and fuzzers generate requests the server accepts. What JSON Schema
cannot count (a prompt's tokens) goes into the descriptions.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from router.errors import ShardUnavailable

_REF = "#/components/schemas/{}"
# The streaming variant of a request schema, for the routes that only stream.
STREAM_VARIANTS = {"TGIRequest": "TGIStreamRequest"}


@dataclass(frozen=True, slots=True)
class ServedLimits:
    """The limits requests meet now: the router's flags, and (once a shard group is connected)
    the groups' per-request limits and vocabulary."""

    max_stop_sequences: int
    max_top_n_tokens: int
    max_best_of: int
    max_client_batch_size: int
    max_input_tokens: int | None = None
    max_total_tokens: int | None = None
    vocab_size: int | None = None

    @classmethod
    def of(cls, state) -> ServedLimits:
        """From a RouterState: its config, and its groups' limits where one is connected."""
        config = state.config
        flags = dict(max_stop_sequences=config.max_stop_sequences,
                     max_top_n_tokens=config.max_top_n_tokens, max_best_of=config.max_best_of,
                     max_client_batch_size=config.max_client_batch_size)
        try:
            limits, info = state.limits, state.info
        except ShardUnavailable:
            return cls(**flags)
        return cls(**flags, max_input_tokens=limits.max_input_tokens,
                   max_total_tokens=limits.max_total_tokens, vocab_size=info.vocab_size)


def constrain(schemas: dict, limits: ServedLimits | None) -> None:
    """Write the handlers' rules into the component schemas (in place), and add the streaming
    variants that STREAM_VARIANTS names. Without limits, only the fixed rules."""
    _tgi(schemas, limits)
    _chat(schemas["ChatCompletionRequest"], limits)
    _completion(schemas["CompletionRequest"], limits)


def _tgi(schemas: dict, limits: ServedLimits | None) -> None:
    params = schemas["TGIParameters"]
    props = params["properties"]
    props["watermark"] = {"const": False, "default": False,
                          "description": "watermarking is not supported: false only"}
    props["adapter_id"] = {"type": "null", "default": None,
                           "description": "LoRA adapters are not supported: null only"}
    props["grammar"] = {"type": "null", "default": None,
                        "description": "guided generation is not supported: null only"}
    # best_of > 1: as TGI, only when sampling (do_sample, or a warper away from its neutral
    # value, and a temperature above 0) and without a seed (each run draws its own).
    params["if"] = {"required": ["best_of"],
                    "properties": {"best_of": {"type": "integer", "minimum": 2}}}
    params["then"] = {
        "properties": {"seed": {"type": "null"},
                       "temperature": {"anyOf": [{"type": "number", "exclusiveMinimum": 0},
                                                 {"type": "null"}]}},
        "anyOf": [{"required": ["do_sample"], "properties": {"do_sample": {"const": True}}},
                  {"required": ["temperature"],
                   "properties": {"temperature": {"type": "number", "not": {"const": 1}}}},
                  {"required": ["top_k"], "properties": {"top_k": {"type": "integer"}}},
                  {"required": ["top_p"],
                   "properties": {"top_p": {"type": "number", "exclusiveMaximum": 1}}},
                  {"required": ["typical_p"],
                   "properties": {"typical_p": {"type": "number", "exclusiveMaximum": 1}}}]}
    request = schemas["TGIRequest"]
    _bound(request["properties"]["inputs"], "string", minLength=1)
    if limits is not None:
        _bound(props["stop"], "array", maxItems=limits.max_stop_sequences)
        _bound(props["top_n_tokens"], "integer", maximum=limits.max_top_n_tokens)
        _bound(props["best_of"], "integer", maximum=limits.max_best_of)
        _max_new_tokens(props["max_new_tokens"], limits)
        _prompt_tokens(request["properties"]["inputs"], limits, "after `truncate`")
    # Streaming takes neither best_of > 1 nor the prompt's logprobs: a route that only streams
    # gets its own body schema, and POST / the same rule when `stream` is true.
    streaming = {"properties": {"decoder_input_details": {"const": False},
                                "best_of": {"anyOf": [{"type": "integer", "maximum": 1},
                                                      {"type": "null"}]}}}
    schemas["TGIStreamParameters"] = {"title": "TGIStreamParameters", "allOf": [
        {"$ref": _REF.format("TGIParameters")}, streaming]}
    stream_request = copy.deepcopy(request)
    stream_request["title"] = "TGIStreamRequest"
    stream_request["properties"]["parameters"] = {"$ref": _REF.format("TGIStreamParameters")}
    stream_request["properties"]["stream"]["description"] = "ignored: this route streams"
    schemas["TGIStreamRequest"] = stream_request
    request["if"] = {"required": ["stream"], "properties": {"stream": {"const": True}}}
    request["then"] = {"properties": {"parameters": streaming}}


def _chat(request: dict, limits: ServedLimits | None) -> None:
    props = request["properties"]
    if limits is None:
        return
    _bound(props["n"], "integer", maximum=limits.max_client_batch_size)
    _bound(props["stop"], "array", maxItems=limits.max_stop_sequences)
    for field in ("max_tokens", "max_completion_tokens"):
        _max_new_tokens(props[field], limits)
    # top_logprobs counts only with logprobs: then it is the shard's top-n.
    request["if"] = {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}}
    request["then"] = {"properties": {"top_logprobs": {"anyOf": [
        {"type": "integer", "maximum": limits.max_top_n_tokens}, {"type": "null"}]}}}
    _prompt_tokens(props["messages"], limits, "once rendered by the chat template")


def _completion(request: dict, limits: ServedLimits | None) -> None:
    props = request["properties"]
    text, texts, ids, id_lists = props["prompt"]["anyOf"]
    text["minLength"] = 1
    texts["minItems"] = id_lists["minItems"] = ids["minItems"] = 1
    texts["items"]["minLength"] = id_lists["items"]["minItems"] = 1
    if limits is None:
        return
    # Each prompt runs n choices, and a request runs at most max_client_batch_size in all.
    _bound(props["n"], "integer", maximum=limits.max_client_batch_size)
    texts["maxItems"] = id_lists["maxItems"] = limits.max_client_batch_size
    if limits.vocab_size is not None:
        ids["items"]["maximum"] = id_lists["items"]["items"]["maximum"] = limits.vocab_size - 1
    if limits.max_input_tokens is not None:
        ids["maxItems"] = id_lists["items"]["maxItems"] = limits.max_input_tokens
    props["prompt"]["description"] = (
        f"one prompt or a list of them: prompts x n <= {limits.max_client_batch_size}")
    _bound(props["stop"], "array", maxItems=limits.max_stop_sequences)
    _bound(props["logprobs"], "integer", maximum=min(5, limits.max_top_n_tokens))
    _max_new_tokens(props["max_tokens"], limits)
    _prompt_tokens(props["prompt"], limits, "each")


def _bound(prop: dict, type_: str, **keywords) -> None:
    """Add `keywords` to the branch of `prop` of JSON type `type_` (it may be one of anyOf)."""
    branches = prop.get("anyOf", [prop])
    [branch] = [b for b in branches if b.get("type") == type_]
    branch.update(keywords)


def _max_new_tokens(prop: dict, limits: ServedLimits) -> None:
    if limits.max_total_tokens is None:
        return
    _bound(prop, "integer", maximum=limits.max_total_tokens - 1)
    prop["description"] = (f"prompt tokens + this <= max_total_tokens "
                           f"({limits.max_total_tokens}); by default, all of what is left")


def _prompt_tokens(prop: dict, limits: ServedLimits, where: str) -> None:
    if limits.max_input_tokens is None:
        return
    said = prop.get("description", "")
    prop["description"] = ((said + "; " if said else "") + f"at most {limits.max_input_tokens} "
                           f"tokens ({where}), and not empty")
