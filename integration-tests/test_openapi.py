"""/openapi.json describes every route, and schemathesis, driven by it, finds no server error
and no answer (JSON or server-sent event) that breaks its own schema; the server still serves.

The stack serves the tiny random model with small limits (48 prompt tokens, 64 in all), so each
of the ~1,500 generated requests that is valid generates at most a few dozen tokens.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest

from conftest import Service, start_router, start_shard

CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,"
          "response_schema_conformance")
ROUTES = {"/": {"post"}, "/generate": {"post"}, "/generate_stream": {"post"},
          "/tokenize": {"post"}, "/info": {"get"}, "/health": {"get"},
          "/v1/chat/completions": {"post"}, "/v1/completions": {"post"}, "/v1/models": {"get"}}


@pytest.fixture(scope="module")
def small_stack(tiny_model) -> Iterator[Service]:
    shard = start_shard(str(tiny_model), "--max-input-tokens", "48", "--max-total-tokens", "64")
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


def test_schemathesis_finds_no_server_error_and_no_answer_outside_its_schema(small_stack,
                                                                           tmp_path):
    # In a fresh folder: schemathesis keeps a cache of past crashes in its working directory.
    run = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "run", f"{small_stack.url}/openapi.json",
         "--checks", CHECKS, "--phases", "coverage,fuzzing", "--max-examples", "20",
         "--seed", "1", "--workers", "1", "--request-timeout", "120", "--no-shrink"],
        capture_output=True, text=True, timeout=540, cwd=tmp_path)
    report = run.stdout[-6000:] + run.stderr[-2000:]
    assert run.returncode == 0, report
    assert "Tested: 9" in run.stdout, report
    assert " passed" in run.stdout and " failed" not in run.stdout, report
    # The server still serves, on both APIs.
    answer = httpx.post(f"{small_stack.url}/generate",
                        json={"inputs": "hello", "parameters": {"max_new_tokens": 3}}, timeout=60)
    assert answer.status_code == 200, answer.text
    answer = httpx.post(f"{small_stack.url}/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "ignore_eos": True})
    assert answer.json()["usage"]["completion_tokens"] == 3
    assert httpx.get(f"{small_stack.url}/health").status_code == 200
