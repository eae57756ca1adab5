"""One model at one rank against N ranks: greedy tokens and logprobs, prompt by prompt.

    python benchmarks/tp_compare.py --ranks 2 --prompts 8 --new-tokens 64 \\
        -- --model benchmarks/configs/llama-3.1-8b --load-format dummy

Starts `sluice shard` at --num-shard 1, sends the prompts (random ids, seed 0) greedily with
their top-5 alternatives, stops it, then does the same at --num-shard N (on a GPU machine each
run has the GPUs to itself). Reports, per prompt, how many generated tokens agree before the
first divergence and, at a divergence, the gap between one rank's two likeliest tokens there
(a near-tie explains a divergence: ranks sum their partial products in another order), and the
largest difference of the first step's top-5 logprobs. --json-out writes every figure.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading

import grpc

from sluice.serve import Child
from sluice.v1 import generate_pb2 as pb
from sluice.v1 import generate_pb2_grpc as pb_grpc

TOP_N = 5
STARTUP_TIMEOUT_S = 1200  # a large model's first start compiles and captures for minutes


def start(shard_argv: list[str], ranks: int) -> tuple[Child, str]:
    """`sluice shard` at `ranks` ranks (it dies with this script) and its address."""
    child = Child(f"shard at {ranks} rank(s)", [sys.executable, "-m", "sluice", "shard", "--port",
                                                "0", "--num-shard", str(ranks), *shard_argv])
    try:
        return child, child.wait_ready(STARTUP_TIMEOUT_S)["address"]
    except RuntimeError as exc:
        child.stop(120)
        raise SystemExit(str(exc)) from exc


def generate(address: str, prompts: list[list[int]], new_tokens: int) -> list[dict]:
    requests = [pb.Request(id=i + 1, input_ids=p, sampling=pb.SamplingParameters(),
                           stopping=pb.StoppingParameters(max_new_tokens=new_tokens,
                                                          ignore_eos=True),
                           top_n_tokens=TOP_N) for i, p in enumerate(prompts)]
    out = {r.id: {"tokens": [], "logprobs": [], "top_ids": [], "top_logprobs": []}
           for r in requests}
    done, finished = threading.Event(), 0

    def outgoing():
        yield pb.GenerateRequest(batch=pb.Batch(requests=requests))
        done.wait(3600)

    with grpc.insecure_channel(address) as channel:
        for response in pb_grpc.TextGenerationStub(channel).Generate(outgoing()):
            if response.errors:
                raise SystemExit(f"refused: {response.errors[0].message}")
            t = response.tokens
            for i, request_id in enumerate(t.ids):
                r = out[request_id]
                r["tokens"].append(t.token_ids[i])
                r["logprobs"].append(t.logprobs[i])
                r["top_ids"].append(list(t.top_n_token_ids[TOP_N * i:TOP_N * (i + 1)]))
                r["top_logprobs"].append(list(t.top_n_logprobs[TOP_N * i:TOP_N * (i + 1)]))
                finished += t.finish_reasons[i] != pb.FINISH_REASON_NONE
            if finished == len(requests):
                done.set()
                break
    return [out[r.id] for r in requests]


def compare(one: dict, several: dict) -> dict:
    agree = next((i for i, (a, b) in enumerate(zip(one["tokens"], several["tokens"])) if a != b),
                 len(one["tokens"]))
    gap = None
    if agree < len(one["tokens"]):  # one rank's margin between its two likeliest tokens there
        top = one["top_logprobs"][agree]
        gap = top[0] - top[1]
    first = max(abs(a - b) for a, b in zip(one["top_logprobs"][0], several["top_logprobs"][0]))
    return {"agreeing_tokens": agree, "divergence_top2_gap": gap,
            "first_step_top5_max_abs_diff": first}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=32000,
                        help="prompt ids are drawn below this")
    parser.add_argument("--json-out")
    args, shard_argv = parser.parse_known_args()
    shard_argv = [a for a in shard_argv if a != "--"]
    rng = random.Random(0)
    prompts = [[rng.randrange(3, args.vocab) for _ in range(args.prompt_len)]
               for _ in range(args.prompts)]
    runs = {}
    for ranks in (1, args.ranks):
        child, address = start(shard_argv, ranks)
        try:
            runs[ranks] = generate(address, prompts, args.new_tokens)
        finally:
            child.stop(120)
    rows = [compare(a, b) for a, b in zip(runs[1], runs[args.ranks])]
    total = sum(r["agreeing_tokens"] for r in rows)
    print(f"{args.ranks} ranks against 1: {total} of {args.prompts * args.new_tokens} greedy "
          f"tokens agree before each prompt's first divergence")
    for i, r in enumerate(rows):
        gap = r["divergence_top2_gap"]
        print(f"  prompt {i}: {r['agreeing_tokens']:3d} agree"
              + (f", then diverge where the top two were {gap:.4f} apart" if gap is not None
                 else "") + f"; first step's top-5 logprobs within "
              f"{r['first_step_top5_max_abs_diff']:.2e}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"ranks": args.ranks, "prompts": rows}, f, indent=1)


if __name__ == "__main__":
    main()
