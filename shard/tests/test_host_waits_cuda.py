"""What a step does on the host before and after its launch must not wait for the GPU work
queued before it: with async scheduling that work is the step before's, and a wait would leave
the GPU idle while the host launches this one. A copy from pageable host memory waits for all
queued work, so each step's tensors travel from pinned memory or are made on the device.

Each case queues about a second of GPU work (torch.cuda._sleep) and an event after it, then
makes the call: the event still pending when the call returns shows the call did not wait.
Collected only where a CUDA GPU is present (conftest.py).
"""

from __future__ import annotations

import torch

from shard import batch as step_batch
from shard.attention import TorchVarlenAttention
from shard.sampling import Sampler, SamplingParams
from shard.tests.test_attention import MIXED, make_step

CUDA = torch.device("cuda")
SLEEP_CYCLES = 2_000_000_000  # ~1 s at the H100's and H200's clocks


def _queued_work() -> torch.cuda.Event:
    torch.cuda.synchronize()
    torch.cuda._sleep(SLEEP_CYCLES)
    done = torch.cuda.Event()
    done.record()
    return done


def test_a_steps_tensors_travel_without_waiting():
    host = [torch.arange(512), torch.arange(7, dtype=torch.int32)]
    step_batch.to_device(CUDA, *host)  # pinned memory allocated (cudaHostAlloc may wait)
    done = _queued_work()
    on_device = step_batch.to_device(CUDA, *host)
    assert not done.query()
    torch.cuda.synchronize()
    assert all(torch.equal(d.cpu(), h) for d, h in zip(on_device, host))


def test_varlen_metadata_of_prefill_rows_is_made_without_waiting():
    """The torch backend's metadata for a step with prefill chunks (cu_seqlens_k included)."""
    step = make_step(MIXED, 4, 5, torch.bfloat16, seed=4).to(CUDA)
    backend = TorchVarlenAttention("flash")
    done = _queued_work()
    meta = backend.prepare(step.layout)
    assert not done.query()
    torch.cuda.synchronize()
    assert meta.cu_seqlens_k.tolist() == [0] + torch.tensor(
        [c + n for c, n in MIXED]).cumsum(0).tolist()


def test_admitting_a_penalized_prompt_does_not_wait():
    """The prompt's tokens (and a continuation's generated ones) reach the penalty state."""
    sampler = Sampler(1000, 4, CUDA)
    params = SamplingParams(repetition_penalty=1.3)
    prompt = torch.tensor([5, 9, 9, 31, 77, 12])
    # The penalty state exists from the first admission on, and pinned memory is allocated.
    sampler.admit(0, params, prompt, resumed_tokens=2)
    done = _queued_work()
    sampler.admit(1, params, prompt, resumed_tokens=2)
    assert not done.query()
    torch.cuda.synchronize()
    assert sampler._prompt_seen[1].nonzero().flatten().tolist() == [5, 9, 31]
    counts = sampler._output_counts[1]
    assert counts.nonzero().flatten().tolist() == [12, 77] and counts[[12, 77]].tolist() == [1, 1]
