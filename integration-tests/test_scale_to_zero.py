"""Scale to zero, on real processes: a router started with --hold-without-groups and no shard
group is healthy, holds the requests that arrive (counted in sluice_router_queue_size, what
the chart's KEDA trigger reads to start the first group), and answers them in full once a group
comes up; without a group it answers 503 when --request-timeout runs out, 429 beyond
--max-concurrent-requests, and lets a client that leaves go. Without the flag nothing changes:
503 at once, /health 503.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import Service, free_port, sluice, start_shard, wait_healthy, wait_until
from otlp import Receiver

NOWHERE = "127.0.0.1:1"  # nothing listens there: no group ever comes
IDLE_TIMEOUT_S = 2  # the idle router's --request-timeout
# How late past its deadline a held request's 503 may come: scheduling on a busy machine, not a
# second timeout.
LATE_S = 8
CHAT = [{"role": "user", "content": "hello there"}]
MAX_TOKENS = 12
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


def router_with(*flags: str) -> Service:
    return Service(sluice("router", "--port", "0", "--workers", "1", *flags))


def queue_size(router: Service) -> float:
    text = httpx.get(f"{router.url}/metrics", timeout=10).text
    return next(s.value for f in text_string_to_metric_families(text) for s in f.samples
                if s.name == "sluice_router_queue_size")


WAIT_S = 20  # the bound of this module's waits for held requests, spans and log lines


def request_lines(router: Service) -> list[dict]:
    return [line for line in router.log_lines() if line.get("message") == "request"]


class Call(threading.Thread):
    """One blocking client call on a thread, its result or exception and how long it took."""

    def __init__(self, call: Callable[[], object]):
        super().__init__(daemon=True)
        self._call = call
        self.result: object = None
        self.error: BaseException | None = None
        self.took_s = 0.0
        self.start()

    def run(self) -> None:
        started = time.monotonic()
        try:
            self.result = self._call()
        except BaseException as exc:  # handed to the test, which asserts on it
            self.error = exc
        self.took_s = time.monotonic() - started

    def outcome(self, timeout_s: float):
        self.join(timeout_s)
        assert not self.is_alive(), "the client call did not end"
        if self.error is not None:
            raise self.error
        return self.result


def generate(router: Service, timeout_s: float = 120, headers: dict[str, str] | None = None,
             **parameters) -> httpx.Response:
    return httpx.post(f"{router.url}/generate", timeout=timeout_s, headers=headers, json={
        "inputs": "the quick brown fox", "parameters": {"max_new_tokens": MAX_TOKENS,
                                                        **parameters}})


def token_ids(answer: dict) -> list[int]:
    return [token["id"] for token in answer["details"]["tokens"]]


def streamed_chat(client: openai.OpenAI) -> tuple[str, list[str | None]]:
    """The text of a streamed chat completion and its chunks' finish reasons."""
    chunks = list(client.chat.completions.create(
        model="any", messages=CHAT, max_tokens=MAX_TOKENS, temperature=0, stream=True,
        extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, [c.choices[0].finish_reason for c in chunks if c.choices]


@pytest.fixture(scope="module")
def idle_router():
    """Holds requests; no group ever comes."""
    router = router_with("--shard-uri", NOWHERE, "--hold-without-groups", "--request-timeout",
                         str(IDLE_TIMEOUT_S), "--max-concurrent-requests", "2")
    yield router
    router.stop()


def test_requests_held_with_zero_groups_are_answered_in_full_by_the_first_group(tiny_model):
    port = free_port()  # where the first group will listen; nothing does yet
    receiver = Receiver()
    router = Service(sluice("router", "--port", "0", "--workers", "1", "--shard-uri",
                            f"127.0.0.1:{port}", "--hold-without-groups", "--request-timeout",
                            "180", "--otlp-endpoint", receiver.http_endpoint, "--otlp-protocol",
                            "http/protobuf"), env={"OTEL_BSP_SCHEDULE_DELAY": "100"})
    shard = None
    try:
        health = httpx.get(f"{router.url}/health", timeout=10)
        assert health.status_code == 200, health.text
        assert health.json()["shard_groups_ready"] == 0
        assert "--hold-without-groups" in health.json()["detail"]

        client = openai.OpenAI(base_url=f"{router.url}/v1", api_key="unused", timeout=180,
                               max_retries=0)
        held_chat = Call(lambda: streamed_chat(client))
        held_generate = Call(lambda: generate(router, details=True, headers={
            "traceparent": f"00-{TRACE_ID}-00f067aa0ba902b7-01"}))
        wait_until(lambda: queue_size(router) == 2, "both requests held", WAIT_S)
        assert held_chat.is_alive() and held_generate.is_alive()

        shard = start_shard(str(tiny_model), "--port", str(port))
        text, finishes = held_chat.outcome(120)
        answer = held_generate.outcome(120)
        assert answer.status_code == 200, answer.text
        assert answer.json()["details"]["generated_tokens"] == MAX_TOKENS
        assert finishes[-1] == "length" and finishes.count("length") == 1
        # The same requests sent now, with the group up, give the same (greedy) answers.
        assert (text, finishes) == streamed_chat(client)
        again = generate(router, details=True).json()
        assert again["generated_text"] == answer.json()["generated_text"]
        assert token_ids(again) == token_ids(answer.json())  # logprobs vary with the batch
        assert queue_size(router) == 0

        health = httpx.get(f"{router.url}/health", timeout=10).json()
        assert health == {"status": "ok", "shard_groups_ready": 1}
        held = [line for line in request_lines(router) if "held_s" in line]
        assert sorted(line["route"] for line in held) == ["/generate", "/v1/chat/completions"]
        assert {line["status"] for line in held} == {200}
        # Validation is timed from the end of the hold, not from the request's arrival.
        assert all(line["validation_s"] < line["held_s"] for line in held)
        # Its trace: the hold, then validation, under the request's span.
        wait_until(lambda: {"hold", "validate", "stream"} <= {
            span.name for span in receiver.trace(TRACE_ID)}, "the held request's spans", WAIT_S)
        spans = {span.name: span for span in receiver.trace(TRACE_ID)}
        root, hold, validate = spans["POST /generate"], spans["hold"], spans["validate"]
        assert hold.parent_span_id == validate.parent_span_id == root.span_id
        assert root.start_ns <= hold.start_ns <= hold.end_ns <= validate.start_ns
    finally:
        router.stop()
        receiver.stop()
        if shard is not None:
            shard.stop()


def test_with_no_group_in_time_a_held_request_gets_503_after_the_request_timeout(idle_router):
    chat = Call(lambda: httpx.post(f"{idle_router.url}/v1/chat/completions", timeout=60, json={
        "messages": CHAT, "max_tokens": 4, "stream": True}))
    plain = Call(lambda: generate(idle_router, timeout_s=60))
    for call, body_error in ((plain, lambda b: b), (chat, lambda b: b["error"])):
        answer = call.outcome(60)
        assert IDLE_TIMEOUT_S - 0.1 <= call.took_s <= IDLE_TIMEOUT_S + LATE_S
        assert answer.status_code == 503
        assert answer.headers["content-type"] == "application/json"  # refused before a stream
        error = body_error(answer.json())
        assert "no shard group became ready within 2 s (--request-timeout)" in (
            error.get("error") or error.get("message"))
    assert plain.result.json()["error_type"] == "unavailable"
    assert chat.result.json()["error"]["code"] == "unavailable"
    assert queue_size(idle_router) == 0


def test_held_requests_count_toward_max_concurrent_requests(idle_router):
    held = [Call(lambda: generate(idle_router, timeout_s=60)) for _ in range(2)]
    wait_until(lambda: queue_size(idle_router) == 2, "two requests held", WAIT_S)
    refused = generate(idle_router, timeout_s=60)
    assert refused.status_code == 429
    assert refused.json()["error_type"] == "overloaded"
    assert all(call.is_alive() for call in held)  # the refusal did not wait for their timeout
    assert [call.outcome(60).status_code for call in held] == [503, 503]


def test_a_client_that_disconnects_while_held_is_let_go(idle_router):
    before = len(request_lines(idle_router))
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
        generate(idle_router, timeout_s=0.5)
    wait_until(lambda: len(request_lines(idle_router)) > before, "the request's log line", WAIT_S)
    [line] = request_lines(idle_router)[before:]
    assert line["status"] == 499  # let go as it left, not answered 503 at its timeout
    assert line["held_s"] < IDLE_TIMEOUT_S
    assert queue_size(idle_router) == 0


def test_a_router_that_drains_ends_its_held_requests_with_503_for_a_retry_elsewhere():
    router = router_with("--shard-uri", NOWHERE, "--hold-without-groups", "--request-timeout",
                         "120", "--shutdown-grace", "60")
    try:
        held = Call(lambda: generate(router, timeout_s=60))
        wait_until(lambda: queue_size(router) == 1, "the request held", WAIT_S)
        router.process.send_signal(signal.SIGTERM)
        answer = held.outcome(60)
        assert answer.status_code == 503
        assert answer.json() == {"error": "the router is shutting down; retry on another replica",
                                 "error_type": "unavailable"}
        assert router.process.wait(30) == 0
    finally:
        router.stop()


def test_without_the_flag_no_group_means_503_at_once_and_an_unready_health():
    router = router_with("--shard-uri", NOWHERE, "--request-timeout", "60")
    try:
        assert httpx.get(f"{router.url}/health", timeout=10).status_code == 503
        answer = generate(router, timeout_s=60)
        assert answer.status_code == 503
        assert answer.json() == {"error": "no shard group is connected",
                                 "error_type": "unavailable"}
        wait_until(lambda: request_lines(router), "the request's log line", WAIT_S)
        [line] = request_lines(router)
        assert "held_s" not in line and line["duration_s"] < 5  # refused, not held
    finally:
        router.stop()


def test_a_held_router_starts_healthy_for_its_readiness_probe(idle_router):
    wait_healthy(idle_router.url, timeout_s=10)
    assert httpx.get(f"{idle_router.url}/info", timeout=10).status_code == 503  # no model yet
