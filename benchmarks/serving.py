"""Serving benchmark: Poisson arrivals through the HTTP API, as vLLM's benchmark_serving does.

Sends --num-prompts streamed /v1/completions requests (EOS ignored, greedy; or with
`--backend tgi`, TGI's /generate_stream) at --request-rate per second (inf: all at once) or
with a fixed --max-concurrency, and reports time to first token, inter-token latency and
end-to-end latency (p50, p99) and output tokens/s.

    python benchmarks/serving.py --base-url http://127.0.0.1:8080/v1 --num-prompts 256 \\
        --input-len 512 --output-len 128 --request-rate 8

Prompts are random lowercase words; with the byte-level stand-in tokenizer of
`--load-format dummy` one character is one token, so --input-len is exact there.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass, field

import aiohttp


@dataclass
class Outcome:
    ttft_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    e2e_s: float = 0.0
    output_tokens: int = 0
    prompt_tokens: int = 0
    error: str | None = None


def prompt_text(chars: int, rng: random.Random) -> str:
    words = []
    while sum(len(w) + 1 for w in words) - 1 < chars:  # the joined text: one space fewer
        words.append("".join(rng.choice("abcdefghijklmnopqrstuvwxyz")
                             for _ in range(rng.randint(2, 9))))
    return " ".join(words)[:chars]


def request_body(backend: str, model: str, prompt: str, max_tokens: int) -> dict:
    if backend == "tgi":  # TGI's API has no ignore_eos: a stream may end early at EOS
        return {"inputs": prompt, "parameters": {"max_new_tokens": max_tokens, "details": True}}
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}


def chunk_text(backend: str, chunk: dict) -> str:
    if backend == "tgi":
        return (chunk.get("token") or {}).get("text") or ""
    if not chunk.get("choices"):
        return ""
    return chunk["choices"][0].get("text") or ""


async def one_request(client: aiohttp.ClientSession, url: str, model: str, prompt: str,
                      max_tokens: int, backend: str = "openai") -> Outcome:
    outcome = Outcome()
    body = request_body(backend, model, prompt, max_tokens)
    start = last = time.perf_counter()
    try:
        async with client.post(url, json=body) as answer:
            if answer.status != 200:
                outcome.error = f"HTTP {answer.status}: {(await answer.read())[:200]!r}"
                return outcome
            async for line in answer.content:  # one SSE line at a time
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    outcome.error = str(chunk["error"])
                    return outcome
                if chunk.get("usage"):
                    outcome.output_tokens = chunk["usage"]["completion_tokens"]
                    outcome.prompt_tokens = chunk["usage"]["prompt_tokens"]
                if chunk.get("details"):  # TGI's last event
                    outcome.output_tokens = chunk["details"]["generated_tokens"]
                    outcome.prompt_tokens = chunk["details"]["input_length"]
                if chunk_text(backend, chunk):
                    now = time.perf_counter()
                    if outcome.ttft_s == 0.0:
                        outcome.ttft_s = now - start
                    else:
                        outcome.itl_s.append(now - last)
                    last = now
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        outcome.error = f"{type(exc).__name__}: {exc}"
    outcome.e2e_s = time.perf_counter() - start
    return outcome


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


async def run(args) -> dict:
    rng = random.Random(args.seed)
    # aiohttp, as vLLM's benchmark_serving: its C parser keeps the client's cost per token
    # well below the router's. httpx spent ~170 µs of CPU per token on the development
    # machine and, past 64 streams on the H100 host, read tokens in bursts that skewed the
    # inter-token figures.
    async with aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=args.timeout_s),
            connector=aiohttp.TCPConnector(limit=0), read_bufsize=2**18) as client:
        if args.model or args.backend == "tgi":
            model = args.model
        else:
            async with client.get(f"{args.base_url}/models") as listing:
                model = (await listing.json())["data"][0]["id"]
        prompts = [prompt_text(args.input_len, rng) for _ in range(args.num_prompts)]
        gate = asyncio.Semaphore(args.max_concurrency or args.num_prompts)

        url = args.base_url + ("/generate_stream" if args.backend == "tgi" else "/completions")

        async def limited(prompt):
            async with gate:
                return await one_request(client, url, model, prompt, args.output_len,
                                         args.backend)

        await one_request(client, url, model, prompts[0], 4, args.backend)  # warm
        tasks = []
        start = time.perf_counter()
        for prompt in prompts:
            tasks.append(asyncio.create_task(limited(prompt)))
            if args.request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(args.request_rate))
        outcomes = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    done = [o for o in outcomes if o.error is None]
    ms = 1000.0
    return {
        "requests": len(outcomes), "failed": len(outcomes) - len(done),
        "errors": sorted({o.error for o in outcomes if o.error})[:5],
        "duration_s": duration, "output_tokens": sum(o.output_tokens for o in done),
        "inter_token_intervals": sum(len(o.itl_s) for o in done),
        "output_tokens_per_s": sum(o.output_tokens for o in done) / duration,
        "mean_prompt_tokens": statistics.mean(o.prompt_tokens for o in done) if done else 0,
        "ttft_ms": {"p50": percentile([o.ttft_s for o in done], 50) * ms,
                    "p99": percentile([o.ttft_s for o in done], 99) * ms},
        "itl_ms": {"p50": percentile([x for o in done for x in o.itl_s], 50) * ms,
                   "p99": percentile([x for o in done for x in o.itl_s], 99) * ms},
        "e2e_ms": {"p50": percentile([o.e2e_s for o in done], 50) * ms,
                   "p99": percentile([o.e2e_s for o in done], 99) * ms},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", default="openai", choices=["openai", "tgi"],
                        help="openai: streamed /completions under --base-url; tgi: TGI's "
                             "/generate_stream under --base-url (the server's root)")
    parser.add_argument("--base-url", default="http://127.0.0.1:8080/v1")
    parser.add_argument("--model", default=None)
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--input-len", type=int, default=512, help="prompt length in characters")
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--request-rate", type=float, default=float("inf"),
                        help="Poisson arrivals per second; inf sends all at once")
    parser.add_argument("--max-concurrency", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout-s", type=float, default=600)
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args()
    result = asyncio.run(run(args))
    print(f"rate {args.request_rate}/s, concurrency {args.max_concurrency or 'unbounded'}: "
          f"{result['requests']} requests ({result['failed']} failed) in "
          f"{result['duration_s']:.1f} s, {result['output_tokens_per_s']:.0f} output tok/s")
    for name in ("ttft_ms", "itl_ms", "e2e_ms"):
        print(f"  {name[:-3]:5s} p50 {result[name]['p50']:9.1f} ms   p99 {result[name]['p99']:9.1f} ms")
    if result["errors"]:
        print("  errors:", result["errors"])
    if args.json_out:
        with open(args.json_out, "w") as out:
            json.dump(result | {"args": vars(args)}, out, indent=2)


if __name__ == "__main__":
    main()
