"""From a parsed HTTP request to the wire request a shard group runs, within the limits."""

from __future__ import annotations

import random
from dataclasses import dataclass

from router.errors import ValidationError
from sluice.v1 import generate_pb2 as pb

_U64 = 2**64


@dataclass(slots=True, frozen=True)
class RequestLimits:
    """What one request may ask for: prompt and total length, stop sequences, alternatives."""

    max_input_tokens: int
    max_total_tokens: int
    max_stop_sequences: int
    max_top_n_tokens: int


@dataclass(slots=True)
class Prepared:
    request: pb.Request
    stop: list[str]
    seed: int | None  # reported back to the client when sampling
    input_length: int


def sampling(*, temperature: float | None, top_k: int | None = None, top_p: float | None = None,
             typical_p: float | None = None, repetition_penalty: float | None = None,
             frequency_penalty: float | None = None, presence_penalty: float | None = None,
             seed: int | None = None, do_sample: bool = False,
             greedy_by_default: bool = False) -> tuple[pb.SamplingParameters, int | None]:
    """Sampling parameters. Temperature 0 is always greedy.

    OpenAI routes sample by default (temperature 1). TGI routes are greedy by default and, as
    TGI does, sample when asked (do_sample) or when any warper is set (temperature != 1, top_k,
    top_p < 1, typical_p < 1).
    """
    t = 1.0 if temperature is None else temperature
    if t == 0.0:
        samples = False
    elif greedy_by_default:
        samples = (do_sample or t != 1.0 or bool(top_k) or (top_p or 1.0) < 1.0
                   or (typical_p or 1.0) < 1.0)
    else:
        samples = True
    if samples and seed is None:
        seed = random.getrandbits(64)
    params = pb.SamplingParameters(
        temperature=t if samples else 0.0,
        top_k=top_k or 0,
        top_p=top_p or 1.0,
        typical_p=typical_p or 1.0,
        repetition_penalty=repetition_penalty or 1.0,
        frequency_penalty=frequency_penalty or 0.0,
        presence_penalty=presence_penalty or 0.0,
        seed=seed if samples else 0,
    )
    return params, (seed if samples else None)


def prepare(limits: RequestLimits, input_ids: list[int], *, max_new_tokens: int | None,
            sampling_params: pb.SamplingParameters, seed: int | None, stop: list[str],
            top_n_tokens: int = 0, ignore_eos: bool = False,
            truncate: int | None = None, prefill_logprobs: bool = False) -> Prepared:
    if truncate is not None:
        input_ids = input_ids[-truncate:]
    if not input_ids:
        raise ValidationError("the prompt must not be empty", param="inputs")
    n = len(input_ids)
    if n > limits.max_input_tokens:
        raise ValidationError(f"the prompt must have at most {limits.max_input_tokens} tokens; "
                              f"given: {n} tokens", param="inputs")
    if max_new_tokens is None:
        max_new_tokens = limits.max_total_tokens - n
    if n + max_new_tokens > limits.max_total_tokens:
        raise ValidationError(
            f"prompt tokens + max_new_tokens must be <= {limits.max_total_tokens}; given: "
            f"{n} prompt tokens and {max_new_tokens} max_new_tokens", param="max_new_tokens")
    if len(stop) > limits.max_stop_sequences:
        raise ValidationError(f"at most {limits.max_stop_sequences} stop sequences are allowed; "
                              f"given: {len(stop)}", param="stop")
    if top_n_tokens > limits.max_top_n_tokens:
        raise ValidationError(f"top_n_tokens must be <= {limits.max_top_n_tokens}; given: "
                              f"{top_n_tokens}", param="top_n_tokens")
    request = pb.Request(
        input_ids=input_ids, sampling=sampling_params, top_n_tokens=top_n_tokens,
        stopping=pb.StoppingParameters(max_new_tokens=max_new_tokens, ignore_eos=ignore_eos),
        prefill_logprobs=prefill_logprobs)
    return Prepared(request, stop, seed, n)


def choices(prepared: Prepared, n: int) -> list[Prepared]:
    """`n` runs of one request (best_of, OpenAI's n); when sampling, run i uses seed + i."""
    runs = []
    for i in range(n):
        request = pb.Request()
        request.CopyFrom(prepared.request)
        seed = None if prepared.seed is None else (prepared.seed + i) % _U64
        if seed is not None:
            request.sampling.seed = seed
        runs.append(Prepared(request, prepared.stop, seed, prepared.input_length))
    return runs
