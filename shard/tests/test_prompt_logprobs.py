"""Prompt logprobs (TGI's decoder_input_details) against transformers on the same weights.

The engine scores prompt tokens chunk by chunk while it prefills; transformers scores the whole
prompt in one forward. Chunked or not, batched with other requests or alone, they must agree,
and asking for them must not change the generated tokens.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from shard import runner as runner_module
from shard import loader
from shard.attention import TorchAttention
from shard.parallel import TensorParallel
from shard.source import ModelSource
from shard.tests.test_engine import CPU, make_engine, random_prompt, request
from shard.tests.test_engine import scheduling  # noqa: F401 (autouse: sync and async runs)
from sluice.v1 import generate_pb2 as pb

TOLERANCE = 1e-4  # max |Δlogprob|, float32


@pytest.fixture(scope="module")
def model(tiny_llama):
    return loader.load(ModelSource("tiny", tiny_llama), TensorParallel(), CPU, torch.float32,
                       TorchAttention()).model


@pytest.fixture(scope="module")
def oracle(tiny_llama):
    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()


def oracle_logprobs(oracle, prompt: torch.Tensor) -> torch.Tensor:
    """[prompt_len - 1, vocab]: row i is the distribution of prompt token i + 1."""
    with torch.no_grad():
        logits = oracle(prompt[None]).logits[0].float()
    return logits[:-1].log_softmax(-1)


def prefill_messages(stream) -> dict[int, pb.PrefillLogprobs]:
    found = {}
    for response in stream.responses:
        for message in response.prefill_logprobs:
            assert message.id not in found, "prompt logprobs are sent once"
            found[message.id] = message
            # They travel in the response that carries the request's first token.
            assert message.id in response.tokens.ids
    return found


@pytest.mark.parametrize("max_prefill_tokens", [64, 16, 7])
def test_prompt_logprobs_match_transformers_whole_or_chunked(model, oracle, max_prefill_tokens):
    prompt = random_prompt(40, seed=11)
    engine, driver, stream = make_engine(model, max_prefill_tokens=max_prefill_tokens)
    seq = request(stream, 0, prompt, 3)
    seq.prefill_logprobs = True
    driver.submit(stream, [seq])
    driver.run_until_done()
    message = prefill_messages(stream)[0]
    expected = oracle_logprobs(oracle, prompt)
    want = expected.gather(1, prompt[1:, None]).squeeze(1)
    assert len(message.logprobs) == 39
    assert torch.allclose(torch.tensor(list(message.logprobs)), want, atol=TOLERANCE)
    assert not message.top_n_token_ids and not message.top_n_logprobs


def test_prompt_top_n_alternatives_are_the_most_likely_tokens(model, oracle):
    prompt = random_prompt(23, seed=5)
    engine, driver, stream = make_engine(model, max_prefill_tokens=8)
    seq = request(stream, 0, prompt, 2)
    seq.prefill_logprobs, seq.top_n_tokens = True, 3
    driver.submit(stream, [seq])
    driver.run_until_done()
    message = prefill_messages(stream)[0]
    top_logprobs, top_ids = oracle_logprobs(oracle, prompt).topk(3, dim=-1)
    assert list(message.top_n_token_ids) == top_ids.flatten().tolist()
    assert torch.allclose(torch.tensor(list(message.top_n_logprobs)), top_logprobs.flatten(),
                          atol=TOLERANCE)


def test_asking_for_prompt_logprobs_changes_no_token_in_a_mixed_batch(model, oracle,
                                                                      monkeypatch):
    # Slices of 5 rows: several LM-head calls per chunk, split across sequences.
    monkeypatch.setattr(runner_module, "_PROMPT_SLICE_ROWS", 5)
    prompts = [random_prompt(n, seed=30 + n) for n in (1, 2, 19, 33)]
    plain_engine, plain_driver, plain = make_engine(model, max_prefill_tokens=16)
    plain_driver.submit(plain, [request(plain, i, p, 6) for i, p in enumerate(prompts)])
    plain_driver.run_until_done()

    engine, driver, stream = make_engine(model, max_prefill_tokens=16)
    seqs = [request(stream, i, p, 6) for i, p in enumerate(prompts)]
    for seq in seqs[::2] + seqs[3:]:  # 0, 2 and 3 ask; 1 does not
        seq.prefill_logprobs, seq.top_n_tokens = True, 2
    driver.submit(stream, seqs)
    driver.run_until_done()
    messages = prefill_messages(stream)
    assert sorted(messages) == [0, 2, 3]
    assert list(messages[0].logprobs) == []  # a one-token prompt has nothing to score
    for i in (2, 3):
        prompt = prompts[i]
        want = oracle_logprobs(oracle, prompt).gather(1, prompt[1:, None]).squeeze(1)
        assert torch.allclose(torch.tensor(list(messages[i].logprobs)), want, atol=TOLERANCE)
        assert len(messages[i].top_n_token_ids) == 2 * (len(prompt) - 1)
    for i in range(len(prompts)):
        assert stream.tokens(i) == plain.tokens(i), f"request {i}"
    assert all(not s.prompt_logprobs for s in seqs)  # nothing left held on the sequences
