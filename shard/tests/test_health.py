"""grpc.health follows the engine: a shard whose engine thread ends is NOT_SERVING, its streams
end with UNAVAILABLE, and `serve` returns non-zero (the process exits, Kubernetes restarts the
pod). Before, health said SERVING forever while requests waited on a dead thread."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shard import runtime
from shard.config import parse
from shard.server import Failure, Started, serve, start
from shard.tests.tiny_model import write_tiny_model
from sluice.v1 import generate_pb2 as pb
from sluice.v1 import generate_pb2_grpc as pb_grpc


class Crash(BaseException):
    """What no `except Exception` catches: the engine thread ends."""


def test_an_engine_thread_that_ends_makes_the_shard_not_serving(tmp_path, capsys, monkeypatch):
    argv = ["--model", str(write_tiny_model(tmp_path / "llama")), "--device", "cpu",
            "--port", "0", "--max-batch-total-tokens", "1024"]
    warm = start(parse(argv, {}), argv).warm
    exits = []
    failure = Failure(None, hard_exit=lambda code, workers: exits.append(code))
    started = Started(warm, runtime.serving_engine(warm, on_failure=failure), failure)

    def crash(plan):
        raise Crash("a fault no step handles")

    monkeypatch.setattr(warm.executor, "execute", crash)
    monkeypatch.setattr(started.engine, "execute", crash)

    async def scenario() -> tuple[int, list[int], grpc.RpcError]:
        serving = asyncio.create_task(serve(started))
        while not (out := capsys.readouterr().out):
            assert not serving.done(), serving  # it ended before its ready line
            await asyncio.sleep(0.05)
        address = json.loads(out.splitlines()[-1])["address"]
        async with grpc.aio.insecure_channel(address) as channel:
            statuses = []
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service="sluice.v1.TextGeneration"))
            statuses.append((await watch.read()).status)
            request = pb.Request(id=1, input_ids=[5, 6, 7], sampling=pb.SamplingParameters(),
                                 stopping=pb.StoppingParameters(max_new_tokens=4))

            async def outgoing():  # a router keeps its side open
                yield pb.GenerateRequest(batch=pb.Batch(requests=[request]))
                await asyncio.sleep(60)

            stream = pb_grpc.TextGenerationStub(channel).Generate(outgoing())

            async def read_to_the_end():
                async for _ in stream:
                    pass

            with pytest.raises(grpc.aio.AioRpcError) as ended:
                await asyncio.wait_for(read_to_the_end(), 10)
            statuses.append((await watch.read()).status)
            return await asyncio.wait_for(serving, 10), statuses, ended.value

    code, statuses, error = asyncio.run(scenario())
    assert code == 1
    assert statuses == [health_pb2.HealthCheckResponse.SERVING,
                        health_pb2.HealthCheckResponse.NOT_SERVING]
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert error.details() == ("shard group failed: the engine stopped: Crash: a fault no step "
                               "handles")
