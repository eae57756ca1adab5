"""The sampler: greedy, seeded Gumbel sampling, top-k/top-p/typical-p, penalties, top-n.

transformers' logits processors are the oracles for the filters and the repetition penalty;
OpenAI's formula for frequency and presence penalties.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from transformers import (RepetitionPenaltyLogitsProcessor, TopKLogitsWarper, TopPLogitsWarper,
                          TypicalLogitsWarper)

from shard.sampling import GREEDY_CHUNK, Sampler, SamplingParams, _filter, greedy_in_chunks

CPU = torch.device("cpu")
VOCAB = 320


def sample(logits, params, positions=None, slots=None, top_n=0, sampler=None):
    sampler = sampler or Sampler(logits.shape[-1], max(len(params), 8), CPU)
    positions = positions if positions is not None else [0] * len(params)
    slots = slots if slots is not None else list(range(len(params)))
    return sampler(logits, params, slots, positions, top_n)


def random_logits(rows: int, seed: int, scale: float = 3.0, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


# -- greedy ------------------------------------------------------------------------------------

def test_greedy_picks_the_argmax_and_reports_its_log_softmax():
    logits = random_logits(6, seed=0)
    out = sample(logits, [SamplingParams()] * 6)
    assert torch.equal(out.tokens, logits.argmax(-1))
    expected = logits.log_softmax(-1).gather(1, out.tokens[:, None]).squeeze(1)
    torch.testing.assert_close(out.logprobs, expected, rtol=0, atol=1e-6)
    assert out.top_ids is None and out.top_logprobs is None


def test_greedy_argmax_in_chunks_is_the_first_maximum_of_the_row():
    """The greedy stage's two-step argmax over a vocabulary of several chunks, the last one
    partial: equal maxima in different chunks, at a chunk's edges, in the padding's chunk."""
    vocab = 2 * GREEDY_CHUNK + 77
    logits = random_logits(5, seed=4, vocab=vocab).to(torch.bfloat16)
    peak = logits.max() + 1
    for row, where in enumerate([(7, GREEDY_CHUNK + 3), (GREEDY_CHUNK - 1, GREEDY_CHUNK),
                                 (2 * GREEDY_CHUNK + 76,), (2 * GREEDY_CHUNK, 2 * GREEDY_CHUNK + 1),
                                 (GREEDY_CHUNK + 1, 2 * GREEDY_CHUNK + 5)]):
        logits[row, list(where)] = peak
    compiled = Sampler(vocab, 8, CPU, compiled=True)
    compiled.warm_up(torch.bfloat16)
    with torch.inference_mode():
        for pick in (greedy_in_chunks, compiled._greedy):  # eager, and as Inductor compiles it
            tokens, chosen, reported = pick(logits)
            assert tokens.tolist() == [7, GREEDY_CHUNK - 1, 2 * GREEDY_CHUNK + 76,
                                       2 * GREEDY_CHUNK, GREEDY_CHUNK + 1]
            assert reported.dtype == torch.float64
            assert torch.equal(reported, torch.stack((tokens.double(), chosen.double()), 1))
            assert torch.equal(tokens, logits.argmax(-1))
            torch.testing.assert_close(chosen, logits.float().log_softmax(-1).gather(
                1, tokens[:, None]).squeeze(1), rtol=0, atol=1e-6)


def test_only_steps_of_greedy_rows_without_penalties_or_top_n_take_the_greedy_stage():
    """What the decode graphs' greedy pick may stand in for (shard/cuda_graphs.py): the
    sampler's own choice of its greedy stage."""
    sampler = Sampler(VOCAB, 8, CPU)
    plain, penalized = SamplingParams(), SamplingParams(repetition_penalty=1.2)
    assert sampler.takes_greedy([plain] * 3, top_n=0)
    assert not sampler.takes_greedy([plain] * 3, top_n=2)
    assert not sampler.takes_greedy([plain, SamplingParams(temperature=0.7)], top_n=0)
    # A penalty counts once some sequence was admitted with one (the counts exist).
    assert sampler.takes_greedy([plain, penalized], top_n=0)
    sampler.admit(1, penalized, torch.tensor([5, 6]))
    assert not sampler.takes_greedy([plain, penalized], top_n=0)
    assert sampler.takes_greedy([plain, plain], top_n=0)


