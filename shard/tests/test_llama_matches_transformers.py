"""Our Llama-family model against transformers' implementation on the same weights.

Our model runs exactly as the engine drives it: a scheduler plans each step, `shard.batch.build`
lays the ragged step out over the paged KV cache, and the torch attention backend reads and
writes the pages. Prefill (whole or chunked) and then one-token decodes go through the cache;
transformers gets one full-sequence forward on the same ids. Every position's logits must agree.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from shard import batch as step_batch
from shard import loader
from shard import plan as step_plan
from shard.attention import TorchAttention
from shard.kv_cache import BlockAllocator, KVCache
from shard.parallel import TensorParallel
from shard.sampling import SamplingParams
from shard.scheduler import Scheduler, Sequence
from shard.source import ModelSource, resolve
from shard.tests.tiny_model import write_tiny_model

TOLERANCE = 1e-3  # max |Δlogits|, float32
NUM_DECODES = 5
CPU = torch.device("cpu")


def paged_logits(model, prompt: torch.Tensor, decode_tokens: list[int], block_size: int,
                 max_prefill_tokens: int, device: torch.device = CPU) -> torch.Tensor:
    """Logits [prompt_len + len(decode_tokens), vocab] of our model driven step by step.

    The prompt is prefilled in chunks of at most `max_prefill_tokens`, then each of
    `decode_tokens` is fed alone (teacher forcing), reading its context from the KV cache.
    """
    config = model.config
    total = prompt.shape[0] + len(decode_tokens) + 1
    num_blocks = -(-total // block_size) + 2
    allocator = BlockAllocator(num_blocks, block_size)
    # Hold blocks 0 and 2 and give 1 and 3 back, so the sequence's pages start at block 3 and
    # are out of order: the block table really matters.
    held = allocator.allocate(4)
    allocator.release(held[1:2])
    allocator.release(held[3:4])
    cache = KVCache(config, 1, num_blocks, block_size, next(model.parameters()).dtype, device)
    scheduler = Scheduler(allocator, max_batch_size=2, max_prefill_tokens=max_prefill_tokens,
                          max_total_tokens=num_blocks * block_size)
    seq = Sequence(request_id=0, stream=None, prompt=prompt, sampling=SamplingParams(),
                   max_new_tokens=len(decode_tokens) + 1)
    scheduler.add(seq)
    assert scheduler.admit() == [seq]
    assert seq.blocks[0] != 0 and seq.blocks != sorted(seq.blocks)
    # The model runner's block tables, as the plan's admission fills them.
    block_tables = torch.zeros(2, scheduler.max_blocks, dtype=torch.int32)
    admitted = [seq]
    attention = model.layers[0].self_attn.backend  # the backend the model was built with
    last_tokens = torch.zeros(2, dtype=torch.long, device=device)  # decodes read their token here
    rows, prefill_chunks = [], 0
    total_fed = prompt.shape[0] + len(decode_tokens)
    with torch.inference_mode():
        while seq.num_cached < total_fed:
            step = scheduler.schedule()
            plan = step_plan.make(step, admitted)
            admitted = []
            for slot, count in zip(plan.admitted_slots.tolist(), plan.admitted_counts.tolist()):
                block_tables[slot, :count] = plan.admitted_blocks[:count]
            batch = step_batch.build(plan, block_tables, block_size, device, last_tokens)
            hidden = model(batch.input_ids, batch.positions, cache.layers,
                           attention.prepare(batch.layout))
            # All positions of the step, prefill rows included, in position order.
            assert batch.positions.cpu().tolist() == list(
                range(seq.num_cached, seq.num_cached + batch.positions.shape[0]))
            rows.append(model.compute_logits(hidden).float())
            prefill_chunks += len(step.prefills)
            scheduler.advance(step)
            if not seq.prefilling and seq.num_cached < total_fed:
                last_tokens[seq.slot] = decode_tokens[seq.num_cached - prompt.shape[0]]
    assert prefill_chunks == -(-prompt.shape[0] // max_prefill_tokens)
    return torch.cat(rows).cpu()


def greedy_continuation(hf_model, prompt: torch.Tensor, n: int) -> list[int]:
    ids = prompt.clone()
    with torch.no_grad():
        for _ in range(n):
            token = hf_model(ids[None]).logits[0, -1].argmax()
            ids = torch.cat([ids, token[None]])
    return ids[prompt.shape[0]:].tolist()


def assert_matches(ours_loaded, hf_model, prompt: torch.Tensor, block_size: int,
                   max_prefill_tokens: int) -> None:
    decode_tokens = greedy_continuation(hf_model, prompt, NUM_DECODES)
    ids = torch.cat([prompt, torch.tensor(decode_tokens)])
    with torch.no_grad():
        expected = hf_model(ids[None]).logits[0].float()
    ours = paged_logits(ours_loaded.model, prompt, decode_tokens, block_size, max_prefill_tokens)
    assert ours.shape == expected.shape
    error = (ours - expected).abs().max().item()
    assert error < TOLERANCE, f"max |Δlogits| = {error}"
    # Teacher forcing is only meaningful if our greedy choices are transformers' ones.
    assert ours[prompt.shape[0] - 1:-1].argmax(-1).tolist() == decode_tokens


def load_ours(source: ModelSource):
    return loader.load(source, TensorParallel(), CPU, torch.float32, TorchAttention())


def load_transformers(folder: Path, **kwargs):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs).eval()


TINY_CASES = {
    "llama_gqa": dict(),
    "qwen2_qkv_bias": dict(family="qwen2"),
    "llama3_rope_scaling": dict(rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}),
    "llama_tied_embeddings": dict(tie_word_embeddings=True),
}


@pytest.fixture(scope="module", params=list(TINY_CASES))
def tiny_pair(request, tmp_path_factory):
    folder = write_tiny_model(tmp_path_factory.mktemp(request.param), **TINY_CASES[request.param])
    ours = load_ours(ModelSource(request.param, folder))
    hf = load_transformers(folder)
    return request.param, ours, hf


def tiny_prompt(case: str, vocab_size: int) -> torch.Tensor:
    # The llama3 case runs well past original_max_position_embeddings (64), where the scaled
    # low frequencies differ from plain rope.
    length = 80 if case == "llama3_rope_scaling" else 12
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab_size, (length,), generator=generator)


def test_tiny_model_checkpoint_has_the_family_features(tiny_pair):
    case, ours, hf = tiny_pair
    config = ours.config
    assert (config.num_heads, config.num_kv_heads) == (4, 2)
    assert config.qkv_bias == (case == "qwen2_qkv_bias")
    assert config.tie_word_embeddings == (case == "llama_tied_embeddings")
    assert (config.rope_scaling is not None) == (case == "llama3_rope_scaling")
    if config.tie_word_embeddings:
        assert ours.model.lm_head.weight is ours.model.embed_tokens.weight


def test_prefill_then_paged_decode_matches_transformers(tiny_pair):
    case, ours, hf = tiny_pair
    prompt = tiny_prompt(case, ours.config.vocab_size)
    assert_matches(ours, hf, prompt, block_size=4, max_prefill_tokens=4096)


def test_logits_written_into_a_given_buffer_are_those_returned(tiny_pair):
    """The decode graphs have the LM head write into their shared buffer (no copy): same
    values, bit for bit, in the buffer's rows, and nothing written past them."""
    _, ours, _ = tiny_pair
    hidden = torch.randn(5, ours.config.hidden_size, generator=torch.Generator().manual_seed(2))
    buffer = torch.full((8, ours.config.vocab_size), 7.0)
    with torch.inference_mode():
        returned = ours.model.compute_logits(hidden, out=buffer[:5])
        assert returned.data_ptr() == buffer.data_ptr()
        assert torch.equal(buffer[:5], ours.model.compute_logits(hidden))
    assert torch.equal(buffer[5:], torch.full((3, ours.config.vocab_size), 7.0))


