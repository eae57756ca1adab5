"""TGI's API: POST /generate, POST /generate_stream (SSE), POST / (either, by `stream`)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from router import streaming
from router.errors import RouterError, ValidationError
from router.schemas import TGIParameters, TGIRequest, parse
from router.state import RouterState
from router.validation import Prepared, prepare, sampling


async def _prepare(state: RouterState, body: TGIRequest) -> Prepared:
    p = body.parameters
    if p.best_of is not None and p.best_of > 1:
        raise ValidationError("best_of > 1 is not supported", param="best_of")
    if p.watermark:
        raise ValidationError("watermark is not supported", param="watermark")
    if p.adapter_id:
        raise ValidationError("adapter_id: LoRA adapters are not supported", param="adapter_id")
    if p.decoder_input_details:
        raise ValidationError("decoder_input_details is not supported yet",
                              param="decoder_input_details")
    input_ids = await state.encode(body.inputs)
    params, seed = sampling(
        temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, typical_p=p.typical_p,
        repetition_penalty=p.repetition_penalty, frequency_penalty=p.frequency_penalty,
        seed=p.seed, do_sample=p.do_sample, greedy_by_default=True)
    return prepare(state.limits, input_ids, max_new_tokens=p.max_new_tokens,
                   sampling_params=params, seed=seed, stop=p.stop,
                   top_n_tokens=p.top_n_tokens or 0, truncate=p.truncate)


def _token(state: RouterState, token_id: int, text: str, logprob: float) -> dict:
    return {"id": token_id, "text": text, "logprob": logprob,
            "special": state.tokenizer.is_special(token_id)}


def _top_tokens(state: RouterState, token: streaming.Token) -> list[dict]:
    return [_token(state, i, state.tokenizer.token_text(i), lp) for i, lp in token.top]


def _full_text(params: TGIParameters, body: TGIRequest, text: str) -> str:
    return body.inputs + text if params.return_full_text else text


async def _generate(request: Request, state: RouterState, body: TGIRequest) -> dict:
    prepared = await _prepare(state, body)
    gen = await state.admit(request, prepared)
    tokens, finish = await streaming.unless_disconnected(
        request, gen, streaming.collect(state.tokenizer, gen, prepared.stop))
    p = body.parameters
    answer = {"generated_text": _full_text(p, body, finish.text)}
    if p.details:
        answer["details"] = {
            "finish_reason": finish.reason,
            "generated_tokens": finish.generated_tokens,
            "seed": prepared.seed,
            "prefill": [],
            "tokens": [_token(state, t.id, t.text, t.logprob) for t in tokens],
            "top_tokens": [_top_tokens(state, t) for t in tokens] if p.top_n_tokens else None,
        }
    return answer


async def _stream(request: Request, state: RouterState, body: TGIRequest) -> Response:
    prepared = await _prepare(state, body)
    gen = await state.admit(request, prepared)
    p = body.parameters

    async def events():
        try:
            index = 0
            async for token in streaming.run(state.tokenizer, gen, prepared.stop):
                index += 1
                event = {"index": index, "token": _token(state, token.id, token.text, token.logprob),
                         "top_tokens": _top_tokens(state, token), "generated_text": None,
                         "details": None}
                if token.finish is not None:
                    event["generated_text"] = _full_text(p, body, token.finish.text)
                    if p.details:
                        event["details"] = {
                            "finish_reason": token.finish.reason,
                            "generated_tokens": token.finish.generated_tokens,
                            "seed": prepared.seed, "input_length": prepared.input_length}
                yield streaming.sse(event)
        except RouterError as exc:  # headers are sent: the error travels as the last event
            yield streaming.sse(exc.tgi_body())

    return streaming.sse_response(events(), gen)


async def generate(request: Request) -> Response:
    state: RouterState = request.app.state.router
    body = parse(TGIRequest, await request.body())
    return JSONResponse(await _generate(request, state, body))


async def generate_stream(request: Request) -> Response:
    state: RouterState = request.app.state.router
    return await _stream(request, state, parse(TGIRequest, await request.body()))


async def compat_generate(request: Request) -> Response:
    """POST /: a stream when `stream` is true, else a one-element list (as TGI answers)."""
    state: RouterState = request.app.state.router
    body = parse(TGIRequest, await request.body())
    if body.stream:
        return await _stream(request, state, body)
    return JSONResponse([await _generate(request, state, body)])