def test_greedy_rows_stay_argmax_in_a_batch_with_sampled_rows():
    logits = random_logits(6, seed=1)
    params = [SamplingParams(), SamplingParams(temperature=1.3, seed=3, top_p=0.9),
              SamplingParams(), SamplingParams(temperature=0.5, top_k=7, seed=9),
              SamplingParams(top_k=3, top_p=0.5), SamplingParams()]  # greedy despite filters
    out = sample(logits, params, positions=[4, 5, 6, 7, 8, 9])
    for i in (0, 2, 4, 5):
        assert out.tokens[i] == logits[i].argmax()
        torch.testing.assert_close(out.logprobs[i], logits[i].log_softmax(-1)[out.tokens[i]])


def test_greedy_stage_reads_low_precision_logits_as_the_general_path_does():
    """Greedy rows without top-n take the fused stage (compiled: Inductor, dynamic in the row
    count), over the model's own dtype; the general path (top-n asked) upcasts and
    log-softmaxes. Same tokens; log-probabilities of the same float32 values."""
    compiled = Sampler(VOCAB, 8, CPU, compiled=True)
    compiled.warm_up(torch.bfloat16)  # rows 1, then any: no compiling left for the calls below
    with torch.inference_mode(), torch._dynamo.config.patch(error_on_recompile=True):
        for rows in (1, 2, 5, 8):
            logits = random_logits(rows, seed=rows).to(torch.bfloat16)
            expected = logits.double().log_softmax(-1)
            general = sample(logits, [SamplingParams()] * rows, top_n=1)
            for sampler in (None, compiled):
                out = sample(logits, [SamplingParams()] * rows, sampler=sampler)
                assert torch.equal(out.tokens, logits.float().argmax(-1))
                assert torch.equal(out.tokens, general.tokens)
                assert out.logprobs.dtype == torch.float32 and out.top_ids is None
                torch.testing.assert_close(out.logprobs, general.logprobs, rtol=0, atol=2e-6)
                torch.testing.assert_close(out.logprobs.double(),
                                           expected.gather(1, out.tokens[:, None]).squeeze(1),
                                           rtol=0, atol=2e-6)


# -- seeds -------------------------------------------------------------------------------------

ROW_VARIANTS = {
    "temperature": SamplingParams(temperature=0.8, seed=1234),
    "top_k": SamplingParams(temperature=1.2, top_k=20, seed=99),
    "top_p": SamplingParams(temperature=1.0, top_p=0.7, seed=2**40 + 7),
    "typical_p": SamplingParams(temperature=0.9, typical_p=0.6, seed=5),
}
OTHER_ROWS = [SamplingParams(temperature=0.3, top_p=0.5, seed=1),
              SamplingParams(),
              SamplingParams(temperature=1.7, top_k=3, seed=2),
              SamplingParams(temperature=1.0, typical_p=0.3, seed=3),
              SamplingParams(temperature=0.6, top_k=50, top_p=0.9, seed=4),
              SamplingParams(temperature=1.1, seed=5),
              SamplingParams(temperature=2.0, top_p=0.2, typical_p=0.5, seed=6)]


def test_seeded_draw_depends_only_on_seed_and_position_not_on_the_batch():
    for name, row in ROW_VARIANTS.items():
        for position in range(0, 60, 6):
            logits = random_logits(8, seed=position, scale=2.0)
            alone = sample(logits[3:4], [row], positions=[position]).tokens[0]
            params = OTHER_ROWS[:3] + [row] + OTHER_ROWS[3:]
            positions = [position + 11 * i for i in range(8)]
            positions[3] = position
            batched = sample(logits, params, positions=positions).tokens[3]
            assert alone == batched, f"{name} at position {position}"


def test_a_rows_kept_set_does_not_depend_on_the_other_rows():
    for name, row in {**ROW_VARIANTS, "plain": SamplingParams(temperature=1.0)}.items():
        for seed in range(10):
            logits = random_logits(8, seed=seed)
            logprobs = logits.log_softmax(-1)
            alone = _filter(logprobs[3:4], [row])[0]
            batched = _filter(logprobs, OTHER_ROWS[:3] + [row] + OTHER_ROWS[3:])[3]
            assert torch.equal(alone.isfinite(), batched.isfinite()), f"{name}, seed {seed}"


