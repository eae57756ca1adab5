"""OpenAI's API: /v1/chat/completions, /v1/completions (both may stream), /v1/models."""

from __future__ import annotations

import time
import uuid

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from router import streaming
from router.errors import RouterError, ValidationError
from router.schemas import ChatCompletionRequest, CompletionRequest, parse
from router.state import RouterState
from router.validation import Prepared, prepare, sampling

# TGI's finish reasons in OpenAI's words.
FINISH = {"length": "length", "eos_token": "stop", "stop_sequence": "stop",
          "content_filter": "content_filter"}


def _sampling(body):
    if body.n != 1:
        raise ValidationError("n must be 1: several choices per request are not supported",
                              param="n")
    return sampling(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                    repetition_penalty=body.repetition_penalty,
                    frequency_penalty=body.frequency_penalty,
                    presence_penalty=body.presence_penalty, seed=body.seed)


async def _prepare_chat(state: RouterState, body: ChatCompletionRequest) -> Prepared:
    params, seed = _sampling(body)
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    prompt = state.tokenizer.render_chat(messages, add_generation_prompt=True)
    # The template already wrote any special tokens the model expects.
    input_ids = await state.encode(prompt, add_special_tokens=False)
    top_n = (body.top_logprobs or 0) if body.logprobs else 0
    return prepare(state.limits, input_ids,
                   max_new_tokens=body.max_completion_tokens or body.max_tokens,
                   sampling_params=params, seed=seed, stop=body.stop_list(), top_n_tokens=top_n,
                   ignore_eos=body.ignore_eos)


async def _prepare_completion(state: RouterState, body: CompletionRequest) -> Prepared:
    params, seed = _sampling(body)
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if len(prompts) != 1:
        raise ValidationError("prompt must be one string (a list of exactly one)", param="prompt")
    input_ids = await state.encode(prompts[0])
    return prepare(state.limits, input_ids, max_new_tokens=body.max_tokens,
                   sampling_params=params, seed=seed, stop=body.stop_list(),
                   top_n_tokens=body.logprobs or 0, ignore_eos=body.ignore_eos)


def _usage(prepared: Prepared, finish: streaming.Finish) -> dict:
    return {"prompt_tokens": prepared.input_length,
            "completion_tokens": finish.generated_tokens,
            "total_tokens": prepared.input_length + finish.generated_tokens}


def _chat_logprobs(state: RouterState, tokens: list[streaming.Token]) -> dict:
    def entry(token_id: int, logprob: float) -> dict:
        text = state.tokenizer.token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [entry(t.id, t.logprob) | {"top_logprobs": [entry(i, lp) for i, lp in t.top]}
                        for t in tokens]}


def _completion_logprobs(state: RouterState, tokens: list[streaming.Token]) -> dict:
    text = state.tokenizer.token_text
    return {"tokens": [text(t.id) for t in tokens],
            "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [{text(i): lp for i, lp in t.top} for t in tokens],
            "text_offset": []}


async def chat_completions(request: Request) -> Response:
    state: RouterState = request.app.state.router
    body = parse(ChatCompletionRequest, await request.body())
    prepared = await _prepare_chat(state, body)
    gen = await state.admit(request, prepared)
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()),
            "model": state.model_name}
    if body.stream:
        return streaming.sse_response(_chat_events(state, body, prepared, gen, head), gen)
    tokens, finish = await streaming.unless_disconnected(
        request, gen, streaming.collect(state.tokenizer, gen, prepared.stop))
    return JSONResponse(head | {
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": finish.text},
                     "logprobs": _chat_logprobs(state, tokens) if body.logprobs else None,
                     "finish_reason": FINISH[finish.reason]}],
        "usage": _usage(prepared, finish),
    })


async def _chat_events(state, body, prepared, gen, head):
    chunk = head | {"object": "chat.completion.chunk"}
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def choice(delta: dict, finish_reason=None, logprobs=None) -> dict:
        return chunk | {"choices": [{"index": 0, "delta": delta, "logprobs": logprobs,
                                     "finish_reason": finish_reason}]}

    try:
        yield streaming.sse(choice({"role": "assistant", "content": ""}))
        async for token in streaming.run(state.tokenizer, gen, prepared.stop):
            logprobs = _chat_logprobs(state, [token]) if body.logprobs else None
            if token.text or logprobs:
                yield streaming.sse(choice({"content": token.text}, logprobs=logprobs))
            if token.finish is not None:
                yield streaming.sse(choice({}, FINISH[token.finish.reason]))
                if include_usage:
                    yield streaming.sse(chunk | {"choices": [],
                                                 "usage": _usage(prepared, token.finish)})
    except RouterError as exc:  # headers are sent: the error travels as an event
        yield streaming.sse(exc.openai_body())
    yield "data: [DONE]\n\n"


async def completions(request: Request) -> Response:
    state: RouterState = request.app.state.router
    body = parse(CompletionRequest, await request.body())
    prepared = await _prepare_completion(state, body)
    gen = await state.admit(request, prepared)
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
            "created": int(time.time()), "model": state.model_name}
    prefix = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
    if body.stream:
        return streaming.sse_response(_completion_events(state, body, prepared, gen, head,
                                                         prefix), gen)
    tokens, finish = await streaming.unless_disconnected(
        request, gen, streaming.collect(state.tokenizer, gen, prepared.stop))
    return JSONResponse(head | {
        "choices": [{"index": 0, "text": (prefix if body.echo else "") + finish.text,
                     "logprobs": (_completion_logprobs(state, tokens)
                                  if body.logprobs is not None else None),
                     "finish_reason": FINISH[finish.reason]}],
        "usage": _usage(prepared, finish),
    })


async def _completion_events(state, body, prepared, gen, head, prefix):
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def choice(text: str, finish_reason=None, logprobs=None) -> dict:
        return head | {"choices": [{"index": 0, "text": text, "logprobs": logprobs,
                                    "finish_reason": finish_reason}]}

    try:
        if body.echo:
            yield streaming.sse(choice(prefix))
        async for token in streaming.run(state.tokenizer, gen, prepared.stop):
            logprobs = (_completion_logprobs(state, [token])
                        if body.logprobs is not None else None)
            finish = FINISH[token.finish.reason] if token.finish is not None else None
            if token.text or logprobs or finish:
                yield streaming.sse(choice(token.text, finish, logprobs))
            if token.finish is not None and include_usage:
                yield streaming.sse(head | {"choices": [],
                                            "usage": _usage(prepared, token.finish)})
    except RouterError as exc:
        yield streaming.sse(exc.openai_body())
    yield "data: [DONE]\n\n"


async def models(request: Request) -> Response:
    state: RouterState = request.app.state.router
    return JSONResponse({"object": "list", "data": [
        {"id": state.model_name, "object": "model", "created": state.started_at,
         "owned_by": "sluice", "max_model_len": state.limits.max_total_tokens}]})
