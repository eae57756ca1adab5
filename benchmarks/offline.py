"""Offline throughput: a fixed set of requests through the engine, in-process (no HTTP, no gRPC).

Prints output tokens/s, the time split between steps with prefill and decode-only steps, and
beside it the workload's floor: its prefill FLOPs over the measured matmul rate plus the bytes
its decode steps must read (weights + KV cache) over the measured copy bandwidth. Both rates
are measured in a short burst; on CUDA the same floor is printed again at the rates held for a
second, where the board's power limit has lowered the clocks (information only: the targets
are against the burst floor).

Run as a batch job: prompt steps of 16,384 tokens and no bound on the steps beside decodes,
unless --max-batch-prefill-tokens or --prefill-chunk-ms is given (the server's defaults, 4,096
and 40 ms, are for streams waiting on their tokens).

    python benchmarks/offline.py --model benchmarks/configs/llama-3.2-1b --load-format dummy \\
        --num-requests 256 --input-len 512 --output-len 128
    python benchmarks/offline.py ... --mixed        # inputs 32..1024, outputs 16..512, seed 0
    python benchmarks/offline.py ... --repeat 3     # the same requests 3 times: the median run
    python benchmarks/offline.py ... --reference transformers --batch 64

Flags this script does not know go to the shard unchanged (`sluice shard --help`).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from shard import config as shard_config, fused_mlp  # noqa: E402
from shard.engine import Stream  # noqa: E402
from shard.kv_cache import bytes_per_token  # noqa: E402
from shard.sampling import SamplingParams  # noqa: E402
from shard.scheduler import Sequence  # noqa: E402
from shard import server as shard_server  # noqa: E402
from shard.server import Started  # noqa: E402


OFFLINE_PREFILL_TOKENS = 16384


@dataclass
class Workload:
    input_lens: list[int]
    output_lens: list[int]

    @classmethod
    def build(cls, args) -> "Workload":
        gen = torch.Generator().manual_seed(args.seed)
        n = args.num_requests
        if args.mixed:
            return cls(torch.randint(32, 1025, (n,), generator=gen).tolist(),
                       torch.randint(16, 513, (n,), generator=gen).tolist())
        return cls([args.input_len] * n, [args.output_len] * n)


@dataclass
class Ceilings:
    copy_bytes_per_s: float  # bytes read + written per second
    matmul_flops_per_s: float
    # The same two held back to back (CUDA, when asked): the rates once the board's power limit
    # has brought the clocks down, as it does within a second of a long run (docs/benchmarks.md).
    sustained_copy_bytes_per_s: float | None = None
    sustained_matmul_flops_per_s: float | None = None

    def sustained(self) -> "Ceilings | None":
        if self.sustained_matmul_flops_per_s is None:
            return None
        return Ceilings(self.sustained_copy_bytes_per_s, self.sustained_matmul_flops_per_s)


SUSTAIN_S = 1.0  # how long offline.py holds each ceiling's operation before timing it again


def measure_ceilings(device: torch.device, dtype: torch.dtype, sustain_s: float = 0.0
                     ) -> Ceilings:
    """A large device-to-device copy and a large matrix product, as METHOD.md asks: 10 calls
    each, a burst of ~10 ms. With sustain_s (CUDA), each is also run back to back for
    sustain_s, then timed over as long again."""
    size = 1 << 30 if device.type == "cuda" else 1 << 28
    src = torch.empty(size // 2, dtype=torch.float16, device=device).normal_()
    dst = torch.empty_like(src)
    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n * 2, n * 2, dtype=dtype, device=device)
    b = torch.randn(n * 2, n * 2, dtype=dtype, device=device)

    def timed(fn, repeat):
        fn()
        _sync(device)
        start = time.perf_counter()
        for _ in range(repeat):
            fn()
        _sync(device)
        return (time.perf_counter() - start) / repeat

    def copy():
        dst.copy_(src)

    def matmul():
        torch.mm(a, b)

    copy_s, matmul_s = timed(copy, 10), timed(matmul, 10)
    ceilings = Ceilings(2 * size / copy_s, 2 * (2 * n) ** 3 / matmul_s)
    if sustain_s and device.type == "cuda":
        held = []
        for fn, burst_s in ((copy, copy_s), (matmul, matmul_s)):
            calls = max(int(sustain_s / burst_s), 10)
            timed(fn, calls)  # the clocks settle under the power limit
            held.append(timed(fn, calls))
        ceilings.sustained_copy_bytes_per_s = 2 * size / held[0]
        ceilings.sustained_matmul_flops_per_s = 2 * (2 * n) ** 3 / held[1]
    return ceilings


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Floor:
    prefill_flops: float
    decode_bytes: float
    seconds: float
    batch1_decode_tokens_per_s: float  # (weights + KV of one sequence) per step, at the median


def floor(started: Started, work: Workload, ceilings: Ceilings, max_batch_size: int) -> Floor:
    """With N tensor-parallel ranks, each GPU (at the ceilings measured on this one) does 1/N
    of the work: the floor of N GPUs at this GPU's rates."""
    built = started.built
    cfg, ranks = built.loaded.config, built.group.world_size
    params = _full_parameters(cfg)  # a tied head counts once
    head = cfg.vocab_size * cfg.hidden_size
    layer_params = params - head * (1 if cfg.tie_word_embeddings else 2)
    # Prefill: every prompt token through the layers, causal attention (QK^T and PV over half
    # the square), and the head once per request.
    attention = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim
    prefill_flops = sum(2 * layer_params * i + attention * i * i / 2 + 2 * head
                        for i in work.input_lens)
    # Decode: each step reads the weights once and the KV cache of every sequence; at least
    # max(output) steps, and at most max_batch_size sequences per step.
    weight_bytes = decode_weight_bytes(cfg, built.dtype)
    steps = max(max(work.output_lens), math.ceil(sum(work.output_lens) / max_batch_size))
    kv_token = bytes_per_token(cfg, 1, built.dtype)
    kv_bytes = sum(kv_token * (o * i + o * (o - 1) / 2)
                   for i, o in zip(work.input_lens, work.output_lens))
    decode_bytes = steps * weight_bytes + kv_bytes
    seconds = (prefill_flops / ceilings.matmul_flops_per_s
               + decode_bytes / ceilings.copy_bytes_per_s) / ranks
    mid = sorted(work.input_lens)[len(work.input_lens) // 2]
    per_token = weight_bytes + kv_token * mid
    return Floor(prefill_flops, decode_bytes, seconds,
                 ranks * ceilings.copy_bytes_per_s / per_token)


def decode_weight_bytes(cfg, dtype: torch.dtype) -> int:
    """The weight bytes a decode step reads: the layers and the head once (the embedding only
    by rows: left out, unless it is the tied head)."""
    params = _full_parameters(cfg)  # a tied head counts once
    embedding = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size
    return (params - embedding) * dtype.itemsize


def _full_parameters(cfg) -> int:
    """The whole model's parameters (every rank's slices together; the head once if tied)."""
    h, d, inter = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * d
    layer = (h * qkv + cfg.num_heads * d * h + 3 * h * inter + 2 * h
             + qkv * cfg.qkv_bias + h * cfg.o_bias + (2 * inter + h) * cfg.mlp_bias)
    head = cfg.vocab_size * h
    return cfg.num_layers * layer + h + head * (1 if cfg.tie_word_embeddings else 2)


class _Count(Stream):
    def __init__(self):
        self.tokens = 0
        self.finished = 0

    def send(self, response) -> None:
        self.tokens += len(response.tokens.ids)
        self.finished += sum(1 for r in response.tokens.finish_reasons if r)


def run_engine(started: Started, work: Workload, seed: int, slowest: int = 0) -> dict:
    engine, vocab = started.engine, started.built.loaded.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    stream = _Count()
    sequences = [Sequence(request_id=i, stream=stream,
                          prompt=torch.randint(3, vocab, (n,), generator=gen),
                          sampling=SamplingParams(), max_new_tokens=o, ignore_eos=True)
                 for i, (n, o) in enumerate(zip(work.input_lens, work.output_lens))]
    engine.submit(stream, sequences)
    allocator_before = _allocator_counts(started.built.device)
    compiles_before = _compile_counts()
    prefill_s = decode_s = 0.0
    steps = prefill_steps = decode_rows = 0
    # (seconds, step index, decodes, prompt tokens, kernels first met in the step)
    timed: list[tuple[float, int, int, int, list[str]]] = []
    start = time.perf_counter()
    while stream.finished < len(sequences):
        jit_before = len(JIT_MET)
        t = time.perf_counter()
        engine.run_iteration()
        elapsed = time.perf_counter() - t
        plan = engine.last_step
        if plan is None:
            continue
        steps += 1
        rows = len(plan.decodes)
        if slowest:
            timed.append((elapsed, steps, rows, sum(n for _, n in plan.prefills),
                          JIT_MET[jit_before:]))
        if plan.prefills:
            prefill_s += elapsed
            prefill_steps += 1
        else:
            decode_s += elapsed
            decode_rows += rows
    total_s = time.perf_counter() - start
    decode_steps = steps - prefill_steps
    return {"seconds": total_s, "output_tokens": stream.tokens,
            "output_tokens_per_s": stream.tokens / total_s, "steps": steps,
            "steps_with_prefill": prefill_steps, "prefill_step_seconds": prefill_s,
            "decode_step_seconds": decode_s,
            "mean_decode_batch": decode_rows / max(decode_steps, 1),
            "decode_step_ms": 1000 * decode_s / max(decode_steps, 1),
            "slowest_steps": [{"ms": 1000 * t, "step": i, "decodes": d, "prompt_tokens": p,
                               "triton_kernels_met": met}
                              for t, i, d, p, met in sorted(timed, reverse=True)[:slowest]],
            # What the caching allocator had to do during the run, and what was compiled in
            # it: a first run slower than the next ones may be growing the allocator's pool
            # (CUDA only; else empty) or meeting kernel specializations warm-up did not.
            "allocator": {key: after - allocator_before[key]
                          for key, after in _allocator_counts(started.built.device).items()},
            "compiled": {key: after - compiles_before[key]
                         for key, after in _compile_counts().items()}}


# Triton kernels met in a specialization new to this process (compiled, or loaded from
# Triton's disk cache), in order; filled by the hook watch_triton_compiles installs.
JIT_MET: list[str] = []


def watch_triton_compiles() -> None:
    """Record in JIT_MET every Triton kernel launched with a specialization (argument types,
    integers' divisibility by 16, constexprs) that this process has not compiled yet."""
    try:
        import triton
        from triton.runtime.jit import JITFunction
    except ImportError:
        return

    def hook(*args, **kwargs) -> bool:
        JIT_MET.append(str(kwargs.get("repr", "?")).split("[")[0])
        return False  # True would skip the compilation

    runtime_knobs = getattr(getattr(triton, "knobs", None), "runtime", None)
    if runtime_knobs is not None and hasattr(runtime_knobs, "jit_cache_hook"):
        runtime_knobs.jit_cache_hook = hook  # Triton 3.4+
    else:
        JITFunction.cache_hook = hook


def _compile_counts() -> dict[str, int]:
    """Cumulative counts of what a step may have to build first: Triton specializations
    (JIT_MET), torch.compile frames, FlashAttention-4's compiled kernels, and quack's launch
    plans (keyed on the full shapes, so one per row count new to the process)."""
    from torch._dynamo.utils import counters

    counts = {"triton_kernels": len(JIT_MET), "dynamo_frames": counters["frames"]["ok"],
              "fa4_kernels": 0, "quack_plans": 0}
    fa4 = sys.modules.get("flash_attn.cute.interface")
    cache = getattr(getattr(fa4, "_flash_attn_fwd", None), "compile_cache", None)
    while cache is not None and not isinstance(cache, dict):  # JITCache wrappers hold a dict
        cache = getattr(cache, "cache", None)
    counts["fa4_kernels"] = len(cache or ())
    frontend = sys.modules.get("quack.epilogue.frontend")
    if frontend is not None:  # every epilogue module's plans (gc: outside the timed run)
        counts["quack_plans"] = sum(len(getattr(mod, "_plan_cache", ()))
                                    for mod in gc.get_objects()
                                    # type(): isinstance raises on a dead weak proxy
                                    if issubclass(type(mod), frontend.EpiMod))
    return counts


def _allocator_counts(device: torch.device) -> dict[str, int]:
    """The caching allocator's cumulative counters that a run can move: cudaMalloc'd segments,
    the bytes reserved, and the retries after a failed cudaMalloc (which free cached blocks)."""
    if device.type != "cuda":
        return {}
    stats = torch.cuda.memory_stats(device)
    return {"segments_allocated": stats.get("segment.all.allocated", 0),
            "reserved_bytes": stats.get("reserved_bytes.all.current", 0),
            "alloc_retries": stats.get("num_alloc_retries", 0)}


def run_transformers(folder: str, work: Workload, batch: int, device: torch.device,
                     dtype: torch.dtype, seed: int) -> dict:
    """transformers generate() on the same shapes, in static batches of `batch` requests, each
    generating to its batch's longest output (the useful tokens are what is counted)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                 attn_implementation="sdpa").eval()
    gen = torch.Generator().manual_seed(seed)
    pad = 0
    model.generation_config.pad_token_id = pad
    useful, start = 0, None
    for first in range(0, len(work.input_lens), batch):
        ins = work.input_lens[first:first + batch]
        outs = work.output_lens[first:first + batch]
        longest = max(ins)
        ids = torch.full((len(ins), longest), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, n in enumerate(ins):  # left padding, as generate() expects
            ids[row, longest - n:] = torch.randint(3, config.vocab_size, (n,), generator=gen)
            mask[row, longest - n:] = 1
        ids, mask = ids.to(device), mask.to(device)
        with torch.inference_mode():
            if start is None:  # warm up once on this batch's shape
                model.generate(ids, attention_mask=mask, max_new_tokens=2, min_new_tokens=2,
                               do_sample=False)
                _sync(device)
                start = time.perf_counter()
            model.generate(ids, attention_mask=mask, max_new_tokens=max(outs),
                           min_new_tokens=max(outs), do_sample=False)
        useful += sum(outs)
    _sync(device)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "output_tokens": useful, "output_tokens_per_s": useful / seconds,
            "batch": batch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-requests", type=int, default=128)
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--mixed", action="store_true",
                        help="inputs uniform in 32..1024, outputs uniform in 16..512")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reference", choices=["transformers"], default=None)
    parser.add_argument("--batch", type=int, default=64, help="reference static batch size")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run the workload this many times after one warm-up and report "
                             "the median run (steps with prefill vary by several % run to run)")
    parser.add_argument("--slowest-steps", type=int, default=0,
                        help="also print each run's N slowest steps and their shapes (a step "
                             "slow only in the first run points at work warm-up left undone; "
                             "with async scheduling a step's time includes waiting for the one "
                             "before it)")
    parser.add_argument("--fused-mlp-rows", type=int, default=None,
                        help="for A/B runs: the fewest rows whose gate/up takes the fused "
                             "product (shard.fused_mlp.MIN_ROWS; 1024 gives the ninth session's "
                             "prompt steps only)")
    parser.add_argument("--json-out", default=None)
    args, shard_argv = parser.parse_known_args()
    if args.fused_mlp_rows is not None:
        fused_mlp.MIN_ROWS = args.fused_mlp_rows
    # A batch job has no stream waiting for its next token: no bound on the steps beside
    # decodes, and prompt steps of 16,384 tokens, not the server's 4,096 (TGI's default, which
    # keeps a burst's first tokens coming early), unless asked; as vLLM's offline LLM class
    # takes a larger token budget than its server. Fewer, larger steps carry fewer decode rows
    # through compute-bound products (docs/benchmarks.md, the eighth session). The serving
    # benchmark runs the shard's defaults.
    for flag, value in (("--prefill-chunk-ms", "0"),
                        ("--max-batch-prefill-tokens", str(OFFLINE_PREFILL_TOKENS))):
        env = flag.removeprefix("--").replace("-", "_").upper()
        if not any(a.startswith(flag) for a in shard_argv) and env not in os.environ:
            shard_argv += [flag, value]
    work = Workload.build(args)
    config = shard_config.parse(shard_argv, os.environ)
    started = None
    if args.reference:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        result = run_transformers(config.model, work, args.batch, device, dtype, args.seed)
        runs = [result]
        label = f"transformers generate(), static batches of {args.batch}"
    else:
        watch_triton_compiles()
        started = shard_server.start(config, shard_argv)
        device, dtype = started.built.device, started.built.dtype
        runs = [run_engine(started, work, args.seed, args.slowest_steps)
                for _ in range(max(args.repeat, 1))]
        started.stop_ranks()
        result = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]
        label = (f"sluice engine ({started.built.attention.name} attention, "
                 f"{started.built.group.world_size} rank(s), cuda graphs "
                 f"{'on' if started.warm.runner.graphs.decode else 'off'}, max_batch_size "
                 f"{config.max_batch_size}, max_batch_prefill_tokens "
                 f"{config.max_batch_prefill_tokens}, steps beside decodes "
                 f"{started.info().prefill_chunk_tokens or 'unbounded'})")
    ceilings = measure_ceilings(device, dtype, SUSTAIN_S)
    report = {"workload": {"requests": args.num_requests, "mixed": args.mixed,
                           "input_tokens": sum(work.input_lens),
                           "output_tokens": sum(work.output_lens)},
              "label": label, "result": result, "ceilings": asdict(ceilings)}
    print(f"{label}: {args.num_requests} requests, "
          f"{'mixed lengths' if args.mixed else f'{args.input_len} in / {args.output_len} out'}")
    print(f"  output tokens/s   {result['output_tokens_per_s']:10.1f}   "
          f"({result['output_tokens']} tokens in {result['seconds']:.2f} s)")
    if len(runs) > 1:
        report["runs"] = runs
        print(f"  runs              {len(runs)}, the median above; tokens/s "
              + ", ".join(f"{r['output_tokens_per_s']:.0f}" for r in runs)
              + "; steps with prefill "
              + ", ".join(f"{r['prefill_step_seconds']:.2f}" for r in runs) + " s")
    for number, run in enumerate(runs if args.slowest_steps else [], 1):
        allocator, compiled = run["allocator"], run["compiled"]
        print(f"  run {number} slowest  " + "; ".join(
            f"#{s['step']} {s['ms']:.1f} ms ({s['decodes']} dec + {s['prompt_tokens']} tok"
            + (f"; met {', '.join(s['triton_kernels_met'])}" if s["triton_kernels_met"] else "")
            + ")" for s in run["slowest_steps"])
            + (f"; allocator: {allocator['segments_allocated']} new segments, "
               f"{allocator['reserved_bytes'] / 2**20:+.0f} MiB reserved, "
               f"{allocator['alloc_retries']} retries" if allocator else "")
            + f"; new: {compiled['triton_kernels']} Triton specializations, "
              f"{compiled['dynamo_frames']} torch.compile frames, {compiled['fa4_kernels']} FA4 "
              f"kernels, {compiled['quack_plans']} quack plans")
    if started is not None:
        print(f"  steps             {result['steps']} ({result['steps_with_prefill']} with "
              f"prefill: {result['prefill_step_seconds']:.2f} s; decode-only: "
              f"{result['decode_step_seconds']:.2f} s, {result['decode_step_ms']:.2f} ms/step at "
              f"a mean batch of {result['mean_decode_batch']:.1f})")
        # The floor at the burst ceilings (the targets'), then at the held ones where measured.
        floors = (("floor", "floor", ceilings),
                  ("floor_sustained", f"floor, held {SUSTAIN_S:.0f} s", ceilings.sustained()))
        for key, label, rates in floors:
            if rates is None:
                continue
            f = floor(started, work, rates, config.max_batch_size)
            report[key] = asdict(f)
            print(f"  {label:17s} {f.seconds:10.2f} s   (prefill {f.prefill_flops / 1e12:.1f} "
                  f"TFLOP at {rates.matmul_flops_per_s / 1e12:.0f} TFLOP/s + decode "
                  f"{f.decode_bytes / 1e9:.1f} GB at {rates.copy_bytes_per_s / 1e12:.2f} TB/s): "
                  f"{result['seconds'] / f.seconds:.2f}x the floor")
        roofline = report["floor"]["batch1_decode_tokens_per_s"]
        print(f"  batch-1 roofline  {roofline:10.1f} tok/s (weights + KV of "
              f"one sequence per step over the copy bandwidth)")
    if args.json_out:
        with open(args.json_out, "w") as out:
            json.dump(report, out, indent=2)


if __name__ == "__main__":
    main()
