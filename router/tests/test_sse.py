"""Streamed responses (router/sse.py) against a scripted server: a step's tokens in one write
with no task per step, the start and end through the middleware, a slow client's writes kept in
order, several choices, a run's error, a client that leaves, and a broken event source."""

from __future__ import annotations

import asyncio

import pytest

from router.errors import RouterError, ShardUnavailable
from router.request import GenerationRequest
from router.sse import RAW_SEND, SSEResponse
from router.streaming import Token
from router.tokenizer import RouterTokenizer
from shard.tokenizer import byte_tokenizer
from sluice.v1 import generate_pb2 as pb

NONE, LENGTH = pb.FINISH_REASON_NONE, pb.FINISH_REASON_LENGTH


@pytest.fixture(scope="module")
def tokenizer() -> RouterTokenizer:
    return RouterTokenizer(pb.Tokenizer(tokenizer_json=byte_tokenizer().to_str()))


class Telemetry:
    def token(self) -> None:
        pass


class Events:
    """An event source whose events spell what the response asked for."""

    def opening(self) -> str:
        return "open;"

    def tokens(self, index: int, batch: list[Token]) -> str:
        return f"{index}:{''.join(t.text for t in batch)}" + ("." if batch[-1].finish else ";")

    def closing(self) -> str:
        return "close;"

    def failed(self, error: RouterError) -> str:
        return f"failed:{error.message};"


class Server:
    """The server's side of one response: what went through the middleware (`send`), what went
    straight to the server (`raw`), and the client (`disconnect()`)."""

    def __init__(self):
        self.messages: list[tuple[str, dict]] = []
        self._client_left = asyncio.Event()
        self.raw_gate: asyncio.Future | None = None  # set: raw sends wait on it (a slow client)
        self.scope = {"type": "http", RAW_SEND: self.raw}

    async def send(self, message: dict) -> None:
        self.messages.append(("send", message))

    async def raw(self, message: dict) -> None:
        if self.raw_gate is not None:
            await self.raw_gate
        self.messages.append(("raw", message))

    async def receive(self) -> dict:
        await self._client_left.wait()
        return {"type": "http.disconnect"}

    def disconnect(self) -> None:
        self._client_left.set()

    @property
    def bodies(self) -> list[tuple[str, bytes, bool]]:
        return [(via, m["body"], m["more_body"]) for via, m in self.messages
                if m["type"] == "http.response.body"]


def generation(choices: int = 1) -> tuple[GenerationRequest, list[GenerationRequest]]:
    settled = []
    requests = [pb.Request(input_ids=[1], stopping=pb.StoppingParameters(max_new_tokens=8))
                for _ in range(choices)]
    return GenerationRequest(requests, Telemetry(), None, settled.append), settled


def feed(tokenizer: RouterTokenizer, run, text: str, last: bool = False) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    for i, token_id in enumerate(ids):
        run.on_token(token_id, -0.5, LENGTH if last and i == len(ids) - 1 else NONE, [], [])


async def turns(count: int = 3) -> None:
    for _ in range(count):
        await asyncio.sleep(0)


def start(tokenizer, gen: GenerationRequest, server: Server) -> asyncio.Task:
    response = SSEResponse(gen, tokenizer, [[] for _ in gen.runs], Events())
    return asyncio.ensure_future(response(server.scope, server.receive, server.send))


