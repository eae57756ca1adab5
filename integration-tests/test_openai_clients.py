"""The OpenAI API through the `openai` client, against `sluice serve` with the embedded
SmolLM2-135M-Instruct."""

from __future__ import annotations

import openai
import pytest

QUESTION = [{"role": "system", "content": "You answer in one short sentence."},
            {"role": "user", "content": [{"type": "text", "text": "What is the capital of "},
                                         {"type": "text", "text": "France?"}]}]
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def client(smollm2_serve) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{smollm2_serve.url}/v1", api_key="unused", timeout=120,
                         max_retries=0)


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def plain_chat(client, model):
    return client.chat.completions.create(model=model, messages=QUESTION, max_tokens=20,
                                          temperature=0)


def test_models_lists_the_embedded_model(client, model):
    assert model == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_chat_completion_answers_with_usage(plain_chat):
    choice = plain_chat.choices[0]
    assert "Paris" in choice.message.content
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    usage = plain_chat.usage
    assert 1 <= usage.completion_tokens <= 20
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_max_completion_tokens_bounds_the_answer(client, model):
    answer = client.chat.completions.create(model=model, messages=QUESTION, temperature=0,
                                            max_completion_tokens=3)
    assert answer.usage.completion_tokens == 3
    assert answer.choices[0].finish_reason == "length"


def test_streamed_chat_completion_with_usage_matches_the_plain_one(client, model, plain_chat):
    stream = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=20,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain_chat.choices[0].message.content
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finishing] == [plain_chat.choices[0].finish_reason]
    assert chunks[-1].choices == []
    assert chunks[-1].usage == plain_chat.usage
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_logprobs_give_each_token_and_its_likeliest_alternatives(client, model, plain_chat):
    answer = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=20,
                                            temperature=0, logprobs=True, top_logprobs=3)
    assert answer.choices[0].message.content == plain_chat.choices[0].message.content
    content = answer.choices[0].logprobs.content
    assert len(content) == answer.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3
        logprobs = [t.logprob for t in entry.top_logprobs]
        assert logprobs == sorted(logprobs, reverse=True)
        assert entry.token == entry.top_logprobs[0].token  # greedy picks the likeliest
        assert entry.logprob == entry.top_logprobs[0].logprob <= 0


def test_seeded_chat_choices_reproduce_and_differ_from_each_other(client, model):
    def sample():
        return client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Tell me a story."}],
            max_tokens=24, temperature=1.0, seed=7, n=2, logprobs=True)

    first, again = sample(), sample()
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1]
    assert texts == [c.message.content for c in again.choices]
    assert texts[0] != texts[1]
    assert first.usage.completion_tokens == sum(len(c.logprobs.content) for c in first.choices)


def test_stop_strings_are_never_in_the_answer(client, model, plain_chat):
    content = plain_chat.choices[0].message.content
    stop = content[content.index("Paris") + 1:content.index("Paris") + 4]  # inside a token
    answer = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=20,
                                            temperature=0, stop=[stop])
    assert answer.choices[0].message.content == content[:content.index(stop)]
    assert answer.choices[0].finish_reason == "stop"


def test_streamed_multibyte_characters_arrive_whole(client, model):
    ask = [{"role": "user", "content": "Write 'thank you' in Japanese."}]
    plain = client.chat.completions.create(model=model, messages=ask, max_tokens=24,
                                           temperature=0, logprobs=True)
    chunks = list(client.chat.completions.create(model=model, messages=ask, max_tokens=24,
                                                 temperature=0, stream=True, logprobs=True))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == plain.choices[0].message.content
    assert any(ord(ch) > 0x7FF for ch in "".join(pieces))  # 3-byte characters were written
    # Some token alone is part of a character (it decodes to U+FFFD); no piece ever is.
    tokens = [t.token for c in chunks if c.choices and c.choices[0].logprobs
              for t in c.choices[0].logprobs.content]
    assert any("\ufffd" in t for t in tokens)
    assert not any("\ufffd" in p for p in pieces)
    # Each token's `bytes` are its raw bytes: joined, they spell the answer exactly.
    choice = plain.choices[0]
    eos = b"<|im_end|>" if choice.finish_reason == "stop" else b""
    assert b"".join(bytes(t.bytes) for t in choice.logprobs.content) == (
        choice.message.content.encode() + eos)


def test_completions_continue_a_prompt_and_stream_the_same(client, model):
    plain = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0)
    choice = plain.choices[0]
    assert "Paris" in choice.text and choice.finish_reason == "length"
    assert plain.usage.completion_tokens == 8
    streamed = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=8,
                                              temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == choice.text
    assert streamed[-1].choices[0].finish_reason == "length"


def test_completions_with_a_list_of_prompts_answer_each_in_order(client, model):
    prompts = [PROMPT, "The capital of Italy is"]
    answer = client.completions.create(model=model, prompt=prompts, max_tokens=6, temperature=0)
    assert [c.index for c in answer.choices] == [0, 1]
    alone = [client.completions.create(model=model, prompt=p, max_tokens=6,
                                       temperature=0).choices[0].text for p in prompts]
    assert [c.text for c in answer.choices] == alone
    assert "Rome" in alone[1]
    assert answer.usage.completion_tokens == 12
    streamed = list(client.completions.create(model=model, prompt=prompts, max_tokens=6,
                                              temperature=0, stream=True))
    for index, text in enumerate(alone):
        assert "".join(c.choices[0].text for c in streamed
                       if c.choices and c.choices[0].index == index) == text


def test_completions_echo_with_logprobs_scores_the_prompt_and_offsets_index_the_text(client,
                                                                                    model):
    answer = client.completions.create(model=model, prompt=PROMPT, max_tokens=4, temperature=0,
                                       echo=True, logprobs=2)
    choice = answer.choices[0]
    assert choice.text.startswith(PROMPT)
    lp = choice.logprobs
    prompt_len = answer.usage.prompt_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == prompt_len + 4
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x < 0 for x in lp.token_logprobs[1:])
    assert all(len(top) == 2 for top in lp.top_logprobs[1:])
    for token, start, end in zip(lp.tokens, lp.text_offset, lp.text_offset[1:] + [None]):
        assert choice.text[start:end] == token  # every offset is where its token's text starts


def test_bad_requests_raise_the_clients_own_errors_and_the_server_keeps_serving(client, model):
    with pytest.raises(openai.UnprocessableEntityError) as error:
        client.chat.completions.create(model=model, messages=QUESTION, n=5)
    assert "n" == error.value.body["param"]
    with pytest.raises(openai.UnprocessableEntityError, match="temperature"):
        client.completions.create(model=model, prompt=PROMPT, temperature=5)
    assert client.completions.create(model=model, prompt=PROMPT, max_tokens=1).usage
