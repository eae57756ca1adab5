"""Metrics, traces and logs of real processes: names, movement, propagation, log fields."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import start_router, start_shard, wait_until
from otlp import Receiver

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "the quick brown fox"


@pytest.fixture(scope="module")
def receiver():
    receiver = Receiver()
    yield receiver
    receiver.stop()


@pytest.fixture(scope="module")
def stack(tiny_model, receiver):
    """A shard (metrics on, traces over gRPC) and a router (traces over HTTP/protobuf)."""
    fast_export = {"OTEL_BSP_SCHEDULE_DELAY": "100"}
    shard = start_shard(str(tiny_model), "--metrics-port", "0", "--otlp-endpoint",
                        receiver.grpc_endpoint, env=fast_export)
    router = start_router(shard, flags=("--otlp-endpoint", receiver.http_endpoint,
                                        "--otlp-protocol", "http/protobuf",
                                        "--max-concurrent-requests", "4"), env=fast_export)
    yield shard, router
    router.stop()
    shard.stop()


def scrape(url: str) -> dict:
    """{family name: (type, {(sample name, labels): value})} of one /metrics page."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {f.name: (f.type, {(s.name, tuple(sorted(s.labels.items()))): s.value
                              for s in f.samples})
            for f in text_string_to_metric_families(text)}


def value(metrics: dict, family: str, sample: str | None = None, **labels) -> float:
    _, samples = metrics[family]
    key = (sample or family, tuple(sorted(labels.items())))
    return samples.get(key, 0.0)


def exported(stack) -> dict[str, str]:
    """Exported metric names as PromQL writes them (counters with _total): type."""
    shard, router = stack
    names = {}
    for url in (router.url, f"http://{shard.ready['metrics_address']}"):
        for family, (kind, _) in scrape(url).items():
            names[family + ("_total" if kind == "counter" else "")] = kind
    return names


def load(router) -> None:
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 6}}
    assert httpx.post(f"{router.url}/generate", json=body, timeout=60).status_code == 200
    with httpx.stream("POST", f"{router.url}/generate_stream", json=body, timeout=60) as answer:
        assert sum(1 for line in answer.iter_lines() if line.startswith("data:")) == 6
    chat = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 6,
            "temperature": 0, "ignore_eos": True}
    assert httpx.post(f"{router.url}/v1/chat/completions", json=chat,
                      timeout=60).status_code == 200
    assert httpx.post(f"{router.url}/generate", json={"inputs": ""}).status_code == 422


def test_metrics_are_present_and_move_after_load(stack):
    shard, router = stack
    shard_url = f"http://{shard.ready['metrics_address']}"
    before, shard_before = scrape(router.url), scrape(shard_url)
    load(router)
    after, shard_after = scrape(router.url), scrape(shard_url)

    def moved(b, a, family, sample=None, **labels):
        return value(a, family, sample, **labels) - value(b, family, sample, **labels)

    assert moved(before, after, "sluice_router_requests", "sluice_router_requests_total",
                 route="/generate", status="200") == 1
    assert moved(before, after, "sluice_router_requests", "sluice_router_requests_total",
                 route="/generate", status="422") == 1
    assert moved(before, after, "sluice_router_requests", "sluice_router_requests_total",
                 route="/v1/chat/completions", status="200") == 1
    for family in ("sluice_router_time_to_first_token_seconds",
                   "sluice_router_queue_duration_seconds", "sluice_router_input_tokens",
                   "sluice_router_generated_tokens"):
        assert moved(before, after, family, f"{family}_count") == 3, family
    assert moved(before, after, "sluice_router_validation_duration_seconds",
                 "sluice_router_validation_duration_seconds_count") == 3
    # Six tokens each: five gaps between tokens per request.
    assert moved(before, after, "sluice_router_inter_token_latency_seconds",
                 "sluice_router_inter_token_latency_seconds_count") == 15
    assert moved(before, after, "sluice_router_generated_tokens",
                 "sluice_router_generated_tokens_sum") == 18
    assert moved(before, after, "sluice_router_generations", "sluice_router_generations_total",
                 reason="length") == 3
    assert moved(before, after, "sluice_router_request_duration_seconds",
                 "sluice_router_request_duration_seconds_count", route="/generate_stream") == 1
    assert value(after, "sluice_router_queue_size") == 0
    assert value(after, "sluice_router_running_requests") == 0
    free = value(after, "sluice_router_shard_group_free_budget_tokens",
                 shard_group=shard.address)
    total = value(shard_after, "sluice_shard_kv_budget_total_tokens")
    assert free == total > 0
    assert value(after, "sluice_router_shard_group_ready", shard_group=shard.address) == 1

    assert moved(shard_before, shard_after, "sluice_shard_decode_tokens",
                 "sluice_shard_decode_tokens_total") == 15  # the first token ends a prefill
    assert moved(shard_before, shard_after, "sluice_shard_prefill_tokens",
                 "sluice_shard_prefill_tokens_total") >= 3 * 4
    steps = moved(shard_before, shard_after, "sluice_shard_step_duration_seconds",
                  "sluice_shard_step_duration_seconds_count")
    assert steps >= 6
    assert moved(shard_before, shard_after, "sluice_shard_batch_sequences",
                 "sluice_shard_batch_sequences_count") == steps
    assert moved(shard_before, shard_after, "sluice_shard_batch_sequences",
                 "sluice_shard_batch_sequences_sum") == 18  # one sample per token
    assert value(shard_after, "sluice_shard_kv_budget_used_tokens") == 0
    assert value(shard_after, "sluice_shard_running_requests") == 0
    assert value(shard_after, "sluice_shard_waiting_requests") == 0


