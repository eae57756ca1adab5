"""TGI's API: POST /generate, POST /generate_stream (SSE), POST / (either, by `stream`),
POST /tokenize."""

from __future__ import annotations

from json.encoder import encode_basestring

import pydantic_core
from starlette.requests import Request
from starlette.responses import Response

from router import streaming
from router import tgi_responses as out
from router.errors import RouterError, ValidationError
from router.schemas import TGIRequest, parse
from router.request import PromptScores, Run
from router.sse import SSEResponse
from router.state import RouterState
from router.validation import Prepared, choices, prepare, sampling


async def _prepare(state: RouterState, body: TGIRequest, stream: bool) -> list[Prepared]:
    """One Prepared per sequence to run: best_of of them, else one. TGI's rules and messages."""
    p = body.parameters
    if p.watermark:
        raise ValidationError("watermark is not supported", param="watermark")
    if p.adapter_id:
        raise ValidationError("adapter_id: LoRA adapters are not supported", param="adapter_id")
    if p.grammar is not None:
        raise ValidationError("grammar: guided generation is not supported", param="grammar")
    if p.decoder_input_details and stream:
        raise ValidationError("decoder_input_details == true is not supported when streaming "
                              "tokens", param="decoder_input_details")
    best_of = p.best_of or 1
    if best_of > 1:
        if stream:
            raise ValidationError("best_of > 1 is not supported when streaming",
                                  param="best_of")
        if best_of > state.config.max_best_of:
            raise ValidationError(f"best_of must be <= {state.config.max_best_of}; given: "
                                  f"{best_of}", param="best_of")
        if p.seed is not None:
            raise ValidationError("seed must not be set when best_of > 1", param="seed")
    input_ids = await state.encode(body.inputs)
    params, seed = sampling(
        temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, typical_p=p.typical_p,
        repetition_penalty=p.repetition_penalty, frequency_penalty=p.frequency_penalty,
        seed=p.seed, do_sample=p.do_sample, greedy_by_default=True)
    if best_of > 1 and seed is None:
        raise ValidationError("best_of > 1 needs sampling: set do_sample or a sampling "
                              "parameter (temperature, top_k, top_p, typical_p)", param="best_of")
    prepared = prepare(state.limits, input_ids, max_new_tokens=p.max_new_tokens,
                       sampling_params=params, seed=seed, stop=p.stop,
                       top_n_tokens=p.top_n_tokens or 0, truncate=p.truncate,
                       prefill_logprobs=p.decoder_input_details)
    return choices(prepared, best_of)


def _token(state: RouterState, token_id: int, text: str, logprob: float) -> out.Token:
    return out.Token(id=token_id, text=text, logprob=logprob,
                     special=state.tokenizer.is_special(token_id))


def _top_tokens(state: RouterState, token: streaming.Token) -> list[out.Token]:
    return [_token(state, i, state.tokenizer.token_text(i), lp) for i, lp in token.top]


def _prefill(state: RouterState, input_ids, scores: PromptScores | None) -> list[out.PrefillToken]:
    """The prompt's tokens; the first has no logprob (nothing precedes it), as in TGI."""
    text = state.tokenizer.token_text
    logprobs = [None] + (scores.logprobs if scores is not None else [None] * (len(input_ids) - 1))
    return [out.PrefillToken(id=i, text=text(i), logprob=lp) for i, lp in zip(input_ids, logprobs)]


def token_event(index: int, token: streaming.Token) -> str:
    """The SSE event of a token that neither ends the stream nor carries alternatives (nearly
    every event): out.StreamResponse's own JSON, written into its layout with the text escaped
    by json (as pydantic escapes it) and the logprob written by pydantic's serializer (1.3 µs
    per token against 2.8 for a dict through that serializer and 4.9 for the models, on the
    development machine; router/tests/test_streaming.py holds it equal to the models' JSON)."""
    return (f'data: {{"index":{index},"token":{{"id":{token.id},'
            f'"text":{encode_basestring(token.text)},'
            f'"logprob":{pydantic_core.to_json(token.logprob, inf_nan_mode="null").decode()},'
            f'"special":{"true" if token.special else "false"}}},'
            f'"top_tokens":[],"generated_text":null,"details":null}}\n\n')


def _full_text(body: TGIRequest, text: str) -> str:
    return body.inputs + text if body.parameters.return_full_text else text


