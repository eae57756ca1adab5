"""POST /v1/completions: one or several prompts (text or token ids), n choices each, `echo`,
legacy `logprobs`, optionally streamed. Choice `index` is prompt_index * n + j, as OpenAI's."""

from __future__ import annotations

from dataclasses import dataclass, field

from starlette.requests import Request
from starlette.responses import Response

from router import openai_responses as out
from router import streaming
from router.errors import RouterError, ValidationError
from router.openai_api import FINISH, Head, check_choices, sampling_params, usage
from router.schemas import CompletionRequest, parse
from router.request import Run
from router.sse import SSEResponse
from router.state import RouterState
from router.validation import Prepared, choices, prepare


@dataclass(slots=True)
class _Prompt:
    text: str  # what `echo` returns
    ids: list[int]
    starts: list[int]  # where each token starts in `text`


@dataclass(slots=True)
class _Choice:
    """One choice's text and legacy logprobs, as they grow."""

    text: str = ""
    logprobs: out.CompletionLogprobs = field(default_factory=lambda: out.CompletionLogprobs(
        tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[]))


async def _prompts(state: RouterState, body: CompletionRequest) -> list[_Prompt]:
    raw = body.prompt
    if isinstance(raw, str) or (raw and isinstance(raw[0], int)):
        raw = [raw]
    if not raw:
        raise ValidationError("prompt must not be an empty list", param="prompt")
    check_choices(state, len(raw) * body.n, "n")
    prompts = []
    for item in raw:
        if isinstance(item, str):
            ids, offsets = await state.encode_offsets(item)
            prompts.append(_Prompt(item, ids, [start for start, _ in offsets]))
        else:
            prompts.append(_decoded(state, item))
    return prompts


def _decoded(state: RouterState, ids: list[int]) -> _Prompt:
    """A prompt given as token ids: its text, decoded the way streaming decodes."""
    vocab = state.info.vocab_size
    if any(i >= vocab for i in ids):
        raise ValidationError(f"prompt: token ids must be below the vocabulary size ({vocab})",
                              param="prompt")
    stream = state.tokenizer.decode_stream(skip_special_tokens=False)
    text, starts = "", []
    for i in ids:
        starts.append(len(text))
        text += stream.step(state.tokenizer.tokenizer, i) or ""
    return _Prompt(text, list(ids), starts)


def _echo_logprobs(state: RouterState, prompt: _Prompt, gen: Run) -> _Choice:
    """The prompt's part of an echoed choice: its tokens, scored but for the first."""
    text = state.tokenizer.token_text
    scores = gen.prompt_scores
    choice = _Choice(text=prompt.text)
    lp = choice.logprobs
    lp.tokens = [text(i) for i in prompt.ids]
    lp.token_logprobs = [None] + [streaming.logprob(x) for x in scores.logprobs]
    lp.top_logprobs = [None] + [{text(i): streaming.logprob(x) for i, x in zip(ids, lps)}
                                for ids, lps in zip(scores.top_ids, scores.top_logprobs)]
    lp.text_offset = list(prompt.starts)
    return choice


def _add_token(state: RouterState, choice: _Choice, token: streaming.Token) -> None:
    lp = choice.logprobs
    lp.tokens.append(state.tokenizer.token_text(token.id))
    lp.token_logprobs.append(streaming.logprob(token.logprob))
    lp.top_logprobs.append({state.tokenizer.token_text(i): streaming.logprob(x)
                            for i, x in token.top})
    lp.text_offset.append(len(choice.text))
    choice.text += token.text


