"""The TGI API's answers as typed models: the JSON sent and the OpenAPI schema both come from here.

Field names and nullability follow TGI's router. Fields TGI leaves out when empty (`details`
unless asked, `top_tokens`, `best_of_sequences`) are left unset and dumped with
`exclude_unset`, so they are absent rather than null.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

# content_filter is not a TGI value: Sluice ends a filtered output with it (docs/api.md).
FinishReason = Literal["length", "eos_token", "stop_sequence", "content_filter"]


class Token(BaseModel):
    id: int
    text: str
    logprob: float | None
    special: bool


class PrefillToken(BaseModel):
    id: int
    text: str
    logprob: float | None = Field(description="null for the first prompt token")


class _Sequence(BaseModel):
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None = Field(description="the seed used when sampling, else null")
    prefill: list[PrefillToken] = Field(description="with decoder_input_details, else empty")
    tokens: list[Token]
    top_tokens: list[list[Token]] = Field(default=None, description="with top_n_tokens")


class BestOfSequence(_Sequence):
    generated_text: str


class Details(_Sequence):
    best_of_sequences: list[BestOfSequence] = Field(
        default=None, description="with best_of > 1: the sequences not chosen")


class GenerateResponse(BaseModel):
    generated_text: str
    details: Details = Field(default=None, description="with details: true")


class StreamDetails(BaseModel):
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None
    input_length: int


class StreamResponse(BaseModel):
    """One SSE event of /generate_stream: a token; the last one also carries the text."""

    index: int
    token: Token
    top_tokens: list[Token]
    generated_text: str | None
    details: StreamDetails | None


class SimpleToken(BaseModel):
    """One token of POST /tokenize; start and stop are character offsets into `inputs`."""

    id: int
    text: str
    start: int
    stop: int


class ShardGroupInfo(BaseModel):
    uri: str
    ready: bool
    state: Literal["connecting", "ready", "draining", "refused", "retired"] = Field(
        description="retired: discovery no longer finds it; it finishes what it runs")
    free_budget_tokens: int
    max_batch_total_tokens: int | None
    prefill_chunk_tokens: int | None = Field(
        description="tokens a step beside decodes holds at most (--prefill-chunk-ms); 0: no bound")


class Info(BaseModel):
    model_id: str
    model_sha: str | None
    model_dtype: str
    quantization: str
    model_device_type: str
    model_pipeline_tag: str
    max_concurrent_requests: int
    max_best_of: int
    max_stop_sequences: int
    max_input_tokens: int
    max_total_tokens: int
    max_batch_prefill_tokens: int
    max_batch_size: int
    max_client_batch_size: int
    validation_workers: int
    router: str
    version: str
    sha: str | None
    docker_label: str | None
    attention_backend: str
    num_shard: int
    shard_groups: list[ShardGroupInfo]


class Health(BaseModel):
    status: Literal["ok"]
    shard_groups_ready: int
    detail: str | None = None  # set when no group is ready and the router holds requests


class TGIError(BaseModel):
    """Every TGI route's error body, also the last SSE event of a stream that fails."""

    error: str
    error_type: str