def test_docs_list_exactly_the_exported_metrics(stack):
    """Every metric this (CPU) stack exports, and those the docs mark as CUDA's alone."""
    rows = re.findall(r"^\| `(sluice_[a-z0-9_]+)` \| (\w+) \|.*?(on CUDA only)? \|$",
                      (ROOT / "docs/metrics.md").read_text(), re.MULTILINE)
    assert {name: kind for name, kind, cuda in rows if not cuda} == exported(stack)
    assert [name for name, _, cuda in rows if cuda] == ["sluice_shard_rank_device_memory_bytes"]


def test_one_trace_runs_from_router_to_shard_with_the_right_parents(stack, receiver):
    _, router = stack
    trace_id, client_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    headers = {"traceparent": f"00-{trace_id}-{client_span}-01"}
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 4}}
    answer = httpx.post(f"{router.url}/generate", json=body, headers=headers, timeout=60)
    assert answer.status_code == 200
    expected = {("sluice-router", n) for n in ("POST /generate", "validate", "queue", "dispatch",
                                               "stream")}
    expected |= {("sluice-shard", n) for n in ("admit", "prefill", "decode")}
    wait_until(lambda: {(s.service, s.name) for s in receiver.trace(trace_id)} == expected,
               "the trace's spans from router and shard", 30, interval_s=0.1,
               report=lambda: receiver.trace(trace_id))
    spans = {s.name: s for s in receiver.trace(trace_id)}
    root, dispatch = spans["POST /generate"], spans["dispatch"]
    assert root.parent_span_id == client_span
    for name in ("validate", "queue", "dispatch", "stream"):
        assert spans[name].parent_span_id == root.span_id, name
    for name in ("admit", "prefill", "decode"):
        assert spans[name].parent_span_id == dispatch.span_id, name
    assert spans["admit"].end_ns <= spans["prefill"].start_ns <= spans["decode"].start_ns
    assert spans["decode"].attributes["sluice.generated_tokens"] == 4
    assert root.attributes["http.response.status_code"] == 200


def test_request_log_lines_carry_ids_tokens_timings_and_never_the_prompt(stack):
    _, router = stack
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 5}}
    answer = httpx.post(f"{router.url}/generate", json=body,
                        headers={"x-request-id": "req-42"}, timeout=60)
    assert answer.headers["x-request-id"] == "req-42"
    [line] = wait_until(lambda: [l for l in router.log_lines() if l.get("request_id") == "req-42"],
                        "the log line of req-42", 10)
    assert line["message"] == "request" and line["level"] == "info"
    assert {k: line[k] for k in ("route", "status", "tenant", "max_new_tokens",
                                 "generated_tokens", "finish_reason")} == {
        "route": "/generate", "status": 200, "tenant": "anonymous", "max_new_tokens": 5,
        "generated_tokens": 5, "finish_reason": "length"}
    assert line["input_tokens"] > 0
    for timing in ("validation_s", "queue_s", "time_to_first_token_s", "duration_s"):
        assert line[timing] >= 0
    assert re.fullmatch(r"[0-9a-f]{32}", line["trace_id"])
    assert not [out for out in router.output if PROMPT in out]


def test_a_client_leaving_a_non_streamed_request_is_logged_and_counted_as_499(stack):
    _, router = stack
    before = scrape(router.url)
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 900}}

    async def leave_early():
        async with httpx.AsyncClient(timeout=60) as client:
            task = asyncio.create_task(client.post(f"{router.url}/generate", json=body,
                                                   headers={"x-request-id": "req-gone"}))
            # Polled on a thread: the event loop must go on sending the request.
            await asyncio.to_thread(wait_until, lambda: value(
                scrape(router.url), "sluice_router_running_requests") >= 1,
                "the request running", 10, interval_s=0.01)
            task.cancel()  # the connection closes before the answer
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(leave_early())
    [line] = wait_until(
        lambda: [l for l in router.log_lines() if l.get("request_id") == "req-gone"],
        "the log line of req-gone", 10)
    assert (line["status"], line["finish_reason"], line["level"]) == (499, "cancelled", "info")
    after = scrape(router.url)
    assert value(after, "sluice_router_requests", "sluice_router_requests_total",
                 route="/generate", status="499") - value(
        before, "sluice_router_requests", "sluice_router_requests_total",
        route="/generate", status="499") == 1
    assert value(after, "sluice_router_requests", "sluice_router_requests_total",
                 route="/generate", status="500") == 0
    assert not [out for out in router.output if "Traceback" in out or "CancelledError" in out]
