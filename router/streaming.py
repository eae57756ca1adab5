"""Running one request: its events from the shard group, turned into text as they arrive.

Shared by every route, streamed or not. Whatever way a request ends (finished, stop string,
client gone, error), its Generation is closed: cancelled on the shard if still running.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import TypeVar

from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import StreamingResponse

from router.detokenize import TextStream
from router.shard_client import Generation
from router.tokenizer import RouterTokenizer
from sluice.v1 import generate_pb2 as pb

T = TypeVar("T")

FINISH_REASONS = {
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_EOS_TOKEN: "eos_token",
    pb.FINISH_REASON_STOP_TOKEN: "stop_sequence",
}


@dataclass(slots=True)
class Finish:
    reason: str  # TGI's names: length, eos_token, stop_sequence
    text: str  # the whole generated text
    generated_tokens: int


@dataclass(slots=True)
class Token:
    id: int
    text: str  # the text this token releases (stop strings held back, UTF-8 kept whole)
    logprob: float
    special: bool
    top: list[tuple[int, float]]  # (token id, logprob) alternatives, when asked for
    finish: Finish | None = None  # set on the last token


async def run(tokenizer: RouterTokenizer, gen: Generation,
              stop: list[str]) -> AsyncIterator[Token]:
    """Tokens as they come; the last carries the Finish. Raises RouterError on failure."""
    text = TextStream(tokenizer, stop)
    count = 0
    try:
        while True:
            event = await gen.next_event()
            count += 1
            piece = text.push(event.token_id)
            reason = "stop_sequence" if text.stopped_by else FINISH_REASONS.get(event.finish_reason)
            if reason is not None and text.stopped_by is None:
                piece += text.flush()
            finish = None if reason is None else Finish(reason, text.text, count)
            yield Token(event.token_id, piece, event.logprob, tokenizer.is_special(event.token_id),
                        list(zip(event.top_ids, event.top_logprobs)), finish)
            if finish is not None:
                return
    finally:
        gen.close()


async def collect(tokenizer: RouterTokenizer, gen: Generation,
                  stop: list[str]) -> tuple[list[Token], Finish]:
    tokens = [token async for token in run(tokenizer, gen, stop)]
    return tokens, tokens[-1].finish


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, gen: Generation, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (and the request on its shard) if the client goes away."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            task.cancel()
            raise asyncio.CancelledError("client disconnected")
        return task.result()
    finally:
        watcher.cancel()
        gen.close()


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def sse_response(events: AsyncIterator[str], gen: Generation) -> StreamingResponse:
    # The background close also covers a client that leaves before the first event.
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                             background=BackgroundTask(gen.close))
