"""The streamed events' fast paths: template chunks and TGI's token events equal to the models'
own JSON, and a merge of one stream that still closes it when the consumer stops."""

from __future__ import annotations

import asyncio

import pytest

from router import openai_responses as out
from router import streaming, tgi
from router import tgi_responses as tgi_out

HEAD = {"id": "cmpl-0123456789abcdef", "created": 1700000000, "model": "org/tiny \"model\""}
TEXTS = ["", " hello", "quote \" and back\\slash", "line\nbreak\ttab\rreturn", "\x00\x01\x1f\x7f",
         "\b\f", "emoji 😀 and CJK 漢字", "\u2028\u2029", "é" * 40, "</script>", "\ue000"]


def completion(index: int, text: str) -> out.Completion:
    return out.Completion(**HEAD, object="text_completion", choices=[out.CompletionChoice(
        index=index, text=text, logprobs=None, finish_reason=None)])


def chat_chunk(index: int, text: str) -> out.ChatCompletionChunk:
    return out.ChatCompletionChunk(**HEAD, object="chat.completion.chunk", choices=[
        out.ChunkChoice(index=index, delta=out.Delta(content=text), logprobs=None,
                        finish_reason=None)])


@pytest.mark.parametrize("build", [completion, chat_chunk], ids=["completions", "chat"])
def test_text_events_are_the_models_own_json_character_for_character(build):
    texts = streaming.TextEvents(build)
    for index in (0, 3, 0):
        for text in TEXTS:
            assert texts(index, text) == streaming.sse(build(index, text)), repr(text)


@pytest.mark.parametrize("logprob", [-0.25, 0.0, -1e-05, -123.456789, 1 / 3, float("-inf")])
def test_tgi_token_events_are_the_models_own_json_character_for_character(logprob):
    for index, special in ((1, False), (7, True), (4096, False)):
        for text in TEXTS:
            token = streaming.Token(id=31 + index, text=text, logprob=logprob, special=special,
                                    top=[])
            model = tgi_out.StreamResponse(
                index=index, token=tgi_out.Token(id=token.id, text=text, logprob=logprob,
                                                 special=special),
                top_tokens=[], generated_text=None, details=None)
            assert tgi.token_event(index, token) == streaming.sse(model), (repr(text), logprob)


def test_merge_of_one_stream_closes_it_when_the_consumer_stops():
    closed = []

    async def source():
        try:
            for i in range(10):
                yield i
        finally:
            closed.append(True)

    async def main():
        merged = streaming.merge([source()])
        got = [await merged.__anext__() for _ in range(3)]
        assert closed == []
        await merged.aclose()
        return got

    assert asyncio.run(main()) == [(0, 0), (0, 1), (0, 2)]
    assert closed == [True]


def test_merge_of_one_stream_raises_its_error_after_its_items():
    async def source():
        yield "a"
        raise ValueError("shard gone")

    async def main():
        return [item async for item in streaming.merge([source()])]

    with pytest.raises(ValueError, match="shard gone"):
        asyncio.run(main())