def test_same_seed_and_position_give_the_same_token():
    logits = torch.zeros(1, VOCAB)
    params = [SamplingParams(temperature=1.0, seed=42)]
    first = [sample(logits, params, positions=[p]).tokens.item() for p in range(50)]
    again = [sample(logits, params, positions=[p]).tokens.item() for p in range(50)]
    assert first == again
    assert len(set(first)) > 40  # the position moves the draw: 50 draws from 320 tokens


def test_different_seeds_give_different_draws():
    logits = torch.zeros(50, VOCAB)  # uniform: two independent draws agree with p = 1/320
    positions = list(range(50))

    def draws(seed):
        return sample(logits, [SamplingParams(temperature=1.0, seed=seed)] * 50,
                      positions=positions).tokens

    for a, b in [(1, 2), (0, 1), (7, 7 + 2**32), (2**63 - 1, 2**63 - 2)]:
        agree = (draws(a) == draws(b)).sum().item()
        # Expected agreements: 50/320 ~ 0.16; P(>= 4) < 1e-3.
        assert agree <= 3, f"seeds {a} and {b} agree on {agree} of 50 positions"


# -- temperature -------------------------------------------------------------------------------

FREQ_LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2])
NUM_DRAWS = 20000


def chi_square_p_value(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    """P(χ² >= observed) for the counts of `tokens` against `probs`, len(probs) - 1 d.o.f."""
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    expected = probs.double() * tokens.numel()
    statistic = ((counts - expected) ** 2 / expected).sum()
    dof = torch.tensor((probs.numel() - 1) / 2, dtype=torch.double)
    return torch.special.gammaincc(dof, statistic / 2).item()


def test_temperature_sampling_frequencies_match_softmax_of_scaled_logits():
    """20,000 draws (seed i, position i % 97) of an 8-token vocabulary.

    Under correct sampling the χ² statistic of the counts follows χ²(7), so requiring a p-value
    above 1e-3 fails a correct sampler for one seed set in a thousand; the seeds are fixed, so
    the test is deterministic. Each expected count is >= 500, where the χ² approximation holds.
    The same draws are far from softmax(logits) at T = 1 (p < 1e-9): the test has power.
    The hash's 24-bit uniforms bias each probability by < 2^-24, far below the ~1e-3 resolution.
    """
    for temperature in (0.7, 1.0, 1.6):
        params = [SamplingParams(temperature=temperature, seed=i) for i in range(NUM_DRAWS)]
        logits = FREQ_LOGITS.expand(NUM_DRAWS, -1).contiguous()
        tokens = sample(logits, params, positions=[i % 97 for i in range(NUM_DRAWS)]).tokens
        assert chi_square_p_value(tokens, (FREQ_LOGITS / temperature).softmax(-1)) > 1e-3
        if temperature != 1.0:
            assert chi_square_p_value(tokens, FREQ_LOGITS.softmax(-1)) < 1e-9


def test_sampled_logprob_is_of_the_tempered_distribution():
    logits = random_logits(4, seed=3)
    temps = [0.5, 1.0, 1.5, 2.5]
    out = sample(logits, [SamplingParams(temperature=t, seed=8) for t in temps])
    for i, t in enumerate(temps):
        torch.testing.assert_close(out.logprobs[i], (logits[i] / t).log_softmax(-1)[out.tokens[i]])


# -- top-k, top-p, typical-p against transformers ---------------------------------------------

def oracle_kept(scores: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Tokens with a finite score after transformers' warpers, in generate()'s order."""
    scores = scores[None].clone()
    if p.top_k > 0:
        scores = TopKLogitsWarper(p.top_k)(None, scores)
    if p.top_p < 1.0:
        scores = TopPLogitsWarper(p.top_p)(None, scores)
    if p.typical_p < 1.0:
        scores = TypicalLogitsWarper(p.typical_p)(None, scores)
    return scores[0].isfinite()


FILTER_ROWS = [SamplingParams(temperature=1.0, top_k=5),
               SamplingParams(temperature=0.7, top_k=50),
               SamplingParams(temperature=1.0, top_k=1),
               SamplingParams(temperature=1.0, top_p=0.9),
               SamplingParams(temperature=1.4, top_p=0.5),
               SamplingParams(temperature=1.0, top_p=0.01),
               SamplingParams(temperature=1.0, typical_p=0.9),
               SamplingParams(temperature=0.8, typical_p=0.2),
               SamplingParams(temperature=1.0, top_k=40, top_p=0.8),
               SamplingParams(temperature=1.0, top_k=40, top_p=0.9, typical_p=0.5),
               SamplingParams(temperature=1.2, top_p=0.95, typical_p=0.7),
               SamplingParams(temperature=1.0, top_k=10, typical_p=0.3),
               SamplingParams(temperature=1.0),
               SamplingParams(temperature=0.5, top_k=VOCAB + 5)]


def test_filters_keep_exactly_the_tokens_transformers_warpers_keep():
    for seed in range(25):
        logits = random_logits(len(FILTER_ROWS), seed=seed, scale=1.0 + seed % 4)
        temps = torch.tensor([p.temperature for p in FILTER_ROWS])[:, None]
        kept = _filter((logits / temps).log_softmax(-1), FILTER_ROWS).isfinite()
        for i, p in enumerate(FILTER_ROWS):
            expected = oracle_kept(logits[i] / p.temperature, p)
            assert torch.equal(kept[i], expected), (
                f"seed {seed}, {p}: ours keeps {kept[i].sum()} tokens, transformers "
                f"{expected.sum()}; differ on {(kept[i] ^ expected).nonzero().flatten().tolist()}")


def test_top_k_keeps_tied_logits_like_transformers_whatever_the_batch():
    # bf16 models produce exact ties; the k-th value decides, as in TopKLogitsWarper.
    for seed in range(10):
        logits = (random_logits(3, seed=seed) * 2).round() / 2
        rows = [SamplingParams(temperature=1.0, top_k=7), SamplingParams(temperature=1.0, top_k=30)]
        for batch in (rows, rows + [SamplingParams(temperature=1.0, top_p=0.5)]):
            kept = _filter(logits[:len(batch)].log_softmax(-1), batch).isfinite()
            for i, p in enumerate(rows):
                assert torch.equal(kept[i], oracle_kept(logits[i], p)), f"seed {seed}, {p}"


def test_sampled_tokens_stay_inside_the_top_k_and_top_p_sets():
    logits = random_logits(1, seed=11, scale=1.0).expand(400, -1).contiguous()
    ranks = logits[0].argsort(descending=True)
    probs = logits[0].softmax(-1)[ranks]
    prefix = int(((probs.cumsum(-1) - probs) < 0.6).sum())  # smallest prefix with mass >= 0.6
    for params, allowed in [(SamplingParams(temperature=1.0, top_k=12), ranks[:12]),
                            (SamplingParams(temperature=1.0, top_p=0.6), ranks[:prefix])]:
        tokens = sample(logits, [replace(params, seed=s) for s in range(400)]).tokens
        assert set(tokens.tolist()) <= set(allowed.tolist())
        assert len(set(tokens.tolist())) > len(allowed) // 2  # it really samples


# -- penalties ---------------------------------------------------------------------------------

def run_penalized(params: SamplingParams, prompt: list[int], forced: list[int], slot: int = 2):
    """Admit, generate `forced` tokens (greedy on logits that force them), return the sampler."""
    sampler = Sampler(50, 4, CPU)
    sampler.admit(slot, params, torch.tensor(prompt))
    for position, token in enumerate(forced, start=len(prompt)):
        logits = torch.zeros(1, 50)
        logits[0, token] = 1000.0
        out = sampler(logits, [params], [slot], [position], 0)
        assert out.tokens.tolist() == [token]
    return sampler


def full_logprobs(sampler, logits, params, slot, position):
    out = sampler(logits, [params], [slot], [position], logits.shape[-1])
    return torch.empty_like(out.top_logprobs[0]).scatter(0, out.top_ids[0], out.top_logprobs[0])


def test_repetition_penalty_matches_transformers_over_prompt_and_generated_tokens():
    prompt, forced = [3, 7, 7, 11, 40], [12, 3, 12, 25]
    params = SamplingParams(repetition_penalty=1.7)
    sampler = run_penalized(params, prompt, forced)
    logits = random_logits(1, seed=4, vocab=50)
    ours = full_logprobs(sampler, logits, params, 2, len(prompt) + len(forced))
    ids = torch.tensor([prompt + forced])
    expected = RepetitionPenaltyLogitsProcessor(1.7)(ids, logits.clone()).log_softmax(-1)[0]
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
    assert not torch.allclose(ours, logits.log_softmax(-1)[0], atol=1e-2)


def test_frequency_and_presence_penalties_follow_openais_formula():
    prompt, forced = [3, 7, 9], [12, 3, 12, 25, 12]
    params = SamplingParams(frequency_penalty=0.4, presence_penalty=0.9)
    sampler = run_penalized(params, prompt, forced)
    logits = random_logits(1, seed=5, vocab=50)
    ours = full_logprobs(sampler, logits, params, 2, len(prompt) + len(forced))
    # Only generated tokens count (the prompt does not): logits - f * count - p * [count > 0].
    counts = torch.bincount(torch.tensor(forced), minlength=50).float()
    expected = (logits[0] - 0.4 * counts - 0.9 * (counts > 0).float()).log_softmax(-1)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)


def test_penalties_are_per_sequence_and_reset_when_a_slot_is_reused():
    params = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5)
    sampler = run_penalized(params, [1, 2], [5, 5], slot=0)
    sampler.admit(1, params, torch.tensor([8]))
    logits = random_logits(3, seed=6, vocab=50)
    plain = SamplingParams()
    out = sampler(logits, [params, params, plain], [0, 1, 3], [4, 1, 0], 50)
    got = torch.empty_like(out.top_logprobs).scatter(1, out.top_ids, out.top_logprobs)
    counts0 = torch.bincount(torch.tensor([5, 5]), minlength=50).float()
    rep0 = RepetitionPenaltyLogitsProcessor(2.0)(torch.tensor([[1, 2, 5, 5]]), logits[0:1].clone())
    torch.testing.assert_close(got[0], (rep0[0] - 0.5 * counts0).log_softmax(-1), rtol=0, atol=1e-5)
    rep1 = RepetitionPenaltyLogitsProcessor(2.0)(torch.tensor([[8]]), logits[1:2].clone())
    torch.testing.assert_close(got[1], rep1[0].log_softmax(-1), rtol=0, atol=1e-5)
    torch.testing.assert_close(got[2], logits[2].log_softmax(-1), rtol=0, atol=1e-6)
    # Slot 0 is taken by a new request: nothing of the old one's history remains.
    sampler.admit(0, params, torch.tensor([30]))
    logits = random_logits(1, seed=7, vocab=50)
    fresh = full_logprobs(sampler, logits, params, 0, 1)
    rep = RepetitionPenaltyLogitsProcessor(2.0)(torch.tensor([[30]]), logits.clone())
    torch.testing.assert_close(fresh, rep[0].log_softmax(-1), rtol=0, atol=1e-5)


# -- top-n -------------------------------------------------------------------------------------

def test_top_n_tokens_are_the_n_best_of_the_reported_distribution():
    logits = random_logits(4, seed=8)
    params = [SamplingParams(), SamplingParams(temperature=0.6, seed=1),
              SamplingParams(temperature=1.5, top_k=3, seed=2), SamplingParams(top_p=0.3)]
    out = sample(logits, params, positions=[3, 4, 5, 6], top_n=5)
    temps = torch.tensor([p.temperature or 1.0 for p in params])[:, None]
    values, ids = (logits / temps).log_softmax(-1).topk(5)
    assert torch.equal(out.top_ids, ids)
    torch.testing.assert_close(out.top_logprobs, values, rtol=0, atol=1e-6)
    chosen = (logits / temps).log_softmax(-1).gather(1, out.tokens[:, None]).squeeze(1)
    torch.testing.assert_close(out.logprobs, chosen, rtol=0, atol=1e-6)