def _sequence(state: RouterState, body: TGIRequest, run: Prepared, gen: Run,
              tokens: list[streaming.Token], finish: streaming.Finish) -> out.BestOfSequence:
    p = body.parameters
    sequence = out.BestOfSequence(
        generated_text=_full_text(body, finish.text), finish_reason=finish.reason,
        generated_tokens=finish.generated_tokens, seed=run.seed,
        prefill=(_prefill(state, run.request.input_ids, gen.prompt_scores)
                 if p.decoder_input_details else []),
        tokens=[_token(state, t.id, t.text, t.logprob) for t in tokens])
    if p.top_n_tokens:
        sequence.top_tokens = [_top_tokens(state, t) for t in tokens]
    return sequence


async def _generate(request: Request, state: RouterState, body: TGIRequest) -> out.GenerateResponse:
    runs = await _prepare(state, body, stream=False)
    tokenizer = state.tokenizer  # read before admission: nothing after it may fail
    generation = await state.admit(request, runs)
    gens = generation.runs
    results = await streaming.unless_disconnected(request, generation, streaming.collect_all(
        tokenizer, gens, [run.stop for run in runs]))
    sequences = [_sequence(state, body, run, gen, tokens, finish)
                 for run, gen, (tokens, finish) in zip(runs, gens, results)]
    # best_of: the sequence the model finds most likely overall, as TGI chooses.
    best = max(range(len(sequences)), key=lambda i: sum(t.logprob for t in results[i][0]))
    chosen = sequences[best]
    answer = out.GenerateResponse(generated_text=chosen.generated_text)
    if body.parameters.details:
        answer.details = out.Details(**chosen.model_dump(exclude={"generated_text"},
                                                         exclude_unset=True))
        if len(sequences) > 1:
            answer.details.best_of_sequences = [s for i, s in enumerate(sequences) if i != best]
    return answer


class _Events:
    """The stream's events (router/sse.py's EventSource): one per token, numbered from 1; the
    last carries the generated text (and the details when asked for)."""

    def __init__(self, state: RouterState, body: TGIRequest, run: Prepared):
        self._state, self._body, self._run = state, body, run
        self._sent = 0  # tokens so far

    def opening(self) -> str:
        return ""

    def tokens(self, index: int, batch: list[streaming.Token]) -> str:
        events = []
        for token in batch:
            self._sent += 1
            events.append(self._event(self._sent, token))
        return "".join(events)

    def _event(self, index: int, token: streaming.Token) -> str:
        if token.finish is None and not token.top:
            return token_event(index, token)
        state = self._state
        answer = out.StreamResponse(
            index=index, token=_token(state, token.id, token.text, token.logprob),
            top_tokens=_top_tokens(state, token), generated_text=None, details=None)
        if token.finish is not None:
            answer.generated_text = _full_text(self._body, token.finish.text)
            if self._body.parameters.details:
                answer.details = out.StreamDetails(
                    finish_reason=token.finish.reason,
                    generated_tokens=token.finish.generated_tokens,
                    seed=self._run.seed, input_length=self._run.input_length)
        return streaming.sse(answer)

    def closing(self) -> str:
        return ""

    def failed(self, error: RouterError) -> str:  # headers are sent: the last event
        return streaming.sse(error.tgi_body())


async def _stream(request: Request, state: RouterState, body: TGIRequest) -> Response:
    [run] = await _prepare(state, body, stream=True)
    tokenizer = state.tokenizer  # read before admission: nothing after it may fail
    generation = await state.admit(request, [run])
    return SSEResponse(generation, tokenizer, [run.stop], _Events(state, body, run))


async def generate(request: Request) -> Response:
    state: RouterState = request.app.state.router
    body = parse(TGIRequest, await request.body())
    return streaming.json_response(await _generate(request, state, body))


async def generate_stream(request: Request) -> Response:
    state: RouterState = request.app.state.router
    return await _stream(request, state, parse(TGIRequest, await request.body()))


async def compat_generate(request: Request) -> Response:
    """POST /: a stream when `stream` is true, else a one-element list (as TGI answers)."""
    state: RouterState = request.app.state.router
    body = parse(TGIRequest, await request.body())
    if body.stream:
        return await _stream(request, state, body)
    return streaming.json_response([await _generate(request, state, body)])


async def tokenize(request: Request) -> Response:
    """The prompt's tokens as /generate would see them (`truncate` applied), with offsets."""
    state: RouterState = request.app.state.router
    body = parse(TGIRequest, await request.body())
    ids, offsets = await state.encode_offsets(body.inputs)
    if body.parameters.truncate is not None:
        ids, offsets = ids[-body.parameters.truncate:], offsets[-body.parameters.truncate:]
    return streaming.json_response([
        out.SimpleToken(id=i, text=body.inputs[start:stop], start=start, stop=stop)
        for i, (start, stop) in zip(ids, offsets)])
