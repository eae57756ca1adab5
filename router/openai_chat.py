"""POST /v1/chat/completions: the model's chat template, n choices, optionally streamed."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from router import openai_responses as out
from router import streaming
from router.errors import RouterError
from router.openai_api import FINISH, Head, chat_logprobs, check_choices, sampling_params, usage
from router.schemas import ChatCompletionRequest, parse
from router.request import Run
from router.state import RouterState
from router.validation import Prepared, choices, prepare


async def _prepare(state: RouterState, body: ChatCompletionRequest) -> Prepared:
    check_choices(state, body.n, "n")
    params, seed = sampling_params(body)
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    prompt = state.tokenizer.render_chat(messages, add_generation_prompt=True)
    # The template already wrote any special tokens the model expects.
    input_ids = await state.encode(prompt, add_special_tokens=False)
    top_n = (body.top_logprobs or 0) if body.logprobs else 0
    return prepare(state.limits, input_ids,
                   max_new_tokens=body.max_completion_tokens or body.max_tokens,
                   sampling_params=params, seed=seed, stop=body.stop_list(), top_n_tokens=top_n,
                   ignore_eos=body.ignore_eos)


async def chat_completions(request: Request) -> Response:
    state: RouterState = request.app.state.router
    body = parse(ChatCompletionRequest, await request.body())
    prepared = await _prepare(state, body)
    runs = choices(prepared, body.n)
    generation = await state.admit(request, runs)
    gens = generation.runs
    head = Head.new("chatcmpl", state)
    if body.stream:
        return streaming.sse_response(_events(state, body, prepared, runs, gens, head),
                                      generation)
    results = await streaming.unless_disconnected(request, generation, streaming.collect_all(
        state.tokenizer, gens, [run.stop for run in runs]))
    return streaming.json_response(out.ChatCompletion(
        **head.fields(), object="chat.completion",
        choices=[out.ChatChoice(
            index=i, message=out.AssistantMessage(role="assistant", content=finish.text),
            logprobs=chat_logprobs(state, tokens) if body.logprobs else None,
            finish_reason=FINISH[finish.reason]) for i, (tokens, finish) in enumerate(results)],
        usage=usage([prepared], [finish.generated_tokens for _, finish in results])))


async def _events(state: RouterState, body: ChatCompletionRequest, prepared: Prepared,
                  runs: list[Prepared], gens: list[Run], head: Head):
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def model(index: int, delta: out.Delta, finish_reason=None,
              logprobs=None) -> out.ChatCompletionChunk:
        return out.ChatCompletionChunk(
            **head.fields(), object="chat.completion.chunk", choices=[out.ChunkChoice(
                index=index, delta=delta, logprobs=logprobs, finish_reason=finish_reason)])

    def chunk(index: int, delta: out.Delta, finish_reason=None, logprobs=None) -> str:
        return streaming.sse(model(index, delta, finish_reason, logprobs))

    texts = streaming.TextEvents(lambda index, text: model(index, out.Delta(content=text)))

    try:
        for index in range(len(runs)):
            yield chunk(index, out.Delta(role="assistant", content=""))
        generated = [0] * len(runs)
        async for index, batch in streaming.batches(state.tokenizer, gens,
                                                    [run.stop for run in runs]):
            events = []  # one write for the batch
            for token in batch:
                logprobs = chat_logprobs(state, [token]) if body.logprobs else None
                if logprobs:
                    events.append(chunk(index, out.Delta(content=token.text), logprobs=logprobs))
                elif token.text:
                    events.append(texts(index, token.text))
                if token.finish is not None:
                    generated[index] = token.finish.generated_tokens
                    events.append(chunk(index, out.Delta(), FINISH[token.finish.reason]))
            if events:
                yield "".join(events)
        if include_usage:
            yield streaming.sse(out.ChatCompletionChunk(
                **head.fields(), object="chat.completion.chunk", choices=[],
                usage=usage([prepared], generated)))
    except RouterError as exc:  # headers are sent: the error travels as an event
        yield streaming.sse(exc.openai_body())
    yield "data: [DONE]\n\n"
