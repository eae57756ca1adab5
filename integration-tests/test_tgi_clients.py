"""The TGI API through the clients people already use: huggingface_hub's InferenceClient and the
`text-generation` package, against `sluice serve` with the embedded SmolLM2-135M-Instruct."""

from __future__ import annotations

import httpx
import pytest
import text_generation
from huggingface_hub import InferenceClient

PROMPT = "The capital of France is"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def hub(smollm2_serve) -> InferenceClient:
    return InferenceClient(model=smollm2_serve.url, timeout=120)


@pytest.fixture(scope="module")
def tgi(smollm2_serve) -> text_generation.Client:
    return text_generation.Client(smollm2_serve.url, timeout=120)


@pytest.fixture(scope="module")
def greedy(hub):
    """The greedy answer to PROMPT, 12 tokens, with details: the oracle the other paths match."""
    return hub.text_generation(PROMPT, max_new_tokens=12, details=True)


def test_text_generation_plain_names_paris_and_equals_the_detailed_text(hub, greedy):
    text = hub.text_generation(PROMPT, max_new_tokens=12)
    assert "Paris" in text
    assert text == greedy.generated_text


def test_text_generation_details_describe_every_token(hub, greedy):
    details = greedy.details
    assert details.finish_reason == "length"
    assert details.generated_tokens == 12 == len(details.tokens)
    assert details.seed is None  # greedy: no seed was drawn
    assert details.prefill == []  # only with decoder_input_details
    assert "".join(t.text for t in details.tokens) == greedy.generated_text
    assert all(t.logprob <= 0 and t.special is False for t in details.tokens)


def test_text_generation_stream_yields_the_same_text_token_by_token(hub, greedy):
    pieces = list(hub.text_generation(PROMPT, max_new_tokens=12, stream=True))
    assert len(pieces) == 12
    assert "".join(pieces) == greedy.generated_text


def test_text_generation_stream_with_details_ends_with_text_and_details(hub, greedy):
    events = list(hub.text_generation(PROMPT, max_new_tokens=12, stream=True, details=True))
    assert [e.token.id for e in events] == [t.id for t in greedy.details.tokens]
    assert all(e.generated_text is None and e.details is None for e in events[:-1])
    last = events[-1]
    assert last.generated_text == greedy.generated_text
    assert last.details.finish_reason == "length"
    assert last.details.generated_tokens == 12


def test_stop_sequence_across_token_boundaries_ends_before_it_and_never_leaks(hub, greedy):
    tokens = [t.text for t in greedy.details.tokens]
    # A stop string made of the end of one token and the start of the next: it exists only
    # once the text of both is joined.
    k = next(i for i in range(2, len(tokens) - 1) if len(tokens[i]) >= 2 and tokens[i + 1])
    stop = tokens[k][-2:] + tokens[k + 1][:1]
    expected = greedy.generated_text[:greedy.generated_text.index(stop)]
    answer = hub.text_generation(PROMPT, max_new_tokens=12, stop=[stop], details=True)
    assert answer.generated_text == expected
    assert answer.details.finish_reason == "stop_sequence"
    streamed = list(hub.text_generation(PROMPT, max_new_tokens=12, stop=[stop], stream=True))
    assert "".join(streamed) == expected


def test_the_same_seed_gives_the_same_text_and_another_seed_differs(hub):
    def sample(seed: int):
        return hub.text_generation("Once upon a time", max_new_tokens=24, do_sample=True,
                                   temperature=1.0, seed=seed, details=True)

    first, again, other = sample(42), sample(42), sample(43)
    assert first.generated_text == again.generated_text
    assert [t.id for t in first.details.tokens] == [t.id for t in again.details.tokens]
    assert first.details.seed == 42 and other.details.seed == 43
    assert other.generated_text != first.generated_text


def test_sampling_without_a_seed_reports_the_seed_it_drew_and_it_reproduces(hub):
    drawn = hub.text_generation("Once upon a time", max_new_tokens=16, do_sample=True,
                                details=True)
    assert isinstance(drawn.details.seed, int)
    again = hub.text_generation("Once upon a time", max_new_tokens=16, do_sample=True,
                                seed=drawn.details.seed)
    assert again == drawn.generated_text


def test_decoder_input_details_score_every_prompt_token_but_the_first(hub, smollm2_serve):
    answer = hub.text_generation(PROMPT, max_new_tokens=2, details=True,
                                 decoder_input_details=True)
    prompt_tokens = httpx.post(f"{smollm2_serve.url}/tokenize", json={"inputs": PROMPT}).json()
    prefill = answer.details.prefill
    assert [t.id for t in prefill] == [t["id"] for t in prompt_tokens]
    assert "".join(t.text for t in prefill) == PROMPT
    assert prefill[0].logprob is None
    assert all(t.logprob < 0 for t in prefill[1:])


def test_chat_completion_names_paris(hub):
    answer = hub.chat_completion(QUESTION, max_tokens=20, temperature=0)
    choice = answer.choices[0]
    assert "Paris" in choice.message.content
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    usage = answer.usage
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_streamed_chat_completion_matches_the_plain_one(hub):
    plain = hub.chat_completion(QUESTION, max_tokens=20, temperature=0)
    chunks = list(hub.chat_completion(QUESTION, max_tokens=20, temperature=0, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason


def test_text_generation_client_generate_and_stream_agree(tgi, greedy):
    answer = tgi.generate(PROMPT, max_new_tokens=12)
    assert answer.generated_text == greedy.generated_text
    assert [t.id for t in answer.details.tokens] == [t.id for t in greedy.details.tokens]
    assert answer.details.finish_reason == text_generation.types.FinishReason.Length
    streamed = list(tgi.generate_stream(PROMPT, max_new_tokens=12))
    assert "".join(r.token.text for r in streamed) == greedy.generated_text
    assert streamed[-1].generated_text == greedy.generated_text
    assert streamed[-1].details.generated_tokens == 12


def test_text_generation_client_top_n_tokens_and_prefill(tgi):
    answer = tgi.generate(PROMPT, max_new_tokens=4, top_n_tokens=3, decoder_input_details=True)
    details = answer.details
    assert len(details.top_tokens) == 4 and all(len(top) == 3 for top in details.top_tokens)
    for token, top in zip(details.tokens, details.top_tokens):
        assert [t.logprob for t in top] == sorted((t.logprob for t in top), reverse=True)
        assert token.id == top[0].id  # greedy takes the likeliest
    assert details.prefill[0].logprob is None and len(details.prefill) > 1


def test_text_generation_client_best_of_returns_the_likeliest_with_the_others(tgi):
    answer = tgi.generate(PROMPT, max_new_tokens=8, best_of=2, do_sample=True)
    details = answer.details
    assert len(details.best_of_sequences) == 1
    other = details.best_of_sequences[0]
    assert other.seed != details.seed
    assert sum(t.logprob for t in details.tokens) >= sum(t.logprob for t in other.tokens)


def test_text_generation_client_gets_validation_errors_it_understands(tgi):
    with pytest.raises(text_generation.errors.ValidationError, match="watermark"):
        tgi.generate(PROMPT, max_new_tokens=2, watermark=True)
    with pytest.raises(text_generation.errors.ValidationError, match="best_of"):
        tgi.generate(PROMPT, max_new_tokens=2, best_of=3, do_sample=True)
    assert tgi.generate(PROMPT, max_new_tokens=2).details.generated_tokens == 2
