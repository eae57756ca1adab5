"""Scale-out benchmark: aggregate output tok/s with 1, 2, 3 shard groups behind one router.

For each group count it starts that many shard groups of one model on this machine's GPU (each
with a share of its memory), one router in front of them (--shard-uri each), streams
benchmarks/serving.py's load through the router's OpenAI route, and records the aggregate
output tok/s and the router's CPU per streamed token (every router process: with --workers the
parent and its workers, from /proc). Everything is stopped between group counts.

    python benchmarks/scaling.py --model benchmarks/configs/llama-3.2-1b --load-format dummy \\
        --groups 1,2,3 --streams 128 --num-prompts 1024 --input-len 128 --output-len 256

Several groups on one GPU share its memory: --memory-share (default 0.9 / the largest group
count) is each group's share. The k-th group started gets --cuda-memory-fraction k x share,
since a shard's fraction counts the memory other processes already hold (shard/budget.py), so
every group gets about the same KV budget; --budget-tokens gives each the same exact budget
instead. Flags this script does not know go to every shard unchanged (`sluice shard --help`).
Without a GPU it runs on the CPU (`--device cpu` among the shard flags), as a smoke test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from sluice.serve import Child

ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT_S = 1200


def start(argv: list[str], name: str) -> tuple[Child, str]:
    """A `python -m sluice ...` child (it dies with this script) and its ready line's address."""
    child = Child(name, [sys.executable, "-m", "sluice", *argv])
    try:
        return child, child.wait_ready(STARTUP_TIMEOUT_S)["address"]
    except RuntimeError:
        child.stop(60)
        raise


def cpu_ticks(pid: int) -> int:
    """utime + stime of `pid` and of its children (the router's workers)."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(entry.name) == pid or int(fields[1]) == pid:  # fields[1]: the parent's pid
            total += int(fields[11]) + int(fields[12])
    return total


def wait_ready_groups(url: str, count: int) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as answer:
                if json.load(answer).get("shard_groups_ready") == count:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the router did not see {count} ready groups")


def run(groups: int, args: argparse.Namespace, shard_flags: list[str]) -> dict:
    shards, router = [], None
    try:
        for k in range(1, groups + 1):
            flags = ["--model", args.model, "--host", "127.0.0.1", "--port", "0",
                     *shard_flags]
            if args.budget_tokens:
                flags += ["--max-batch-total-tokens", str(args.budget_tokens)]
            else:
                flags += ["--cuda-memory-fraction", f"{min(1.0, k * args.memory_share):.4f}"]
            shards.append(start(["shard", *flags], f"shard group {k}"))
        router_flags = ["router", "--port", "0", "--max-concurrent-requests",
                        str(max(128, 2 * args.streams))]
        if args.workers is not None:
            router_flags += ["--workers", str(args.workers)]
        for _, address in shards:
            router_flags += ["--shard-uri", address]
        router, address = start(router_flags, "router")
        url = f"http://{address}"
        wait_ready_groups(url, groups)
        if args.warmup_prompts:
            subprocess.run([sys.executable, str(ROOT / "benchmarks/serving.py"), "--base-url",
                            f"{url}/v1", "--num-prompts", str(args.warmup_prompts),
                            "--max-concurrency", str(args.streams), "--input-len",
                            str(args.input_len), "--output-len", "16"],
                           check=True, stdout=subprocess.DEVNULL)
        with tempfile.TemporaryDirectory() as folder:
            out = Path(folder) / "serving.json"
            before = cpu_ticks(router.process.pid)
            subprocess.run([sys.executable, str(ROOT / "benchmarks/serving.py"), "--base-url",
                            f"{url}/v1", "--num-prompts", str(args.num_prompts),
                            "--max-concurrency", str(args.streams), "--input-len",
                            str(args.input_len), "--output-len", str(args.output_len),
                            "--json-out", str(out)], check=True)
            used_s = (cpu_ticks(router.process.pid) - before) / os.sysconf("SC_CLK_TCK")
            result = json.loads(out.read_text())
        return {"groups": groups, "output_tok_s": result["output_tokens_per_s"],
                "output_tokens": result["output_tokens"], "failed": result["failed"],
                "ttft_p50_ms": result["ttft_ms"]["p50"], "itl_p50_ms": result["itl_ms"]["p50"],
                "router_cpu_s": used_s,
                "router_cpu_us_per_token": 1e6 * used_s / max(1, result["output_tokens"])}
    finally:
        for child in ([router] if router else []) + [child for child, _ in shards]:
            child.stop(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--model", required=True, help="what `sluice shard --model` takes")
    parser.add_argument("--groups", default="1,2,3", help="group counts to run, comma-separated")
    parser.add_argument("--memory-share", type=float, default=None,
                        help="each group's share of the GPU; default 0.9 / the largest count")
    parser.add_argument("--budget-tokens", type=int, default=None,
                        help="every group's KV budget in tokens, instead of memory shares")
    parser.add_argument("--workers", type=int, default=None,
                        help="the router's --workers (default: its own, the usable cores)")
    parser.add_argument("--streams", type=int, default=128, help="concurrent streams")
    parser.add_argument("--num-prompts", type=int, default=1024)
    parser.add_argument("--warmup-prompts", type=int, default=128,
                        help="short requests first, outside the measurement")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--json-out", default=None, help="write the rows as JSON here")
    args, shard_flags = parser.parse_known_args()
    counts = [int(c) for c in args.groups.split(",")]
    if args.memory_share is None:
        args.memory_share = 0.9 / max(counts)
    rows = [run(count, args, shard_flags) for count in counts]
    print("| groups | output tok/s | TTFT p50 | ITL p50 | router CPU per token |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['groups']} | {row['output_tok_s']:,.0f} | {row['ttft_p50_ms']:.0f} ms | "
              f"{row['itl_p50_ms']:.1f} ms | {row['router_cpu_us_per_token']:.0f} µs |")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
