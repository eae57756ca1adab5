#!/usr/bin/env bash
# Runs on the lent GPU machine (docs/benchmarks.md says how it is called): installs the wheels
# carried in .whl (and the cutlass cu13 libraries unpacked earlier into /tmp/cu13x), then runs
# the named steps (the step_* functions below). Output for the record goes to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
# A folder named site-packages: quack (a FlashAttention-4 dependency) fingerprints the code its
# GEMM epilogues call, and takes only code under site-packages for installed library code.
SITE=/tmp/py/site-packages
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
# The targets' models (random weights of the shipped configs) and workloads (issue 5's).
M1="--model benchmarks/configs/llama-3.2-1b --load-format dummy"
M8="--model benchmarks/configs/llama-3.1-8b --load-format dummy"
B1="--num-requests 1 --input-len 512 --output-len 128"
B128="--num-requests 128 --input-len 512 --output-len 128"
B256="--num-requests 256 --input-len 512 --output-len 128"
MIXED="--num-requests 512 --mixed"

setup() {
  if [ ! -f $SITE/.installed ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $SITE \
      .whl/*.whl || exit 1
    # Our other requirements, from wheels in .whl/deps: pip installs only those this image lacks
    # or has too old (benchmarks/gpu_wheels.py downloads them).
    python3 -m pip install -q --no-index --find-links .whl/deps --break-system-packages \
      $(python3 benchmarks/gpu_wheels.py requirements) || exit 1
    if [ -d /tmp/cu13x ]; then cp -r /tmp/cu13x/. $SITE/; fi
    touch $SITE/.installed
  fi
  export PYTHONPATH=$PWD:$SITE:$SITE/nvidia_cutlass_dsl/dsl_packages
  export PYTHONUNBUFFERED=1
}

step_env() {
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  python3 - <<'PY'
import torch, google.protobuf, grpc, transformers
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(),
      "sm", torch.cuda.get_device_capability(), "protobuf", google.protobuf.__version__,
      "grpc", grpc.__version__, "transformers", transformers.__version__)
try:
    import flash_attn.cute as fa
    print("flash_attn.cute OK", getattr(fa, "__version__", "?"))
except Exception as exc:
    print("flash_attn.cute FAILED:", repr(exc)[:400])
from shard.attention import flash_unavailable
print("flash backend:", flash_unavailable(torch.device("cuda")) or "available")
PY
}

step_tests() {
  python3 -m pytest shard/tests/test_attention_cuda.py shard/tests/test_engine_cuda.py \
    shard/tests/test_triton_kernels.py shard/tests/test_fused_mlp_cuda.py \
    shard/tests/test_decode_gemm_cuda.py -q \
    -p no:cacheprovider 2>&1 | tee "$OUT/gpu-tests.log" | tail -25
}

offline() {  # offline NAME ARGS...: one run, its JSON in $OUT/NAME.json
  local name=$1; shift
  echo "== $name: $*"
  timeout 420 python3 benchmarks/offline.py --json-out "$OUT/$name.json" "$@" 2>&1 \
    | grep -v " INFO " | tail -8
}

step_offline_1b() {
  offline 1b-b1 $M1 $B1
  offline 1b-b256 $M1 $B256
  offline 1b-mixed $M1 $MIXED
  offline 1b-b1-nographs $M1 $B1 --cuda-graphs 0
}

step_offline_1b_chunks() {  # 1,024-token chunks, and the piecewise graphs' share
  offline 1b-b256-chunk1024 $M1 $B256 --max-batch-prefill-tokens 1024
  offline 1b-b256-chunk1024-nopiecewise $M1 $B256 \
    --max-batch-prefill-tokens 1024 --cuda-graph-tokens 0
  offline 1b-b1-nopiecewise $M1 $B1 --cuda-graph-tokens 0
}

step_offline_8b() {
  offline 8b-b1 $M8 $B1
  offline 8b-b128 $M8 $B128 --repeat 3
}

step_offline_1b_b256() {  # the median of 3 runs: its steps with prefill vary by up to ~7%
  offline 1b-b256 $M1 $B256 --repeat 3
}

step_large_buckets() {  # piecewise graphs up to 4,352 tokens: the 4,096-token mixed steps too
  local sizes=16,32,64,128,256,384,512,640,768,896,1024,1280,1536,1792,2048,2560,3072,3584,4096,4352
  offline 1b-b256-buckets4352 $M1 $B256 --cuda-graph-tokens $sizes
  offline 8b-b128-buckets4352 $M8 $B128 --cuda-graph-tokens $sizes
}

step_engine_tests() {
  python3 -m pytest shard/tests/test_engine_cuda.py -q -p no:cacheprovider 2>&1 \
    | tee "$OUT/gpu-engine-tests.log" | tail -3
}

step_targets() {  # the workloads still short of their targets, and the mixed one
  step_offline_1b_b256
  offline 1b-mixed $M1 $MIXED
  offline 8b-b128 $M8 $B128 --repeat 3
}

rotary_run() {  # rotary_run 8b|1b fused|separate: that model's target with --fused-rotary on|off
  local flag=on; [ "$2" = separate ] && flag=off
  case $1 in
    8b) offline 8b-b128-$2 $M8 $B128 --repeat 3 --fused-rotary $flag ;;
    1b) offline 1b-b256-$2 $M1 $B256 --repeat 3 --fused-rotary $flag ;;
  esac
}

step_fused_ab() {  # the targets with rotary and the cache write as separate kernels again
  rotary_run 8b separate; rotary_run 1b separate
}

step_fused_ab_swapped() {  # the same A/B, the separate kernels first this time
  rotary_run 8b separate; rotary_run 8b fused; rotary_run 1b separate; rotary_run 1b fused
}

step_triton_decode() {  # our decode kernel's block / warps / stages at the targets' batches
  local cfgs=64/4/3,128/4/3,64/4/4,64/8/3,128/8/3,32/4/4,64/2/3,128/4/4,256/8/3
  python3 benchmarks/decode_attention.py --batch 120 --head-dim 128 --block-sizes 16 --tiles "" \
    --triton $cfgs 2>&1 | grep -v Warn | tee "$OUT/triton-decode-8b.txt"
  python3 benchmarks/decode_attention.py --batch 224 --head-dim 64 --block-sizes 16 --tiles "" \
    --triton $cfgs 2>&1 | grep -v Warn | tee "$OUT/triton-decode-1b.txt"
}

step_final() {  # the seventh session's last call: every target on the H200 and 8B serving
  offline 1b-b1 $M1 $B1
  offline 1b-b256 $M1 $B256 --repeat 3
  offline 1b-mixed $M1 $MIXED
  offline 8b-b128 $M8 $B128 --repeat 3
  serve llama-3.1-8b default 64
}

step_final8() {  # the eighth session's record: the batch targets with 16,384-token prompt steps
  offline 1b-b256 $M1 $B256 --repeat 3
  offline 1b-mixed $M1 $MIXED
  offline 8b-b128 $M8 $B128 --repeat 3
}

step_final9() {  # the ninth session's record: final8, with the 8B run's clocks sampled
  offline 1b-b256 $M1 $B256 --repeat 3
  offline 1b-mixed $M1 $MIXED
  clocks 8b-b128 offline 8b-b128 $M8 $B128 \
    --repeat 3
}

step_final10() {  # the tenth session's record: every offline target, the sized gate/up included
  offline 8b-b128 $M8 $B128 --repeat 3
  offline 1b-b256 $M1 $B256 --repeat 3
  offline 1b-mixed $M1 $MIXED --repeat 3 --slowest-steps 2
  offline 8b-b1 $M8 $B1
  offline 1b-b1 $M1 $B1
}

step_final11() {  # the eleventh session's record: every offline target, --decode-gemm included
  timeout 120 python3 -m pytest -q -p no:cacheprovider \
    "shard/tests/test_engine_cuda.py::test_a_steps_integer_tensors_reach_the_gpu_16_byte_aligned" \
    2>&1 | tail -2
  offline 1b-mixed $M1 $MIXED --repeat 3 --slowest-steps 3
  offline 8b-b128 $M8 $B128 --repeat 3
  offline 1b-b256 $M1 $B256 --repeat 3
  offline 8b-b1 $M8 $B1
  offline 1b-b1 $M1 $B1
}

step_b1_check() {  # the 1B at batch 1, --decode-gemm on and off (host-bound: per-step overhead)
  offline 1b-b1-on $M1 $B1 --repeat 3
  offline 1b-b1-off $M1 $B1 --repeat 3 --decode-gemm off
}

step_target8b() {  # the 8B batch target alone
  offline 8b-b128 $M8 $B128 --repeat 3
}

step_first_run() {  # the first-run effect: 1B mixed, 3 runs; slowest steps, what each built
  offline 1b-mixed-first $M1 $MIXED --repeat 3 --slowest-steps 3
}

step_quack_new_rows() {  # the fused gate/up's host cost at row counts new to the process
  timeout 200 python3 benchmarks/fused_mlp.py --new-rows --hidden 2048 --intermediate 8192 \
    --tokens 16477,16537,16595,4096,4097 2>&1 | grep -v Warning | tee "$OUT/quack-new-rows-1b.txt"
}

step_serving64() {  # 8B serving at the target's 64 streams
  serve llama-3.1-8b default 64
}

step_torch_backend() {  # the torch backend's tests, then its old and new decode path on the 1B
  python3 -m pytest shard/tests/test_engine_cuda.py -q -p no:cacheprovider 2>&1 \
    | tee "$OUT/gpu-engine-tests.log" | tail -3
  python3 -m pytest shard/tests/test_attention_cuda.py -k torch -q -p no:cacheprovider 2>&1 \
    | tee "$OUT/gpu-attention-torch-tests.log" | tail -3
  offline 1b-b256-torch $M1 $B256 --attention torch
  offline 1b-b256-torch-gathered $M1 $B256 \
    --attention torch --decode-attention flash --cuda-graph-tokens 0
}

step_decode_ab() {  # the same runs with FA4 for decode rows: what the Triton kernel buys
  offline 1b-b256-fa4decode $M1 $B256 --decode-attention flash
  offline 8b-b128-fa4decode $M8 $B128 --decode-attention flash
}

step_mixed_ab() {  # 1B mixed steps (192 decodes + a 4,096-token chunk), Triton or FA4 decode rows
  profile 1b-mixed-b192-4000-triton $M1 --phase mixed --batch 192 --chunk 4000 --steps 10
  profile 1b-mixed-b192-4000-fa4 $M1 --phase mixed --batch 192 --chunk 4000 --steps 10 \
    --decode-attention flash
}

step_reference() {  # transformers generate() on the same shapes, the same GPU
  for m in llama-3.1-8b llama-3.2-1b; do
    offline ref-$m-b1 --model benchmarks/configs/$m --reference transformers \
      --num-requests 1 --batch 1 --input-len 512 --output-len 128
  done
  offline ref-llama-3.1-8b-b128 --model benchmarks/configs/llama-3.1-8b --reference transformers \
    --num-requests 128 --batch 128 --input-len 512 --output-len 128
  offline ref-llama-3.2-1b-b128 --model benchmarks/configs/llama-3.2-1b --reference transformers \
    --num-requests 256 --batch 128 --input-len 512 --output-len 128
}

profile() {  # profile NAME ARGS...: where one engine step's time goes
  echo "== profile $1"; local name=$1; shift
  timeout 300 python3 benchmarks/profile_step.py "$@" > "$OUT/profile-$name.txt" 2>&1
  grep -v " INFO " "$OUT/profile-$name.txt" | grep -E "^==|Self CUDA time total|Traceback|Error" | tail -4
}

step_profile() {
  profile 1b-decode-b1 $M1 --phase decode --batch 1 --input-len 512
  profile 1b-decode-b64 $M1 --phase decode --batch 64 --input-len 512
  profile 1b-prefill-4x1024 $M1 --phase prefill --batch 4 --input-len 1024 --steps 10
  profile 8b-decode-b1 $M8 --phase decode --batch 1 --input-len 512
}

step_profile_mixed() {  # a steady decode batch plus one prompt chunk per step
  profile 1b-mixed-b192-1024 $M1 --phase mixed --batch 192 --chunk 1024 --steps 10
  profile 1b-mixed-b192-4000 $M1 --phase mixed --batch 192 --chunk 4000 --steps 10
  profile 1b-prefill-4x1024 $M1 --phase prefill --batch 4 --input-len 1024 --steps 10
}

step_attention() {  # FA4's paged decode kernel alone, per tile shape and page size
  python3 benchmarks/decode_attention.py --batch 128 --head-dim 128 2>&1 \
    | tee "$OUT/attention-8b.txt"
  python3 benchmarks/decode_attention.py --batch 256 --head-dim 64 \
    --tiles default,64x128,128x128,64x64 2>&1 | tee "$OUT/attention-1b.txt"
}

step_attention_small() {  # the same at small batches: where the 64-row tile stops paying
  for b in 1 8 16; do
    for d in 128 64; do
      python3 benchmarks/decode_attention.py --batch $b --head-dim $d --block-sizes 16 \
        --tiles default,64x128 2>&1 | grep -v Warn | grep -v exe_args
    done
  done | tee "$OUT/attention-small.txt"
}

step_kernels() {  # decode attention, FA4 against our Triton kernel; the decode step's GEMMs
  python3 benchmarks/decode_attention.py --batch 128 --head-dim 128 --tiles 64x128 \
    2>&1 | grep -v Warn | tee "$OUT/kernels-attention-8b.txt"
  python3 benchmarks/decode_attention.py --batch 256 --head-dim 64 --tiles 64x128 \
    2>&1 | grep -v Warn | tee "$OUT/kernels-attention-1b.txt"
  for b in 1 16 64; do
    python3 benchmarks/decode_attention.py --batch $b --head-dim 128 --block-sizes 16 \
      --tiles 64x128 --triton 64/4/3,32/4/3,64/4/4 2>&1 | grep -v Warn
  done | tee "$OUT/kernels-attention-small.txt"
  python3 benchmarks/decode_gemm.py --config benchmarks/configs/llama-3.1-8b --batches 1,64,128,256 \
    2>&1 | tee "$OUT/kernels-gemm-8b.txt"
  python3 benchmarks/decode_gemm.py --config benchmarks/configs/llama-3.2-1b --batches 1,64,128,256 \
    2>&1 | tee "$OUT/kernels-gemm-1b.txt"
}

step_gemm() {  # the linear layers alone, at decode batches and at a mixed step's row count
  python3 benchmarks/decode_gemm.py --config benchmarks/configs/llama-3.1-8b \
    --batches 1,128,4224 2>&1 | tee "$OUT/gemm-8b.txt"
  python3 benchmarks/decode_gemm.py --config benchmarks/configs/llama-3.2-1b \
    --batches 1,256,4352 2>&1 | tee "$OUT/gemm-1b.txt"
}

step_probe8b() {  # the 8B target's two halves: GEMM rate by row count, a decode step's timeline
  python3 benchmarks/decode_gemm.py --config benchmarks/configs/llama-3.1-8b --blas cublas \
    --batches 4096,4224,8192,8320,16384 2>&1 | tee "$OUT/gemm-8b-rows.txt"
  step_timeline8b
}

step_timeline8b() {  # a steady batch-128 decode step: kernels and idle gaps, graph alone
  profile 8b-decode-b128-timeline $M8 \
    --phase decode --batch 128 --input-len 576 --steps 20 --timeline
  grep -E "^!!" "$OUT/profile-8b-decode-b128-timeline.txt"
  grep -A45 -- "-- timeline" "$OUT/profile-8b-decode-b128-timeline.txt"
}

step_autotune8b() {  # Triton's GEMM templates against cuBLAS at a decode and two prefill sizes
  python3 benchmarks/decode_gemm.py --config benchmarks/configs/llama-3.1-8b \
    --blas cublas,inductor --batches 128,4224,16384 > "$OUT/gemm-8b-autotune.txt" 2>&1
  grep -E "^  (cublas|inductor)|AUTOTUNE|^  *(triton|mm|bias|_mm)" "$OUT/gemm-8b-autotune.txt" \
    | head -80
}

step_splitk8b() {  # the decode step's products in order, some split along K (ninth session)
  python3 benchmarks/decode_gemm.py --config benchmarks/configs/llama-3.1-8b --chain \
    --batches 128 --blas cublas,cublaslt \
    --split-k ";o2;o4;qkv2;qkv4;down2;down4;gate_up2;qkv2,o4,down2;qkv4,o4,down4" 2>&1 \
    | tee "$OUT/gemm-8b-splitk.txt"
}

clocks() {  # clocks NAME CMD...: CMD with the GPU's clocks and power sampled every 50 ms
  local name=$1; shift
  nvidia-smi --query-gpu=clocks.sm,clocks.mem,power.draw,utilization.gpu,clocks_event_reasons.active \
    --format=csv,noheader,nounits -lms 50 > "$OUT/clocks-$name.csv" &
  local smi=$!
  "$@"
  kill $smi; wait $smi 2>/dev/null
  python3 - "$OUT/clocks-$name.csv" <<'PY'
import collections, statistics, sys
rows = [[f.strip() for f in line.split(",")] for line in open(sys.argv[1]) if line.count(",") == 4]
busy = [r for r in rows if r[3].isdigit() and int(r[3]) >= 50]
if busy:
    sm = sorted(int(r[0]) for r in busy)
    watts = sorted(float(r[2]) for r in busy)
    print(f"   {len(busy)} busy samples of {len(rows)}: SM clock MHz min {sm[0]} median "
          f"{statistics.median(sm)} max {sm[-1]}; power W median {statistics.median(watts):.0f} "
          f"max {watts[-1]:.0f}; reasons {dict(collections.Counter(r[4] for r in busy))}")
PY
}

step_clocks8b() {  # are the products slower under sustained load, and what are the clocks then?
  local c="python3 benchmarks/decode_gemm.py --config benchmarks/configs/llama-3.1-8b --chain
    --batches 128 --blas cublas --split-k none"
  clocks chain-short $c --replays 5
  clocks chain-long $c --replays 400
  local a="python3 benchmarks/decode_attention.py --batch 128 --head-dim 128 --context 640
    --block-sizes 16 --tiles , --triton 64/4/3"
  clocks attention-short $a --iters 50
  clocks attention-long $a --iters 20000
  clocks 8b-target offline 8b-b128-clocks $M8 $B128
}

step_fusedmlp() {  # the MLP with SiLU x up and the residual add in quack's GEMM epilogues
  timeout 500 python3 benchmarks/fused_mlp.py --tokens 128,4096,16384 2>&1 | grep -v Warning \
    | tee "$OUT/fused-mlp.txt"
}

step_crossover() {  # the fused MLP against cuBLAS + SiLU x up by row count; 8B, then 1B shapes
  timeout 280 python3 benchmarks/fused_mlp.py --tokens 1001,256,512,1024,2048 2>&1 \
    | grep -v Warning | tee "$OUT/fused-mlp-8b-rows.txt"
  timeout 200 python3 benchmarks/fused_mlp.py --tokens 256,512,1024,2048,4096 --hidden 2048 \
    --intermediate 8192 --layers 16 2>&1 | grep -v Warning | tee "$OUT/fused-mlp-1b-rows.txt"
}

step_decode_mlp() {  # gate/up + SiLU at decode batches: cuBLAS, quack's default, pinned tiles
  local c=128x192p/1x1,128x208p/1x1,128x160p/1x1,128x128p/1x1,128x224c/1x1,128x256c/1x1
  c=$c,128x224c/1x2,128x192p/1x2,64x256p/2x1,64x128p/2x1,64x256p/1x1,64x192p/1x1
  timeout 250 python3 benchmarks/fused_mlp.py --tokens 128,256,64,16,1 --layers 32 \
    --configs $c 2>&1 | grep -v Warning | tee "$OUT/decode-mlp-8b.txt"
  timeout 200 python3 benchmarks/fused_mlp.py --tokens 256,128,64 --hidden 2048 \
    --intermediate 8192 --layers 16 --configs $c 2>&1 | grep -v Warning \
    | tee "$OUT/decode-mlp-1b.txt"
}

step_sized_mlp() {  # the shard's sized configuration against cuBLAS and quack's default by rows
  timeout 200 python3 benchmarks/fused_mlp.py --tokens 80,96,112,128,192,256,384,512,768,1024 \
    --layers 32 --configs sized 2>&1 | grep -v Warning | tee "$OUT/sized-mlp-8b.txt"
  timeout 150 python3 benchmarks/fused_mlp.py --tokens 64,80,96,128,192,256,512,1024 \
    --hidden 2048 --intermediate 8192 --layers 16 --configs sized 2>&1 | grep -v Warning \
    | tee "$OUT/sized-mlp-1b.txt"
}

step_sized_partial() {  # the sized configuration where the last 128-row tile is partly filled
  timeout 150 python3 benchmarks/fused_mlp.py --tokens 136,160,192,224,240,256,320,448 \
    --layers 32 --configs sized 2>&1 | grep -v Warning | tee "$OUT/sized-partial-8b.txt"
}

step_quack_decode() {  # a decode step's other products (m=128) through quack, split-K in-kernel
  timeout 300 python3 benchmarks/decode_gemm.py --config benchmarks/configs/llama-3.1-8b --chain \
    --batches 128 --blas cublas,quack,quack-parallel \
    --split-k "none;qkv2;o2;down2;qkv4;o4;down4" 2>&1 | grep -v Warning \
    | tee "$OUT/quack-decode-8b.txt"
}

step_quack_pinned() {  # QKV, O, down at m=128 through quack pinned to small tiles, one at a time
  local v="none;o=64x64p/2x1;o=128x32p/1x1;o=64x64p/1x1;qkv=64x96p/2x1;qkv=128x48p/1x1"
  v="$v;down=64x64p/2x1;down=128x32p/1x1;down=64x64p/1x1"
  timeout 400 python3 benchmarks/decode_gemm.py --config benchmarks/configs/llama-3.1-8b \
    --chain --batches 128 --quack-configs "$v" 2>&1 | grep -v Warning \
    | tee "$OUT/quack-pinned-8b.txt"
}

step_quack_pinned2() {  # 64-row tiles in 2 x 1 clusters for QKV, O, down: together, by rows, 1B
  local all="o=64x64p/2x1,qkv=64x96p/2x1,down=64x64p/2x1"
  local v="none;$all;o=64x32p/2x1;qkv=64x64p/2x1;down=64x32p/2x1;down=64x128p/2x1"
  timeout 300 python3 benchmarks/decode_gemm.py --config benchmarks/configs/llama-3.1-8b \
    --chain --batches 128,112,96 --quack-configs "$v" 2>&1 | grep -v Warning \
    | tee "$OUT/quack-pinned2-8b.txt"
  v="none;o=64x32p/2x1,qkv=64x48p/2x1,down=64x32p/2x1;o=64x32p/2x1;qkv=64x48p/2x1"
  v="$v;down=64x32p/2x1;down=64x64p/2x1;o=64x64p/2x1"
  timeout 200 python3 benchmarks/decode_gemm.py --config benchmarks/configs/llama-3.2-1b \
    --chain --batches 128 --quack-configs "$v" 2>&1 | grep -v Warning \
    | tee "$OUT/quack-pinned2-1b.txt"
}

step_decode_gemm_ab() {  # the batch targets with --decode-gemm off and on, same call
  for f in off on; do
    offline 8b-b128-gemm-$f $M8 $B128 --repeat 3 --decode-gemm $f
  done
  for f in on off; do
    offline 1b-mixed-gemm-$f $M1 $MIXED --repeat 3 --decode-gemm $f
  done
}

step_rows_ab() {  # the batch targets with --last-layer-rows all and sampled, same call
  for r in all sampled; do
    offline 8b-b128-rows-$r $M8 $B128 --repeat 3 --last-layer-rows $r
  done
  for r in sampled all; do
    offline 1b-mixed-rows-$r $M1 $MIXED --repeat 3 --last-layer-rows $r
  done
}

step_first_run8b() {  # the 8B target's runs, with the slowest steps of each and what they built
  offline 8b-b128-first $M8 $B128 --repeat 3 --slowest-steps 3
}

step_first_run_eager() {  # the first-run effect with every CUDA module loaded at start
  CUDA_MODULE_LOADING=EAGER offline 1b-mixed-first-eager $M1 $MIXED --repeat 3 --slowest-steps 3
}

step_final12() {  # the twelfth session's record: every offline target
  offline 8b-b128 $M8 $B128 --repeat 3
  offline 1b-b256 $M1 $B256 --repeat 3
  offline 1b-mixed $M1 $MIXED --repeat 3 --slowest-steps 3
  offline 8b-b1 $M8 $B1
  offline 1b-b1 $M1 $B1 --repeat 3
}

step_sized_mlp_ab() {  # the batch targets, the fused gate/up from 1,024 rows (before) and 96
  for r in 1024 96; do
    offline 8b-b128-rows$r $M8 $B128 --repeat 3 --fused-mlp-rows $r
  done
  for r in 96 1024; do
    offline 1b-b256-rows$r $M1 $B256 --repeat 3 --fused-mlp-rows $r
  done
}

step_fused_mlp_ab() {  # the batch targets with --fused-mlp off and on (the default), same call
  for f in off on; do
    offline 8b-b128-mlp-$f $M8 $B128 --repeat 3 --fused-mlp $f
  done
  for f in on off; do
    offline 1b-b256-mlp-$f $M1 $B256 --repeat 3 --fused-mlp $f
    offline 1b-mixed-mlp-$f $M1 $MIXED --fused-mlp $f
  done
}

step_fused_mlp_mixed() {  # the 1B mixed workload, 3 runs each, --fused-mlp off then on
  for f in off on; do
    offline 1b-mixed3-mlp-$f $M1 $MIXED --repeat 3 --slowest-steps 2 --fused-mlp $f
  done
}

step_chunks8b() {  # the 8B target with prompt steps of 4,096 (the server's default), 8,192, 16,384 tokens
  for t in 4096 8192 16384; do
    offline 8b-b128-chunk$t $M8 $B128 --repeat 3 --max-batch-prefill-tokens $t
  done
}

step_profile_decode8b() {
  profile 8b-decode-b128 $M8 --phase decode --batch 128 --input-len 576 --steps 20
}

step_elementwise() {  # the compiled elementwise stages alone, 1B and 8B prefill shapes
  python3 benchmarks/elementwise.py 2>&1 | grep -v Warning | tee "$OUT/elementwise-1b.txt"
  python3 benchmarks/elementwise.py --hidden 4096 --head-dim 128 --intermediate 14336 2>&1 \
    | grep -v Warning | tee "$OUT/elementwise-8b.txt"
}

step_profile_decode8b_eager() {  # the same without graphs: the kernel table holds there
  profile 8b-decode-b128-eager $M8 \
    --phase decode --batch 128 --input-len 576 --steps 20 --cuda-graphs 0
  grep -v " INFO " "$OUT/profile-8b-decode-b128-eager.txt" | grep -A40 "Self CUDA" | head -45
}

step_profile_decode256() {
  profile 1b-decode-b256 $M1 --phase decode --batch 256 --input-len 576 --steps 20
}

serve() {  # serve CONFIG NAME STREAMS... [-- SHARD FLAGS]: one server, a run per stream count
  local model=$1 name=$2; shift 2
  local streams=() flags=()
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do streams+=("$1"); shift; done
  [ $# -gt 0 ] && shift && flags=("$@")
  python3 -m sluice serve --port 8080 --model benchmarks/configs/$model \
    --load-format dummy "${flags[@]}" > "$OUT/serve-$model-$name.log" 2>&1 &
  local pid=$!
  for _ in $(seq 300); do
    grep -q '"service": "serve"' "$OUT/serve-$model-$name.log" && break; sleep 1
  done
  local router; router=$(pgrep -f -- "-m router --host" | head -1)
  for c in "${streams[@]}"; do
    echo "== serving $model ($name), $c concurrent streams"
    local before; before=$(awk '{print $14 + $15}' /proc/$router/stat)
    python3 benchmarks/serving.py --num-prompts $((c * 8)) --max-concurrency $c \
      --input-len 512 --output-len 128 --json-out "$OUT/serving-$model-$name-c$c.json"
    echo "  router CPU        $(( $(awk '{print $14 + $15}' /proc/$router/stat) - before )) ticks of 1/$(getconf CLK_TCK) s"
  done
  kill -TERM $pid; wait $pid
  grep -h "steps beside decodes" "$OUT/serve-$model-$name.log" | cut -c80-400
  grep -E '"level": "ERROR"|Traceback' "$OUT/serve-$model-$name.log" | head -5
}

step_serving() {
  serve llama-3.1-8b default 1 16 64 128
}

step_serving_unbounded() {  # every step may take a whole 4,096-token chunk, as before
  serve llama-3.1-8b unbounded 64 -- --prefill-chunk-ms 0
}

step_serving_1b() {  # a model whose engine outruns one router process
  serve llama-3.2-1b default 64 128
}

step_serving_1b_64() {  # the router's ceiling at one stream count, on the least device time
  serve llama-3.2-1b default 64
}

step_serving_chunked() {  # smaller prefill chunks: shorter stalls for the running streams
  serve llama-3.1-8b prefill1024 64 -- --max-batch-prefill-tokens 1024 --prefill-chunk-ms 0
}

setup
for step in "$@"; do
  echo "######## $step"
  "step_$step"
done
