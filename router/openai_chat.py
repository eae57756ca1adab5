"""POST /v1/chat/completions: the model's chat template, n choices, optionally streamed."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from router import openai_responses as out
from router import streaming
from router.errors import RouterError
from router.openai_api import FINISH, Head, chat_logprobs, check_choices, sampling_params, usage
from router.schemas import ChatCompletionRequest, parse
from router.sse import SSEResponse
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
    tokenizer = state.tokenizer  # read before admission: nothing after it may fail
    generation = await state.admit(request, runs)
    gens = generation.runs
    head = Head.new("chatcmpl", state)
    if body.stream:
        return SSEResponse(generation, tokenizer, [run.stop for run in runs],
                           _Events(state, body, prepared, len(runs), head))
    results = await streaming.unless_disconnected(request, generation, streaming.collect_all(
        tokenizer, gens, [run.stop for run in runs]))
    return streaming.json_response(out.ChatCompletion(
        **head.fields(), object="chat.completion",
        choices=[out.ChatChoice(
            index=i, message=out.AssistantMessage(role="assistant", content=finish.text),
            logprobs=chat_logprobs(state, tokens) if body.logprobs else None,
            finish_reason=FINISH[finish.reason]) for i, (tokens, finish) in enumerate(results)],
        usage=usage([prepared], [finish.generated_tokens for _, finish in results])))


class _Events:
    """The stream's events (router/sse.py's EventSource): each choice's role, its tokens and
    its finish reason; the usage when asked for; [DONE]."""

    def __init__(self, state: RouterState, body: ChatCompletionRequest, prepared: Prepared,
                 choices_: int, head: Head):
        self._state, self._body, self._prepared = state, body, prepared
        self._choices, self._head = choices_, head
        self._generated = [0] * choices_
        self._texts = streaming.TextEvents(
            lambda index, text: self._model(index, out.Delta(content=text)))

    def _model(self, index: int, delta: out.Delta, finish_reason=None,
               logprobs=None) -> out.ChatCompletionChunk:
        return out.ChatCompletionChunk(
            **self._head.fields(), object="chat.completion.chunk", choices=[out.ChunkChoice(
                index=index, delta=delta, logprobs=logprobs, finish_reason=finish_reason)])

    def _chunk(self, index: int, delta: out.Delta, finish_reason=None, logprobs=None) -> str:
        return streaming.sse(self._model(index, delta, finish_reason, logprobs))

    def opening(self) -> str:
        return "".join(self._chunk(index, out.Delta(role="assistant", content=""))
                       for index in range(self._choices))

    def tokens(self, index: int, batch: list[streaming.Token]) -> str:
        events = []  # one write for the batch
        for token in batch:
            logprobs = chat_logprobs(self._state, [token]) if self._body.logprobs else None
            if logprobs:
                events.append(self._chunk(index, out.Delta(content=token.text),
                                          logprobs=logprobs))
            elif token.text:
                events.append(self._texts(index, token.text))
            if token.finish is not None:
                self._generated[index] = token.finish.generated_tokens
                events.append(self._chunk(index, out.Delta(), FINISH[token.finish.reason]))
        return "".join(events)

    def closing(self) -> str:
        usage_event = ""
        if self._body.stream_options and self._body.stream_options.include_usage:
            usage_event = streaming.sse(out.ChatCompletionChunk(
                **self._head.fields(), object="chat.completion.chunk", choices=[],
                usage=usage([self._prepared], self._generated)))
        return usage_event + "data: [DONE]\n\n"

    def failed(self, error: RouterError) -> str:  # headers are sent: the error is an event
        return streaming.sse(error.openai_body()) + "data: [DONE]\n\n"