def test_a_step_s_tokens_go_out_in_one_write_with_no_task_per_step(tokenizer):
    async def main():
        server = Server()
        gen, settled = generation()
        [run] = gen.runs
        task = start(tokenizer, gen, server)
        await turns()
        assert server.messages[0] == ("send", {
            "type": "http.response.start", "status": 200, "headers": [
                (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no"),
                (b"content-type", b"text/event-stream; charset=utf-8")]})
        tasks = len(asyncio.all_tasks())
        feed(tokenizer, run, "ab")  # one shard step's message: two tokens of the run
        await asyncio.sleep(0)  # one turn of the loop: the hand-over and the write
        assert server.bodies == [("raw", b"open;", True), ("raw", b"0:ab;", True)]
        assert len(asyncio.all_tasks()) == tasks  # nothing woke up or started for the step
        feed(tokenizer, run, "c")
        feed(tokenizer, run, "d", last=True)
        await asyncio.wait_for(task, 5)
        # The last tokens and the closing events: one write, through the middleware.
        assert server.bodies[2:] == [("send", b"0:cd.close;", False)]
        assert run.closed and run.outcome == "length" and settled == [gen]

    asyncio.run(main())


def test_a_slow_client_gets_every_write_in_order_and_the_end_after_them(tokenizer):
    async def main():
        server = Server()
        gen, _ = generation()
        [run] = gen.runs
        server.raw_gate = asyncio.get_running_loop().create_future()  # the socket is full
        task = start(tokenizer, gen, server)
        await turns()
        for text in "abc":
            feed(tokenizer, run, text)
            await turns()
        feed(tokenizer, run, "d", last=True)
        await turns()
        assert server.bodies == []  # the first write waits; the others queue behind it
        server.raw_gate.set_result(None)
        await asyncio.wait_for(task, 5)
        assert server.bodies == [("raw", b"open;", True), ("raw", b"0:a;0:b;0:c;", True),
                                 ("send", b"0:d.close;", False)]

    asyncio.run(main())


def test_several_choices_stream_as_they_come_and_close_after_the_last(tokenizer):
    async def main():
        server = Server()
        gen, settled = generation(choices=2)
        first, second = gen.runs
        task = start(tokenizer, gen, server)
        await turns()
        feed(tokenizer, second, "x")
        await turns()
        feed(tokenizer, first, "a")
        feed(tokenizer, second, "y", last=True)
        await turns()
        assert second.closed and not first.closed
        feed(tokenizer, first, "b", last=True)
        await asyncio.wait_for(task, 5)
        assert [body for _, body, _ in server.bodies] == [
            b"open;", b"1:x;", b"0:a;", b"1:y.", b"0:b.close;"]
        assert settled == [gen]

    asyncio.run(main())


def test_a_run_s_error_ends_the_stream_after_its_tokens_and_stops_the_other_choices(tokenizer):
    async def main():
        server = Server()
        gen, settled = generation(choices=2)
        first, second = gen.runs
        task = start(tokenizer, gen, server)
        await turns()
        feed(tokenizer, first, "a")
        first.on_error(ShardUnavailable("no group took it in time"))
        await asyncio.wait_for(task, 5)
        assert server.bodies[1:] == [("raw", b"0:a;", True),
                                     ("send", b"failed:no group took it in time;", False)]
        assert first.outcome == "unavailable" and second.outcome == "cancelled"
        assert second.closed and settled == [gen]

    asyncio.run(main())


def test_tokens_that_came_before_the_response_started_are_sent_first(tokenizer):
    async def main():
        server = Server()
        gen, _ = generation()
        [run] = gen.runs
        feed(tokenizer, run, "ab")  # the group answered before the handler returned
        task = start(tokenizer, gen, server)
        await turns()
        assert server.bodies == [("raw", b"open;", True), ("raw", b"0:ab;", True)]
        feed(tokenizer, run, "c", last=True)
        await asyncio.wait_for(task, 5)

    asyncio.run(main())


def test_a_client_that_leaves_ends_the_response_and_its_runs_at_once(tokenizer):
    async def main():
        server = Server()
        gen, settled = generation()
        [run] = gen.runs
        task = start(tokenizer, gen, server)
        await turns()
        feed(tokenizer, run, "a")
        await turns()
        server.disconnect()
        await asyncio.wait_for(task, 5)
        assert run.closed and run.outcome == "cancelled" and settled == [gen]
        feed(tokenizer, run, "b")  # a token already on its way: dropped
        await turns()
        assert server.bodies == [("raw", b"open;", True), ("raw", b"0:a;", True)]

    asyncio.run(main())


def test_a_broken_event_source_fails_the_response_and_closes_the_runs(tokenizer):
    class Broken(Events):
        def tokens(self, index: int, batch: list[Token]) -> str:
            raise KeyError("a bug")

    async def main():
        server = Server()
        gen, settled = generation()
        [run] = gen.runs
        response = SSEResponse(gen, tokenizer, [[]], Broken())
        task = asyncio.ensure_future(response(server.scope, server.receive, server.send))
        await turns()
        feed(tokenizer, run, "a")
        with pytest.raises(KeyError, match="a bug"):
            await asyncio.wait_for(task, 5)
        assert run.closed and settled == [gen]

    asyncio.run(main())
