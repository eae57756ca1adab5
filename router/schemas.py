"""HTTP request bodies of the TGI and OpenAI APIs, parsed strictly at the edge.

Strict types: a string where a number belongs is a 422, not a silent coercion. Unknown fields
are ignored, as TGI and OpenAI-compatible servers do.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic import ValidationError as PydanticError

from router.errors import MalformedRequest, ValidationError

_STRICT = ConfigDict(strict=True, extra="ignore")
_U64 = 2**64


class TGIParameters(BaseModel):
    model_config = _STRICT
    best_of: int | None = Field(None, ge=1)
    decoder_input_details: bool = False
    details: bool = False
    do_sample: bool = False
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    max_new_tokens: int | None = Field(None, gt=0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    return_full_text: bool | None = None
    seed: int | None = Field(None, ge=0, lt=_U64)
    stop: list[str] = Field(default_factory=list)
    temperature: float | None = Field(None, ge=0.0)
    top_k: int | None = Field(None, gt=0)
    top_n_tokens: int | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    truncate: int | None = Field(None, gt=0)
    typical_p: float | None = Field(None, gt=0.0, le=1.0)
    watermark: bool = False
    adapter_id: str | None = None
    grammar: dict | None = None


class TGIRequest(BaseModel):
    model_config = _STRICT
    inputs: str
    parameters: TGIParameters = Field(default_factory=TGIParameters)
    stream: bool = False


class TextPart(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = _STRICT
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False


class OpenAISampling(BaseModel):
    """Fields /v1/chat/completions and /v1/completions share (vLLM's extensions included)."""

    model_config = _STRICT
    model: str | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=0, lt=_U64)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    user: str | None = None
    # vLLM extensions, common in benchmarks
    ignore_eos: bool = False
    top_k: int | None = Field(None, gt=0)
    repetition_penalty: float | None = Field(None, gt=0.0)

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(OpenAISampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, gt=0)
    max_completion_tokens: int | None = Field(None, gt=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


TokenId = Annotated[int, Field(ge=0)]


class CompletionRequest(OpenAISampling):
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    max_tokens: int | None = Field(16, gt=0)  # OpenAI's default for completions
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)


def parse(model: type[BaseModel], body: bytes):
    """Parse a JSON body into `model`; 400 for broken JSON, 422 for the wrong shape."""
    try:
        return model.model_validate_json(body)
    except PydanticError as exc:
        first = exc.errors(include_url=False)[0]
        if first["type"] == "json_invalid":
            raise MalformedRequest(f"the request body is not valid JSON: {first['msg']}") from exc
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise ValidationError(f"{where}: {first['msg']}", param=where) from exc