async def completions(request: Request) -> Response:
    state: RouterState = request.app.state.router
    body = parse(CompletionRequest, await request.body())
    prompts = await _prompts(state, body)
    params, seed = sampling_params(body)
    wants_logprobs = body.logprobs is not None
    prepared = [prepare(state.limits, p.ids, max_new_tokens=body.max_tokens,
                        sampling_params=params, seed=seed, stop=body.stop_list(),
                        top_n_tokens=body.logprobs or 0, ignore_eos=body.ignore_eos,
                        prefill_logprobs=body.echo and wants_logprobs) for p in prompts]
    runs = [run for p in prepared for run in choices(p, body.n)]
    run_prompts = [p for p in prompts for _ in range(body.n)]
    tokenizer = state.tokenizer  # read before admission: nothing after it may fail
    generation = await state.admit(request, runs)
    gens = generation.runs
    head = Head.new("cmpl", state)
    if body.stream:
        return SSEResponse(generation, tokenizer, [run.stop for run in runs],
                           _Events(state, body, prepared, run_prompts, gens, head))
    results = await streaming.unless_disconnected(request, generation, streaming.collect_all(
        tokenizer, gens, [run.stop for run in runs]))
    answer = []
    for index, (prompt, gen, (tokens, finish)) in enumerate(zip(run_prompts, gens, results)):
        choice = _start(state, body, prompt, gen)
        for token in tokens:
            _add_token(state, choice, token)
        answer.append(out.CompletionChoice(
            index=index, text=choice.text, logprobs=choice.logprobs if wants_logprobs else None,
            finish_reason=FINISH[finish.reason]))
    return streaming.json_response(out.Completion(
        **head.fields(), object="text_completion", choices=answer,
        usage=usage(prepared, [finish.generated_tokens for _, finish in results])))


def _start(state: RouterState, body: CompletionRequest, prompt: _Prompt,
           gen: Run) -> _Choice:
    """A choice before its first generated token: the echoed prompt, or nothing."""
    if not body.echo:
        return _Choice()
    if body.logprobs is not None:
        return _echo_logprobs(state, prompt, gen)
    return _Choice(text=prompt.text)


class _Events:
    """The stream's events (router/sse.py's EventSource): per choice, the echoed prompt with
    its first token, then its tokens; the usage when asked for; [DONE]."""

    def __init__(self, state: RouterState, body: CompletionRequest, prepared: list[Prepared],
                 prompts: list[_Prompt], gens: list[Run], head: Head):
        self._state, self._body, self._prepared = state, body, prepared
        self._prompts, self._gens, self._head = prompts, gens, head
        self._wants_logprobs = body.logprobs is not None
        self._choices: list[_Choice | None] = [None] * len(gens)
        self._generated = [0] * len(gens)
        self._texts = streaming.TextEvents(self._model)

    def _model(self, index: int, text: str, finish_reason=None, logprobs=None) -> out.Completion:
        return out.Completion(
            **self._head.fields(), object="text_completion", choices=[out.CompletionChoice(
                index=index, text=text, logprobs=logprobs, finish_reason=finish_reason)])

    def _chunk(self, index: int, text: str, finish_reason=None, logprobs=None) -> str:
        return streaming.sse(self._model(index, text, finish_reason, logprobs))

    def opening(self) -> str:
        return ""

    def tokens(self, index: int, batch: list[streaming.Token]) -> str:
        events = []  # one write for the batch
        choice = self._choices[index]
        if choice is None:  # the first token: the prompt's scores came with it
            choice = self._choices[index] = _start(self._state, self._body, self._prompts[index],
                                                   self._gens[index])
            if self._body.echo:
                events.append(self._chunk(index, choice.text, logprobs=(
                    choice.logprobs if self._wants_logprobs else None)))
        for token in batch:
            logprobs = None
            if self._wants_logprobs:  # the text so far only places each token's text_offset
                before = len(choice.logprobs.tokens)
                _add_token(self._state, choice, token)
                lp = choice.logprobs
                logprobs = out.CompletionLogprobs(
                    tokens=lp.tokens[before:], token_logprobs=lp.token_logprobs[before:],
                    top_logprobs=lp.top_logprobs[before:], text_offset=lp.text_offset[before:])
            finish = FINISH[token.finish.reason] if token.finish is not None else None
            if logprobs is not None or finish is not None:
                events.append(self._chunk(index, token.text, finish, logprobs))
            elif token.text:
                events.append(self._texts(index, token.text))
            if token.finish is not None:
                self._generated[index] = token.finish.generated_tokens
        return "".join(events)

    def closing(self) -> str:
        usage_event = ""
        if self._body.stream_options and self._body.stream_options.include_usage:
            usage_event = streaming.sse(out.Completion(
                **self._head.fields(), object="text_completion", choices=[],
                usage=usage(self._prepared, self._generated)))
        return usage_event + "data: [DONE]\n\n"

    def failed(self, error: RouterError) -> str:
        return streaming.sse(error.openai_body()) + "data: [DONE]\n\n"
