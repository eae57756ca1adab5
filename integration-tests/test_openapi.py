"""/openapi.json describes every route with the limits the server enforces: on requests at each
limit the schema and the server agree, and schemathesis, driven by it, finds no server error, no
answer (JSON or server-sent event) that breaks its own schema and no operation that rejects most
of what the schema allows; the server still serves.

The stack serves the tiny random model with small limits (40 prompt tokens, 48 in all: a chat
template takes 19), so each of the ~1,600 generated requests that is valid generates at most a
few dozen tokens.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import httpx
import jsonschema
import pytest

from conftest import Service, start_router, start_shard

CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,"
          "response_schema_conformance")
ROUTES = {"/": {"post"}, "/generate": {"post"}, "/generate_stream": {"post"},
          "/tokenize": {"post"}, "/info": {"get"}, "/health": {"get"},
          "/v1/chat/completions": {"post"}, "/v1/completions": {"post"}, "/v1/models": {"get"}}


@pytest.fixture(scope="module")
def small_stack(tiny_model) -> Iterator[Service]:
    shard = start_shard(str(tiny_model), "--max-input-tokens", "40", "--max-total-tokens", "48")
    router = start_router(shard)
    yield router
    router.stop()
    shard.stop()


def test_openapi_describes_every_tgi_and_openai_route_and_docs_render_it(small_stack):
    spec = httpx.get(f"{small_stack.url}/openapi.json").json()
    assert spec["openapi"] == "3.1.0"
    assert {path: set(ops) for path, ops in spec["paths"].items()} == ROUTES
    schemas = spec["components"]["schemas"]
    for name in ("TGIRequest", "GenerateResponse", "Details", "StreamResponse", "SimpleToken",
                 "ChatCompletionRequest", "ChatCompletion", "ChatCompletionChunk",
                 "CompletionRequest", "Completion", "TGIError", "OpenAIError"):
        assert name in schemas, name
    stream = spec["paths"]["/generate_stream"]["post"]["responses"]["200"]["content"]
    assert list(stream) == ["text/event-stream"]
    page = httpx.get(f"{small_stack.url}/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '"/openapi.json"' in page.text


TGI = {"inputs": "hi", "parameters": {"max_new_tokens": 2}}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMPLETION = {"prompt": "hi", "max_tokens": 2}


def tgi(**parameters) -> dict:
    return TGI | {"parameters": TGI["parameters"] | parameters}


# (route, body, whether the server serves it) at each limit the handlers check, on either side:
# the router's defaults (4 stop sequences, top-n 5, best_of 2, 4 choices) and the stack's. A
# prompt's token count (and so prompt + max_new_tokens) is the tokenizer's to say: the schema
# states those in words, and only the bounds that hold whatever the prompt are checked here.
AT_THE_LIMITS = [
    ("/generate", TGI, True),
    ("/generate", TGI | {"inputs": ""}, False),
    ("/generate", tgi(max_new_tokens=48), False),
    ("/generate", tgi(stop=list("abcd")), True),
    ("/generate", tgi(stop=list("abcde")), False),
    ("/generate", tgi(top_n_tokens=5), True),
    ("/generate", tgi(top_n_tokens=6), False),
    ("/generate", tgi(watermark=False, adapter_id=None, grammar=None), True),
    ("/generate", tgi(watermark=True), False),
    ("/generate", tgi(adapter_id="my-lora"), False),
    ("/generate", tgi(grammar={"type": "json", "value": {}}), False),
    ("/generate", tgi(best_of=2, do_sample=True), True),
    ("/generate", tgi(best_of=2, top_k=5), True),
    ("/generate", tgi(best_of=2, temperature=0.5), True),
    ("/generate", tgi(best_of=3, do_sample=True), False),
    ("/generate", tgi(best_of=2), False),
    ("/generate", tgi(best_of=2, do_sample=True, seed=1), False),
    ("/generate", tgi(best_of=2, do_sample=True, temperature=0), False),
    ("/generate", tgi(decoder_input_details=True), True),
    ("/generate_stream", tgi(decoder_input_details=True), False),
    ("/generate_stream", tgi(best_of=2, do_sample=True), False),
    ("/generate_stream", tgi(best_of=1), True),
    ("/", TGI | {"stream": True}, True),
    ("/", tgi(decoder_input_details=True) | {"stream": True}, False),
    ("/", tgi(decoder_input_details=True), True),
    ("/v1/chat/completions", CHAT | {"n": 4}, True),
    ("/v1/chat/completions", CHAT | {"n": 5}, False),
    ("/v1/chat/completions", CHAT | {"max_tokens": 48}, False),
    ("/v1/chat/completions", CHAT | {"stop": list("abcde")}, False),
    ("/v1/chat/completions", CHAT | {"logprobs": True, "top_logprobs": 5}, True),
    ("/v1/chat/completions", CHAT | {"logprobs": True, "top_logprobs": 6}, False),
    ("/v1/chat/completions", CHAT | {"top_logprobs": 6}, True),  # ignored without logprobs
    ("/v1/completions", COMPLETION | {"prompt": ["a", "b"], "n": 2}, True),
    ("/v1/completions", COMPLETION | {"prompt": list("abcde")}, False),
    ("/v1/completions", COMPLETION | {"n": 5}, False),
    ("/v1/completions", COMPLETION | {"prompt": []}, False),
    ("/v1/completions", COMPLETION | {"prompt": [[]]}, False),
    ("/v1/completions", COMPLETION | {"prompt": [319]}, True),  # the tiny model's last id
    ("/v1/completions", COMPLETION | {"prompt": [320]}, False),
    ("/v1/completions", COMPLETION | {"prompt": [[5] * 40]}, True),
    ("/v1/completions", COMPLETION | {"prompt": [[5] * 41]}, False),
    ("/v1/completions", COMPLETION | {"logprobs": 5}, True),
    ("/v1/completions", COMPLETION | {"logprobs": 6}, False),
    ("/v1/completions", COMPLETION | {"max_tokens": 48}, False),
]


def test_the_schema_accepts_a_request_at_each_limit_exactly_when_the_server_serves_it(
        small_stack):
    spec = httpx.get(f"{small_stack.url}/openapi.json").json()
    for path, body, served in AT_THE_LIMITS:
        schema = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]
        validator = jsonschema.Draft202012Validator(
            schema["schema"] | {"components": spec["components"]})
        assert validator.is_valid(body) == served, (path, body)
        answer = httpx.post(f"{small_stack.url}{path}", json=body, timeout=60)
        assert answer.status_code == (200 if served else 422), (path, body, answer.text)


def test_schemathesis_finds_no_server_error_and_no_answer_outside_its_schema(small_stack,
                                                                           tmp_path):
    # In a fresh folder: schemathesis keeps a cache of past crashes in its working directory.
    # One worker: with two, schemathesis' threads compile strategies at once and CPython 3.11
    # may fail with "SystemError: AST constructor recursion depth mismatch".
    run = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "run", f"{small_stack.url}/openapi.json",
         "--checks", CHECKS, "--phases", "coverage,fuzzing", "--max-examples", "20",
         "--seed", "1", "--workers", "1", "--request-timeout", "120", "--no-shrink"],
        capture_output=True, text=True, timeout=540, cwd=tmp_path)
    report = run.stdout[-6000:] + run.stderr[-2000:]
    assert run.returncode == 0, report
    assert "Tested: 9" in run.stdout, report
    assert " passed" in run.stdout and " failed" not in run.stdout, report
    assert "Schema validation mismatch" not in run.stdout, report
    # The server still serves, on both APIs.
    answer = httpx.post(f"{small_stack.url}/generate",
                        json={"inputs": "hello", "parameters": {"max_new_tokens": 3}}, timeout=60)
    assert answer.status_code == 200, answer.text
    answer = httpx.post(f"{small_stack.url}/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "ignore_eos": True})
    assert answer.json()["usage"]["completion_tokens"] == 3
    assert httpx.get(f"{small_stack.url}/health").status_code == 200
