"""End to end through `sluice serve` with the embedded SmolLM2-135M-Instruct, as `make run` runs it."""

from __future__ import annotations

import asyncio
import json

import httpx
import psutil

from conftest import TEST_BUDGET, Service, sluice

PARIS = {"messages": [{"role": "user", "content": "What is the capital of France?"}],
         "max_tokens": 20, "temperature": 0}


def test_chat_completion_names_paris(smollm2_serve):
    answer = httpx.post(f"{smollm2_serve.url}/v1/chat/completions", json=PARIS, timeout=120)
    assert answer.status_code == 200
    body = answer.json()
    assert body["object"] == "chat.completion"
    assert "Paris" in body["choices"][0]["message"]["content"]
    assert body["choices"][0]["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 1 <= usage["completion_tokens"] <= 20


def test_streamed_chat_completion_names_paris_and_matches_non_streamed(smollm2_serve):
    plain = httpx.post(f"{smollm2_serve.url}/v1/chat/completions", json=PARIS,
                       timeout=120).json()["choices"][0]["message"]["content"]
    chunks = []
    with httpx.stream("POST", f"{smollm2_serve.url}/v1/chat/completions",
                      json=PARIS | {"stream": True}, timeout=120) as answer:
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in answer.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        chunks.append(json.loads(line[len("data: "):]))
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == plain
    assert "Paris" in text
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_tgi_generate_and_generate_stream_agree(smollm2_serve):
    request = {"inputs": "The capital of France is", "parameters": {"max_new_tokens": 6}}
    plain = httpx.post(f"{smollm2_serve.url}/generate", json=request, timeout=120).json()
    assert "Paris" in plain["generated_text"]
    with httpx.stream("POST", f"{smollm2_serve.url}/generate_stream", json=request,
                      timeout=120) as answer:
        events = [json.loads(line[5:]) for line in answer.iter_lines() if line.startswith("data:")]
    assert [e["index"] for e in events] == list(range(1, 7))
    assert "".join(e["token"]["text"] for e in events) == plain["generated_text"]
    assert events[-1]["generated_text"] == plain["generated_text"]
    assert all(e["generated_text"] is None for e in events[:-1])
    compat = httpx.post(f"{smollm2_serve.url}/", json=request, timeout=120).json()
    assert compat == [plain]


def test_info_health_and_models_describe_the_embedded_model(smollm2_serve):
    info = httpx.get(f"{smollm2_serve.url}/info").json()
    assert info["model_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert info["model_dtype"] == "float32"
    assert info["max_input_tokens"] < info["max_total_tokens"]
    assert httpx.get(f"{smollm2_serve.url}/health").status_code == 200
    models = httpx.get(f"{smollm2_serve.url}/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["HuggingFaceTB/SmolLM2-135M-Instruct"]


def test_concurrent_greedy_requests_match_each_alone(smollm2_serve):
    prompts = ["The capital of France is", "Write a haiku about rain.", "1, 2, 3, 4,",
               "Tell me a story about a dragon who", "Python is a", "Hello", "The sky is",
               "Recipe for pancakes:"]
    lengths = [5, 17, 9, 24, 3, 12, 20, 8]

    def request(prompt, n):
        return {"inputs": prompt, "parameters": {"max_new_tokens": n, "details": True}}

    def token_ids(body):
        return [t["id"] for t in body["details"]["tokens"]]

    alone = [token_ids(httpx.post(f"{smollm2_serve.url}/generate", json=request(p, n),
                                  timeout=120).json()) for p, n in zip(prompts, lengths)]

    async def together():
        async with httpx.AsyncClient(timeout=300) as client:
            answers = await asyncio.gather(*(
                client.post(f"{smollm2_serve.url}/generate", json=request(p, n))
                for p, n in zip(prompts, lengths)))
        return [token_ids(a.json()) for a in answers]

    assert asyncio.run(together()) == alone


def test_sigterm_stops_router_and_shard_without_orphans():
    serve = Service(sluice("serve", "--port", "0", "--num-threads", "1", *TEST_BUDGET))
    try:
        assert len(psutil.Process(serve.process.pid).children()) == 2  # the shard, the router
        children = psutil.Process(serve.process.pid).children(recursive=True)  # and workers
        assert httpx.get(f"{serve.url}/health").status_code == 200
    finally:  # a failed check above must not leave the processes running
        code = serve.stop()
    assert code == 0
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert alive == []