def test_chunked_prefill_then_paged_decode_matches_transformers(tiny_pair):
    case, ours, hf = tiny_pair
    prompt = tiny_prompt(case, ours.config.vocab_size)
    chunk = -(-prompt.shape[0] // 3)  # three chunks, the later two over cached context
    assert_matches(ours, hf, prompt, block_size=4, max_prefill_tokens=chunk)


@pytest.fixture(scope="module")
def smollm2():
    source = resolve(None)
    assert source.is_gguf
    ours = load_ours(source)
    hf = load_transformers(source.path.parent, gguf_file=source.path.name)
    return ours, hf


# "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n" in SmolLM2's vocabulary.
SMOLLM2_PROMPT = torch.tensor([1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198])


def test_smollm2_gguf_prefill_then_paged_decode_matches_transformers(smollm2):
    ours, hf = smollm2
    assert_matches(ours, hf, SMOLLM2_PROMPT, block_size=16, max_prefill_tokens=4096)


def test_smollm2_gguf_chunked_prefill_matches_transformers(smollm2):
    ours, hf = smollm2
    assert_matches(ours, hf, SMOLLM2_PROMPT, block_size=4, max_prefill_tokens=5)


def test_compiled_elementwise_stages_match_transformers(tmp_path):
    """--compile on: the same model with its norms, rotary and SiLU as torch.compile'd kernels
    (Inductor's C++ backend here, Triton on a GPU), through chunked prefill and decode, where
    token counts of 1, 4 and 12 exercise the dynamic shapes."""
    folder = write_tiny_model(tmp_path / "qwen2", family="qwen2",
                              rope_scaling=TINY_CASES["llama3_rope_scaling"]["rope_scaling"])
    ours = loader.load(ModelSource("compiled", folder), TensorParallel(), CPU, torch.float32,
                       TorchAttention(), compiled=True)
    assert ours.model.layers[0].mlp.ops.compiled
    prompt = tiny_prompt("llama3_rope_scaling", ours.config.vocab_size)
    assert_matches(ours, load_transformers(folder), prompt, block_size=4, max_prefill_tokens=32)
