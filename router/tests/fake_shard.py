"""A scripted shard group for the router's unit tests: a real grpc.aio server on loopback that
speaks the TextGeneration contract, whose answers the test writes message by message. With it a
test can produce what a real shard only does by chance (a race, a malformed batch, a stream
that breaks between two given messages); the integration tests run the real shard."""

from __future__ import annotations

import asyncio

import grpc

from sluice.v1 import generate_pb2 as pb
from sluice.v1 import generate_pb2_grpc as pb_grpc

BLOCK = 16


class FakeShard(pb_grpc.TextGenerationServicer):
    def __init__(self, budget_tokens: int = 1024, model_id: str = "tiny",
                 tokenizer_json: str = "{}"):
        self.budget_tokens = budget_tokens
        self.model_id = model_id
        self.tokenizer_json = tokenizer_json
        self.received: asyncio.Queue[pb.GenerateRequest] = asyncio.Queue()
        self.streams = 0  # Generate streams opened so far
        self._outbox: asyncio.Queue[pb.GenerateResponse | Exception | None] | None = None
        self._server: grpc.aio.Server | None = None
        self.address = ""

    async def start(self) -> FakeShard:
        self._server = grpc.aio.server()
        pb_grpc.add_TextGenerationServicer_to_server(self, self._server)
        port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        self.address = f"127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        await self._server.stop(0)

    async def Info(self, request, context) -> pb.InfoResponse:
        return pb.InfoResponse(
            model_id=self.model_id, block_size=BLOCK, max_batch_total_tokens=self.budget_tokens,
            max_input_tokens=512, max_total_tokens=1024, free_budget_tokens=self.budget_tokens,
            tokenizer=pb.Tokenizer(tokenizer_json=self.tokenizer_json))

    async def Generate(self, request_iterator, context):
        self.streams += 1
        outbox = self._outbox = asyncio.Queue()

        async def read() -> None:
            async for message in request_iterator:
                self.received.put_nowait(message)
            outbox.put_nowait(None)  # the router closed its side

        reader = asyncio.create_task(read())
        try:
            outbox.put_nowait(pb.GenerateResponse(free_budget_tokens=self.budget_tokens))
            while (response := await outbox.get()) is not None:
                if isinstance(response, Exception):
                    await context.abort(grpc.StatusCode.UNAVAILABLE, str(response))
                yield response
        finally:
            reader.cancel()

    def send(self, response: pb.GenerateResponse) -> None:
        """Answer on the current stream."""
        self._outbox.put_nowait(response)

    def break_stream(self, reason: str = "the shard went away") -> None:
        self._outbox.put_nowait(RuntimeError(reason))

    async def next_batch(self, timeout_s: float = 5) -> list[pb.Request]:
        """The next batch the router submitted (cancels in between are skipped)."""
        while True:
            message = await asyncio.wait_for(self.received.get(), timeout_s)
            if message.HasField("batch"):
                return list(message.batch.requests)

    async def next_cancel(self, timeout_s: float = 5) -> list[int]:
        while True:
            message = await asyncio.wait_for(self.received.get(), timeout_s)
            if message.HasField("cancel"):
                return list(message.cancel.ids)


def tokens(*entries: tuple[int, int, int]) -> pb.GenerateResponse:
    """A response carrying (request id, token id, finish reason) entries."""
    return pb.GenerateResponse(tokens=pb.TokenBatch(
        ids=[e[0] for e in entries], token_ids=[e[1] for e in entries],
        logprobs=[-0.5] * len(entries), finish_reasons=[e[2] for e in entries]))
