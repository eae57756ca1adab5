"""The shard's side of failover, over its gRPC contract: a continuation (prompt + the tokens a
lost group generated, `resumed_tokens` of them) samples what the lost group would have, and a
SIGTERM drains: routers are told at once, new work is handed back, the process exits 0."""

from __future__ import annotations

import queue
import signal
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import start_shard
from sluice.v1 import generate_pb2 as pb
from sluice.v1 import generate_pb2_grpc as pb_grpc

PROMPT = [5, 77, 140, 9, 33, 201, 18]
MAX_NEW = 24
GREEDY = pb.SamplingParameters(temperature=0.0, top_p=1.0, typical_p=1.0,
                               repetition_penalty=1.0)
# Strong penalties: a continuation that forgot its resumed tokens' counts picks other tokens.
PENALIZED = pb.SamplingParameters(temperature=0.9, top_k=40, top_p=0.95, typical_p=1.0,
                                  repetition_penalty=1.3, frequency_penalty=2.0,
                                  presence_penalty=1.0, seed=1234)


class Stream:
    """One Generate stream to a shard, kept open until closed (closing cancels its requests)."""

    def __init__(self, address: str):
        self._channel = grpc.insecure_channel(address)
        self._outbox: queue.Queue = queue.Queue()
        self._responses = pb_grpc.TextGenerationStub(self._channel).Generate(
            iter(self._outbox.get, None), timeout=120)

    def submit(self, *requests: pb.Request) -> None:
        self._outbox.put(pb.GenerateRequest(batch=pb.Batch(requests=requests)))

    def next(self) -> pb.GenerateResponse:
        return next(self._responses)

    def close(self) -> None:
        self._outbox.put(None)
        self._channel.close()


def request(request_id: int, input_ids: list[int], sampling: pb.SamplingParameters,
            max_new_tokens: int, resumed_tokens: int = 0) -> pb.Request:
    return pb.Request(id=request_id, input_ids=input_ids, sampling=sampling,
                      resumed_tokens=resumed_tokens,
                      stopping=pb.StoppingParameters(max_new_tokens=max_new_tokens,
                                                     ignore_eos=True))


def tokens_of(stream: Stream, request_id: int) -> list[int]:
    tokens = []
    while True:
        response = stream.next()
        assert not response.errors, response.errors
        for i, token, reason in zip(response.tokens.ids, response.tokens.token_ids,
                                    response.tokens.finish_reasons):
            if i == request_id:
                tokens.append(token)
                if reason != pb.FINISH_REASON_NONE:
                    return tokens


@pytest.fixture(scope="module")
def shard(tiny_model):
    shard = start_shard(str(tiny_model), "--shutdown-grace", "30")
    yield shard
    shard.stop()


@pytest.mark.parametrize("sampling", [GREEDY, PENALIZED], ids=["greedy", "seeded_penalized"])
def test_a_continuation_generates_what_the_lost_group_would_have(shard, sampling):
    stream = Stream(shard.address)
    try:
        stream.submit(request(1, PROMPT, sampling, MAX_NEW))
        whole = tokens_of(stream, 1)
        assert len(whole) == MAX_NEW
        for request_id, done in ((2, 1), (3, 9), (4, MAX_NEW - 1)):
            stream.submit(request(request_id, PROMPT + whole[:done], sampling, MAX_NEW - done,
                                  resumed_tokens=done))
            assert tokens_of(stream, request_id) == whole[done:], done
    finally:
        stream.close()


def test_penalties_count_the_resumed_tokens_as_generated_not_as_prompt(shard):
    """Without resumed_tokens, the same input is a new prompt: its penalties differ, and so do
    its tokens (what the test above would catch if the shard ignored the field)."""
    stream = Stream(shard.address)
    try:
        stream.submit(request(1, PROMPT, PENALIZED, MAX_NEW))
        whole = tokens_of(stream, 1)
        done = 12
        stream.submit(request(2, PROMPT + whole[:done], PENALIZED, MAX_NEW - done))
        assert tokens_of(stream, 2) != whole[done:]
    finally:
        stream.close()


def test_sigterm_drains_hands_back_new_work_and_exits_0(shard):
    """The module's shard, last: it stops here."""
    stream = Stream(shard.address)
    try:
        stream.submit(request(1, PROMPT, GREEDY, 1))
        assert tokens_of(stream, 1)
        stream.submit(request(2, PROMPT, GREEDY, 1000))  # runs through the drain
        while 2 not in stream.next().tokens.ids:
            pass
        shard.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while not (response := stream.next()).draining:
            assert time.monotonic() < deadline
        with grpc.insecure_channel(shard.address) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="sluice.v1.TextGeneration"), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
        stream.submit(request(3, PROMPT, GREEDY, 4))
        refused = {}
        while 3 not in refused:
            response = stream.next()
            assert response.draining
            refused.update({e.id: e for e in response.errors})
        assert refused[3].retryable and "draining" in refused[3].message
        # The long request runs on within the grace: it still gets tokens after the refusal.
        got = 0
        while got < 3:
            got += sum(1 for i in stream.next().tokens.ids if i == 2)
    finally:
        stream.close()
    assert shard.process.wait(60) == 0


def test_when_the_drain_grace_ends_running_requests_go_back_as_retryable(tiny_model):
    shard = start_shard(str(tiny_model), "--shutdown-grace", "0.5")
    stream = Stream(shard.address)
    errors: dict[int, pb.RequestError] = {}
    try:
        stream.submit(request(1, PROMPT, GREEDY, 1000))
        while not stream.next().tokens.ids:
            pass
        shard.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while 1 not in errors:
            assert time.monotonic() < deadline
            errors.update({e.id: e for e in stream.next().errors})
    finally:
        stream.close()
    assert errors[1].retryable and "draining" in errors[1].message
    assert shard.process.wait(60) == 0
