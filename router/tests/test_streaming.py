"""The streamed events' fast paths: template chunks and TGI's token events equal to the models'
own JSON; a run's tokens in batches, and the run closed on its last token or its error."""

from __future__ import annotations

import asyncio

import pytest

from router import openai_responses as out
from router import streaming, tgi
from router import tgi_responses as tgi_out
from router.errors import ShardUnavailable
from router.request import GenerationRequest
from router.tokenizer import RouterTokenizer
from shard.tokenizer import byte_tokenizer
from sluice.v1 import generate_pb2 as pb

@pytest.fixture(scope="module")
def tokenizer() -> RouterTokenizer:
    return RouterTokenizer(pb.Tokenizer(tokenizer_json=byte_tokenizer().to_str()))


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


@pytest.mark.parametrize("logprob", [-0.25, 0.0, -0.0, -1e-05, -1e-07, -123.456789, 1 / 3,
                                     -1e+20, float("-inf"), float("nan")])
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


class Telemetry:
    def token(self) -> None:
        pass


def one_run(tokenizer) -> tuple[GenerationRequest, list[GenerationRequest]]:
    settled = []
    request = pb.Request(input_ids=[1], stopping=pb.StoppingParameters(max_new_tokens=8))
    return GenerationRequest([request], Telemetry(), None, settled.append), settled


def test_a_reader_takes_a_step_s_tokens_at_once_and_closes_the_run_on_its_last(tokenizer):
    async def main():
        generation, settled = one_run(tokenizer)
        [run] = generation.runs
        reader = streaming.RunTokens(tokenizer, run, [])
        for token_id in tokenizer.encode("abc", add_special_tokens=False):
            run.on_token(token_id, -0.1, pb.FINISH_REASON_NONE, [], [])
        assert "".join(t.text for t in await reader.next_batch()) == "abc"
        assert not run.closed and not reader.done
        [d] = tokenizer.encode("d", add_special_tokens=False)
        run.on_token(d, -0.1, pb.FINISH_REASON_LENGTH, [], [])
        [last] = await reader.next_batch()
        assert last.finish == streaming.Finish("length", "abcd", 4)
        assert reader.done and run.closed and settled == [generation]
        assert run.outcome == "length"

    asyncio.run(main())


def test_collect_raises_a_run_s_error_after_the_tokens_before_it_and_closes_it(tokenizer):
    async def main():
        generation, settled = one_run(tokenizer)
        [run] = generation.runs
        [a] = tokenizer.encode("a", add_special_tokens=False)
        run.on_token(a, -0.1, pb.FINISH_REASON_NONE, [], [])
        run.on_error(ShardUnavailable("group gone"))
        with pytest.raises(ShardUnavailable, match="group gone"):
            await streaming.collect(tokenizer, run, [])
        assert run.closed and run.outcome == "unavailable" and settled == [generation]

    asyncio.run(main())


def test_a_cancelled_collect_closes_its_run(tokenizer):
    async def main():
        generation, settled = one_run(tokenizer)
        [run] = generation.runs
        task = asyncio.ensure_future(streaming.collect(tokenizer, run, []))
        await asyncio.sleep(0)
        task.cancel()  # the client left before the answer
        with pytest.raises(asyncio.CancelledError):
            await task
        assert run.closed and run.outcome == "cancelled" and settled == [generation]

    asyncio.run(main())
