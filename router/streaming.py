"""Running requests: their events from the shard group, turned into text as they arrive.

Shared by every route, streamed or not. Whatever way a request ends (finished, stop string,
client gone, error), its runs are closed: cancelled on their shard group if still running. A
request with several choices (best_of, n, a list of prompts) runs one Run per choice.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from json.encoder import encode_basestring
from typing import TypeVar

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive

from router.detokenize import TextStream
from router.errors import ClientDisconnected
from router.request import GenerationRequest, Run, TokenEvent
from router.tokenizer import RouterTokenizer
from sluice.v1 import generate_pb2 as pb

T = TypeVar("T")

_FINISH_NONE = pb.FINISH_REASON_NONE
FINISH_REASONS = {
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_EOS_TOKEN: "eos_token",
    pb.FINISH_REASON_STOP_TOKEN: "stop_sequence",
}


@dataclass(slots=True)
class Finish:
    reason: str  # TGI's names: length, eos_token, stop_sequence; OpenAI's content_filter
    text: str  # the whole generated text
    generated_tokens: int


@dataclass(slots=True)
class Token:
    id: int
    text: str  # the text this token releases (stop strings held back, UTF-8 kept whole)
    logprob: float
    special: bool
    top: Sequence[tuple[int, float]]  # (token id, logprob) alternatives, when asked for
    finish: Finish | None = None  # set on the last token


# The id of the last token of a response stopped by the content filter: the token that
# completed the match is withheld, like its text.
WITHHELD_TOKEN_ID = -1
_NO_TOP = ()  # a token's alternatives when none were asked for (shared: never mutated)


class RunTokens:
    """One run's tokens as the client may see them (after stop strings and the output filter),
    a batch per hand-over: a shard step's tokens, one or several when the router fell behind.
    Once the last token is out, the run is finished and closed.

    With an output filter, tokens wait (text, id and logprobs alike) until the filter has
    cleared their text; when it blocks, the tokens of the matched text are never released.
    """

    __slots__ = ("_run", "_text", "_special_ids", "_guard", "_held", "_sent", "count", "done")

    def __init__(self, tokenizer: RouterTokenizer, run_: Run, stop: list[str]):
        self._run = run_
        self._text = TextStream(tokenizer, stop)
        self._special_ids = tokenizer.special_ids
        self._guard = run_.output_guard
        self._held: list[tuple[Token, int]] = []  # (token, end of its text in guard.text)
        self._sent = 0  # characters of guard.text released
        self.count = 0  # tokens taken
        self.done = False

    def take(self, events: list[TokenEvent]) -> list[Token]:
        """The tokens these events release (maybe none, while the output filter holds them);
        the last one carries the Finish."""
        batch = []
        text = self._text
        for event in events:
            self.count += 1
            token_id = event.token_id
            piece = text.push(token_id)
            if text.stopped_by is not None:
                reason = "stop_sequence"
            elif event.finish_reason == _FINISH_NONE:
                reason = None
            else:
                reason = FINISH_REASONS.get(event.finish_reason)
                piece += text.flush()
            top = list(zip(event.top_ids, event.top_logprobs)) if event.top_ids else _NO_TOP
            token = Token(token_id, piece, event.logprob, token_id in self._special_ids, top)
            if self._guard is not None:
                batch += self._guarded(token, reason)
            else:
                if reason is not None:
                    token.finish = Finish(reason, text.text, self.count)
                batch.append(token)
            if batch and batch[-1].finish is not None:
                self.done = True
                self._run.finish(batch[-1].finish.reason)
                self._run.close()
                return batch
        return batch

    def _guarded(self, token: Token, reason: str | None) -> list[Token]:
        guard = self._guard
        guard.feed(token.text, final=reason is not None)
        self._held.append((token, len(guard.text)))
        if guard.blocked_at is not None:
            out = self._cleared(guard.blocked_at)
            last = Token(WITHHELD_TOKEN_ID, guard.text[self._sent:guard.blocked_at], 0.0, False,
                         _NO_TOP, Finish("content_filter", guard.text[:guard.blocked_at],
                                         self.count))
            return out + [last]
        out = self._cleared(guard.cleared)
        if reason is not None:  # the final check cleared everything
            out[-1].finish = Finish(reason, guard.text, self.count)
        return out

    def _cleared(self, upto: int) -> list[Token]:
        """The held tokens whose text lies wholly within guard.text[:upto], in order."""
        out = []
        while self._held and self._held[0][1] <= upto:
            token, self._sent = self._held.pop(0)
            out.append(token)
        return out

    async def next_batch(self) -> list[Token]:
        """The next batch, awaited; raises the run's RouterError (the caller closes the run)."""
        return self.take(await self._run.next_events())


