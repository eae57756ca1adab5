"""What /v1/chat/completions and /v1/completions share, and GET /v1/models."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response

from router import openai_responses as out
from router import streaming
from router.errors import ValidationError
from router.schemas import OpenAISampling
from router.state import RouterState
from router.validation import Prepared, sampling

# TGI's finish reasons in OpenAI's words.
FINISH = {"length": "length", "eos_token": "stop", "stop_sequence": "stop",
          "content_filter": "content_filter"}


@dataclass(slots=True, frozen=True)
class Head:
    """The fields every answer and chunk of one request repeats."""

    id: str
    created: int
    model: str

    @classmethod
    def new(cls, prefix: str, state: RouterState) -> Head:
        return cls(f"{prefix}-{uuid.uuid4().hex}", int(time.time()), state.model_name)

    def fields(self) -> dict:
        return {"id": self.id, "created": self.created, "model": self.model}


def sampling_params(body: OpenAISampling):
    return sampling(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                    repetition_penalty=body.repetition_penalty,
                    frequency_penalty=body.frequency_penalty,
                    presence_penalty=body.presence_penalty, seed=body.seed)


def check_choices(state: RouterState, count: int, param: str) -> None:
    """Each choice is a request on a shard group: their number per HTTP request is bounded."""
    limit = state.config.max_client_batch_size
    if count > limit:
        raise ValidationError(f"{param}: at most {limit} choices per request "
                              f"(max_client_batch_size); asked for {count}", param=param)


def usage(prompts: list[Prepared], completion_tokens: list[int]) -> out.Usage:
    """Each prompt counts once, however many choices it has; every choice's tokens count."""
    prompt_tokens = sum(p.input_length for p in prompts)
    completion = sum(completion_tokens)
    return out.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion,
                     total_tokens=prompt_tokens + completion)


def top_logprob(state: RouterState, token_id: int, logprob: float) -> out.TopLogprob:
    return out.TopLogprob(token=state.tokenizer.token_text(token_id),
                          logprob=streaming.logprob(logprob),
                          bytes=state.tokenizer.token_bytes(token_id))


def chat_logprobs(state: RouterState, tokens: list[streaming.Token]) -> out.ChatLogprobs:
    return out.ChatLogprobs(content=[
        out.TokenLogprob(**top_logprob(state, t.id, t.logprob).model_dump(),
                         top_logprobs=[top_logprob(state, i, lp) for i, lp in t.top])
        for t in tokens])


async def models(request: Request) -> Response:
    state: RouterState = request.app.state.router
    return streaming.json_response(out.ModelList(object="list", data=[
        out.Model(id=state.model_name, object="model", created=state.started_at,
                  owned_by="sluice", max_model_len=state.limits.max_total_tokens)]))
