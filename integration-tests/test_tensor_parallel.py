"""Tensor parallelism on the CPU: shard groups of 2, 3 and 4 ranks (real processes, gloo)
against one rank on the same weights, and a group that loses a rank.

Ranks split every product, so their sums run in another order: float32 logprobs agree to
1e-4, and greedy tokens exactly.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import httpx
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import TEST_BUDGET, Service, shard_info, sluice, start_shard
from shard.tests.tiny_model import write_tiny_model
from sluice.v1 import generate_pb2 as pb
from sluice.v1 import generate_pb2_grpc as pb_grpc

TOLERANCE = 1e-4
PROMPTS = [[1, 504, 3458, 282, 4649, 314], list(range(100, 160)), [42] * 7, [9, 17, 23]]


@dataclass
class Generated:
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_ids: list[int] = field(default_factory=list)
    top_logprobs: list[float] = field(default_factory=list)
    prompt_logprobs: list[float] = field(default_factory=list)


def generate(shard: Service, prompts: list[list[int]], max_new: int = 8, top_n: int = 3,
             timeout_s: float = 120) -> list[Generated]:
    """Greedy continuations with their logprobs, top-n alternatives and prompt logprobs, over
    one Generate stream."""
    requests = [pb.Request(id=i + 1, input_ids=p, sampling=pb.SamplingParameters(),
                           stopping=pb.StoppingParameters(max_new_tokens=max_new,
                                                          ignore_eos=True),
                           top_n_tokens=top_n, prefill_logprobs=True)
                for i, p in enumerate(prompts)]
    results = {r.id: Generated() for r in requests}
    done = threading.Event()

    def outgoing():
        yield pb.GenerateRequest(batch=pb.Batch(requests=requests))
        done.wait(timeout_s)

    finished = 0
    with grpc.insecure_channel(shard.address) as channel:
        for response in pb_grpc.TextGenerationStub(channel).Generate(outgoing(),
                                                                     timeout=timeout_s):
            assert not response.errors, response.errors
            for scores in response.prefill_logprobs:
                results[scores.id].prompt_logprobs = list(scores.logprobs)
            t = response.tokens
            for i, request_id in enumerate(t.ids):
                r = results[request_id]
                r.tokens.append(t.token_ids[i])
                r.logprobs.append(t.logprobs[i])
                r.top_ids += t.top_n_token_ids[top_n * i:top_n * (i + 1)]
                r.top_logprobs += t.top_n_logprobs[top_n * i:top_n * (i + 1)]
                finished += t.finish_reasons[i] != pb.FINISH_REASON_NONE
            if finished == len(requests):
                done.set()
                break
    return [results[r.id] for r in requests]


def assert_same_generation(several: list[Generated], one: list[Generated]) -> None:
    for got, expected in zip(several, one, strict=True):
        assert got.tokens == expected.tokens
        assert got.top_ids == expected.top_ids
        for a, b in ((got.logprobs, expected.logprobs), (got.top_logprobs, expected.top_logprobs),
                     (got.prompt_logprobs, expected.prompt_logprobs)):
            assert len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b)) < TOLERANCE


def started_together(*starts: Callable[[], Service]) -> list[Service]:
    """Processes that load models, started at once (their loading overlaps)."""
    with ThreadPoolExecutor(len(starts)) as pool:
        return list(pool.map(lambda start: start(), starts))


@dataclass
class Endpoint:
    """A shard group's gRPC address (a `sluice serve` keeps its shard's ready line)."""

    address: str


@pytest.fixture(scope="module")
def smollm2():
    """The embedded SmolLM2 as one rank (`sluice shard`), and as three behind a router
    (`sluice serve --num-shard 3`; its shard's gRPC and metrics ports are the ones the shard
    bound, from serve's ready line: ports picked here could be taken first by another test
    process)."""
    one, serve = started_together(
        lambda: start_shard(None),
        lambda: Service(sluice("serve", "--port", "0", "--num-shard", "3", "--shard-port", "0",
                               "--metrics-port", "0", *TEST_BUDGET)))
    yield one, serve, Endpoint(serve.ready["shard_address"]), serve.ready["metrics_address"]
    assert serve.stop() == 0
    one.stop()


def test_three_ranks_give_smollm2_the_tokens_and_logprobs_of_one(smollm2):
    """SmolLM2-135M: 9 heads, 3 key/value heads and a 49,152-token vocabulary, split 3 ways."""
    one, _, three, _ = smollm2
    assert shard_info(three).num_shards == 3
    assert shard_info(one).num_shards == 1
    assert_same_generation(generate(three, PROMPTS), generate(one, PROMPTS))


def test_each_rank_reports_its_own_memory(smollm2):
    text = httpx.get(f"http://{smollm2[3]}/metrics").text
    resident = {line.split('"')[1]: float(line.split()[-1]) for line in text.splitlines()
                if line.startswith("sluice_shard_rank_resident_memory_bytes{")}
    assert sorted(resident) == ["0", "1", "2"] and all(v > 50e6 for v in resident.values())


@pytest.mark.parametrize("ranks, shape", [
    (2, dict(vocab_size=321)),  # the vocabulary padded to 322 across two ranks
    (4, dict(num_attention_heads=4, num_key_value_heads=2)),  # two ranks share each KV head
], ids=["padded-vocabulary", "shared-kv-heads"])
def test_tiny_models_split_where_their_shapes_do_not_divide_evenly(tmp_path, ranks, shape):
    folder = str(write_tiny_model(tmp_path / "llama", **shape))
    one, several = started_together(lambda: start_shard(folder),
                                    lambda: start_shard(folder, "--num-shard", str(ranks)))
    try:
        assert shard_info(several).num_shards == ranks
        assert_same_generation(generate(several, PROMPTS[1:], max_new=12, top_n=5),
                               generate(one, PROMPTS[1:], max_new=12, top_n=5))
    finally:
        several.stop()
        one.stop()


def test_heads_that_do_not_divide_fail_at_start_with_the_numbers(tmp_path):
    folder = write_tiny_model(tmp_path / "llama")  # 4 heads, 2 key/value heads
    done = subprocess.run(sluice("shard", "--model", str(folder), "--port", "0",
                                 "--num-shard", "3"), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and not done.stdout
    assert ("cannot be split over 3 tensor-parallel ranks: 4 attention heads do not divide by "
            "3; 2 key/value heads neither divide by 3 nor divide 3") in done.stderr


class Watch:
    """grpc.health.v1 Watch on the shard, from a thread: every status it reports."""

    def __init__(self, shard: Service):
        self.statuses: list[int] = []
        self.channel = grpc.insecure_channel(shard.address)
        stub = health_pb2_grpc.HealthStub(self.channel)
        self._stream = stub.Watch(health_pb2.HealthCheckRequest(service=""))
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        try:
            for answer in self._stream:
                self.statuses.append(answer.status)
        except grpc.RpcError:
            pass


def long_stream(shard: Service):
    """A Generate stream running one long request, and an iterator over its responses."""
    request = pb.Request(id=1, input_ids=[5, 6, 7], sampling=pb.SamplingParameters(),
                         stopping=pb.StoppingParameters(max_new_tokens=2000, ignore_eos=True))
    channel = grpc.insecure_channel(shard.address)

    def outgoing():
        yield pb.GenerateRequest(batch=pb.Batch(requests=[request]))
        time.sleep(600)

    return channel, pb_grpc.TextGenerationStub(channel).Generate(outgoing(), timeout=120)


def worker_pids(shard: Service) -> list[int]:
    return [p.pid for p in psutil.Process(shard.process.pid).children()
            if "shard.worker" in " ".join(p.cmdline())]


@pytest.mark.parametrize("fault", ["killed", "hung"])
def test_a_lost_rank_fails_the_group_with_an_error_and_a_nonzero_exit(tmp_path, fault):
    """SIGKILL on a worker: seen at once. SIGSTOP (a rank that hangs): the step never ends,
    and --rank-timeout (2 s here) ends the group. Either way health says NOT_SERVING, the
    running stream ends with UNAVAILABLE naming the cause, and the process exits non-zero
    without hanging; no rank is left behind."""
    folder = str(write_tiny_model(tmp_path / "llama", max_position_embeddings=4096))
    shard = start_shard(folder, "--num-shard", "2", "--rank-timeout", "2",
                        "--max-total-tokens", "4096")
    workers = worker_pids(shard)
    assert len(workers) == 1
    watch = Watch(shard)
    channel, responses = long_stream(shard)
    tokens = 0
    try:
        with pytest.raises(grpc.RpcError) as failure:
            for response in responses:
                tokens += len(response.tokens.ids)
                if tokens == 20:  # mid-stream
                    os.kill(workers[0], signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
        started = time.monotonic()
        assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
        cause = ("rank 1 (pid %d) was killed by signal 9" % workers[0] if fault == "killed"
                 else "has not finished in 2 s (--rank-timeout): a rank hangs")
        assert cause in failure.value.details()
        assert shard.process.wait(timeout=15) != 0
        assert time.monotonic() - started < 10
        assert health_pb2.HealthCheckResponse.NOT_SERVING in watch.statuses
        assert watch.statuses[0] == health_pb2.HealthCheckResponse.SERVING
        assert not psutil.pid_exists(workers[0]) or psutil.Process(
            workers[0]).status() == psutil.STATUS_ZOMBIE
        assert 20 <= tokens < 2000
    finally:
        channel.close()
        watch.channel.close()
        shard.stop(signal.SIGKILL)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_the_whole_process_group_stops_the_group_cleanly(tmp_path, sig):
    """An init that signals the container's process group (SIGTERM), or a terminal's Ctrl-C
    (SIGINT), reaches every rank at once: rank 0 drains and stops its workers; they do not
    die on their own, which rank 0 would take for a lost rank (exit 1)."""
    folder = str(write_tiny_model(tmp_path / "llama"))
    shard = Service(sluice("shard", "--model", folder, "--port", "0", "--num-threads", "1",
                           "--num-shard", "2", *TEST_BUDGET), new_session=True)
    assert len(worker_pids(shard)) == 1
    os.killpg(shard.process.pid, sig)
    assert shard.process.wait(timeout=60) == 0, "".join(shard.output[-30:])
    assert not any("shard group failed" in line for line in shard.output)


def test_serve_with_three_ranks_answers_with_the_tgi_and_openai_clients(smollm2):
    """`sluice serve --num-shard 3`: the router in front of a three-rank group of the embedded
    SmolLM2, streaming and not, through both clients."""
    from openai import OpenAI
    from text_generation import Client

    serve = smollm2[1]
    assert httpx.get(f"{serve.url}/info").json()["num_shard"] == 3
    client = OpenAI(base_url=f"{serve.url}/v1", api_key="unused")
    question = [{"role": "user", "content": "What is the capital of France?"}]
    answer = client.chat.completions.create(model="any", messages=question, max_tokens=20,
                                            temperature=0)
    assert "Paris" in answer.choices[0].message.content
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in
                       client.chat.completions.create(model="any", messages=question,
                                                      max_tokens=20, temperature=0,
                                                      stream=True) if chunk.choices)
    assert streamed == answer.choices[0].message.content
    tgi = Client(serve.url, timeout=120)
    text = tgi.generate("The capital of France is", max_new_tokens=8).generated_text
    assert "Paris" in text
    assert "".join(r.token.text for r in tgi.generate_stream(
        "The capital of France is", max_new_tokens=8)) == text
