"""The OpenAI API's answers as typed models: the JSON sent and the OpenAPI schema both come from here.

Shapes follow the `openai` client's own models. Fields OpenAI sends only sometimes (`usage` on
stream chunks, `role` after the first delta) are left unset and dumped with `exclude_unset`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

FinishReason = Literal["stop", "length", "content_filter"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float = Field(description="-9999.0 for a token with no chance at all")
    bytes: list[int] | None = Field(description="the token's raw bytes: joined over tokens, "
                                    "they spell characters that span several")


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] = Field(default=None, description="on a choice's first chunk")
    content: str = Field(default=None, description="absent on the chunk that ends a choice")


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason | None


class ChatCompletionChunk(BaseModel):
    """One SSE event of a streamed chat completion; the stream ends with `data: [DONE]`."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage = Field(default=None, description="on the last chunk, with include_usage")


class CompletionLogprobs(BaseModel):
    """Legacy logprobs; with `echo` the prompt's tokens come first, the very first unscored."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int] = Field(description="where each token starts in the choice's text")


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason | None = Field(description="null on stream chunks but the last")


class Completion(BaseModel):
    """A completion, or one SSE event of a streamed one (the same shape, as OpenAI's)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage = Field(default=None, description="absent on stream chunks but the usage one")


class Model(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[Model]


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str


class OpenAIError(BaseModel):
    """Every /v1 route's error body, also the last SSE event of a stream that fails."""

    error: OpenAIErrorDetail