async def collect(tokenizer: RouterTokenizer, run_: Run,
                  stop: list[str]) -> tuple[list[Token], Finish]:
    """A run's tokens to its end; closes it however this ends."""
    reader = RunTokens(tokenizer, run_, stop)
    tokens = []
    try:
        while not reader.done:
            tokens += await reader.next_batch()
    finally:
        run_.close()
    return tokens, tokens[-1].finish


async def collect_all(tokenizer: RouterTokenizer, runs: list[Run],
                      stops: list[list[str]]) -> list[tuple[list[Token], Finish]]:
    """Every choice to its end; the first failure fails them all."""
    tasks = [asyncio.ensure_future(collect(tokenizer, r, s)) for r, s in zip(runs, stops)]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()


async def disconnected(receive: Receive) -> None:
    """Returns once the client has gone (the ASGI receive channel says http.disconnect)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, generation: GenerationRequest,
                              work: Awaitable[T]) -> T:
    """Await `work`; if the client goes away first, cancel it (and the runs on their groups)
    and raise ClientDisconnected."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(disconnected(request.receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            task.cancel()
            raise ClientDisconnected("the client disconnected before the answer")
        return task.result()
    finally:
        watcher.cancel()
        generation.close()


def logprob(value: float) -> float:
    """JSON has no infinity: a token with no chance at all gets OpenAI's -9999.0."""
    return value if math.isfinite(value) else -9999.0


def json_response(answer: BaseModel | list[BaseModel], status: int = 200) -> Response:
    """An answer model as JSON; fields left unset are absent, not null."""
    if isinstance(answer, list):
        body = "[" + ",".join(a.model_dump_json(exclude_unset=True) for a in answer) + "]"
    else:
        body = answer.model_dump_json(exclude_unset=True)
    return Response(body, status, media_type="application/json")


def sse(payload: BaseModel | dict) -> str:
    if isinstance(payload, BaseModel):
        return f"data: {payload.model_dump_json(exclude_unset=True)}\n\n"
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class TextEvents:
    """SSE events that differ only in a choice's index and one text field: the common chunk of
    a stream (no logprobs, no finish reason yet), written into a template of the JSON that
    `sse` gives for the same model instead of building and dumping the model per token (0.6
    against 7.9 µs per chunk on the development machine). `build(index, text)` is that model;
    a template is made once per index. Equal to `sse(build(index, text))` character for
    character (router/tests/test_streaming.py), since Python's json escapes a string as
    pydantic's serializer does."""

    MARK = "\ue000sluice\ue000"  # private-use characters: no serializer escapes them

    def __init__(self, build: Callable[[int, str], BaseModel]):
        self._build = build
        self._templates: dict[int, tuple[str, str]] = {}

    def __call__(self, index: int, text: str) -> str:
        template = self._templates.get(index)
        if template is None:
            prefix, suffix = sse(self._build(index, self.MARK)).split(
                encode_basestring(self.MARK))
            template = self._templates[index] = (prefix, suffix)
        # json's own string escaper, without json.dumps's encoder object per call (2.4 µs)
        return template[0] + encode_basestring(text) + template[1]
