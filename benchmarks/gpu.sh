#!/usr/bin/env bash
# The GPU suite (H100 or H200): the GPU tests and every figure of docs/benchmarks.md.
#
#   bash benchmarks/gpu.sh STEP...     e.g. tests targets serving reference
#
# Steps: env, tests, targets (the five offline workloads), serving (8B at 64 streams), reference
# (transformers generate() on the same shapes), and the probes the results page cites: clocks
# (the 8B batch run's clocks and power), timeline (a steady 8B decode step's kernels),
# timeline_b1 (the same at batch 1, 8B and 1B), prefill (512-token prompt steps), gemv
# (shard/gemv.py's kernels in every configuration against cuBLAS), small_batch (batch 1 of both
# shapes, --gemv and --pdl on and off), curve (the 8B's decode steps at batches 1-16 against
# their floor, likewise), attention (decode attention alone at batches 1-16, every split count,
# its KV from HBM), studies (the norms inside the products at no row count and at one row alone,
# PDL at 2-16 rows, the 1B's LM head, the one-row products' tiles, each against the tree's
# choice), compare (this tree's 1B and 8B decode steps beside other trees', BASE="FOLDER...",
# in one sitting), serving_1b (the router's share with a small model), workers (one group behind
# routers of 1 to 16 workers); and tp and tp70b, on a machine of several GPUs: every rank count
# against one (benchmarks/tp_compare.py) and the 8B targets at that count, then the 70B shape at
# batch 1 and through `sluice serve` at 64 streams. Output for the record goes to $OUT.
#
# Dependencies: either the environment has them (pip install ".[shard,flash,test]"), or the
# wheels that benchmarks/gpu_wheels.py downloads travel with the tree (.whl/, .gpu-cu13/) and
# setup installs them; benchmarks/README.md says how.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
# A folder named site-packages: quack (a FlashAttention-4 dependency) fingerprints the code its
# GEMM epilogues call, and takes only code under site-packages for installed library code.
SITE=/tmp/py/site-packages
# The CUTLASS DSL's CUDA 13 libraries, unpacked once two calls have carried .gpu-cu13 and
# .gpu-cu13-2 (with the wheels they would pass one call's size limit), for the calls after them
# on the same machine.
CU13=/tmp/cu13x
# The targets' models (random weights of the shipped configs) and workloads.
M1="--model benchmarks/configs/llama-3.2-1b --load-format dummy"
M8="--model benchmarks/configs/llama-3.1-8b --load-format dummy"
B1="--num-requests 1 --input-len 512 --output-len 128"
B128="--num-requests 128 --input-len 512 --output-len 128"
B256="--num-requests 256 --input-len 512 --output-len 128"
MIXED="--num-requests 512 --mixed"

setup() {
  # The libraries' archive comes in two parts, one per call (.gpu-cu13, .gpu-cu13-2: with the
  # tree, one archive is over a call's carry limit); kept under /tmp until both are there.
  local part
  for part in .gpu-cu13/cu13.tar.xz.0 .gpu-cu13-2/cu13.tar.xz.1; do
    if [ -f $part ]; then mkdir -p $CU13.parts && cp $part $CU13.parts/ || exit 1; fi
  done
  if [ ! -d $CU13 ] && [ -f $CU13.parts/cu13.tar.xz.0 ] && [ -f $CU13.parts/cu13.tar.xz.1 ]; then
    mkdir -p $CU13.part && cat $CU13.parts/cu13.tar.xz.0 $CU13.parts/cu13.tar.xz.1 \
      | tar -xJ -C $CU13.part && mv $CU13.part $CU13 || exit 1
  fi
  if compgen -G ".whl/*.whl" > /dev/null && [ ! -f $SITE/.installed ]; then
    $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $SITE \
      .whl/*.whl || exit 1
    # Our other requirements, from wheels in .whl/deps: pip installs only those this image lacks
    # or has too old.
    $PYTHON -m pip install -q --no-index --find-links .whl/deps --break-system-packages \
      $($PYTHON benchmarks/gpu_wheels.py requirements) || exit 1
    touch $SITE/.installed
  fi
  # The libraries join the install once both parts are there, whichever call brought the wheels.
  if [ -d $CU13 ] && [ -f $SITE/.installed ] && [ ! -f $SITE/.cu13 ]; then
    cp -r $CU13/. $SITE/ && touch $SITE/.cu13 || exit 1
  fi
  export PYTHONPATH=$PWD:$SITE:$SITE/nvidia_cutlass_dsl/dsl_packages
  export PYTHONUNBUFFERED=1
}

step_env() {  # the machine, and what the shard will run on it
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  $PYTHON - <<'PY'
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

step_tests() {  # every test that needs a GPU (CI's CPU leaves them uncollected); TESTS="FILE..."
  # for some of them, TESTS_K="EXPRESSION" for pytest's -k
  $PYTHON -m pytest ${TESTS:-shard/tests/test_*_cuda.py shard/tests/test_triton_kernels.py shard/tests/test_gemv.py} -q \
    -p no:cacheprovider ${TESTS_K:+-k "$TESTS_K"} 2>&1 | tee "$OUT/gpu-tests.log" | tail -25
}

offline() {  # offline NAME ARGS...: one benchmarks/offline.py run, its JSON in $OUT/NAME.json
  local name=$1; shift
  echo "== $name: $*"
  timeout 420 $PYTHON benchmarks/offline.py --json-out "$OUT/$name.json" "$@" 2>&1 \
    | grep -v " INFO " | tail -8
}

step_targets() {  # the five offline workloads of the results page, against their floor
  # (TARGETS="8b-b128 1b-b256" for some of them)
  local t
  for t in ${TARGETS:-8b-b128 1b-b256 1b-mixed 8b-b1 1b-b1}; do
    case $t in
      8b-b128) offline 8b-b128 $M8 $B128 --repeat 3 ;;
      1b-b256) offline 1b-b256 $M1 $B256 --repeat 3 ;;
      1b-mixed) offline 1b-mixed $M1 $MIXED --repeat 3 ;;
      8b-b1) offline 8b-b1 $M8 $B1 ;;
      1b-b1) offline 1b-b1 $M1 $B1 --repeat 3 ;;
      *) echo "gpu.sh targets: no target '$t'" >&2; return 1 ;;
    esac
  done
}

step_reference() {  # transformers generate() on the same shapes, the same GPU
  for m in llama-3.1-8b llama-3.2-1b; do
    offline ref-$m-b1 --model benchmarks/configs/$m --reference transformers \
      --num-requests 1 --batch 1 --input-len 512 --output-len 128
  done
  offline ref-llama-3.1-8b-b128 --model benchmarks/configs/llama-3.1-8b --reference transformers \
    --num-requests 128 --batch 128 --input-len 512 --output-len 128
  offline ref-llama-3.2-1b-b256 --model benchmarks/configs/llama-3.2-1b --reference transformers \
    --num-requests 256 --batch 128 --input-len 512 --output-len 128
}

step_tp() {  # a machine of several GPUs (issue 23): N ranks against one, then the 8B targets
  local n; n=$(nvidia-smi -L | wc -l)
  $PYTHON benchmarks/tp_compare.py --ranks "$n" --json-out "$OUT/tp-compare.json" -- $M8
  offline "8b-b1-tp$n" $M8 $B1 --num-shard "$n"
  offline "8b-b128-tp$n" $M8 $B128 --num-shard "$n" --repeat 2
}

step_tp70b() {  # the 70B shape on every GPU of the machine (141 GB of bf16 weights: 4 H100s, 2 H200s)
  local n; n=$(nvidia-smi -L | wc -l)
  offline "70b-b1-tp$n" --model benchmarks/configs/llama-3.1-70b --load-format dummy $B1 \
    --num-shard "$n"
  serve llama-3.1-70b "tp$n" 64 -- --num-shard "$n"
}

TICK="ticks of 1/$(getconf CLK_TCK) s"

tree_ticks() {  # tree_ticks PID: user + system CPU ticks of a process and its children
  local total=0 p
  for p in $1 $(pgrep -P $1); do total=$((total + $(awk '{print $14 + $15}' /proc/$p/stat))); done
  echo $total
}

wait_for() {  # wait_for PID SECONDS CHECK...: until CHECK succeeds; fails if PID exits first
  local pid=$1 seconds=$2; shift 2
  for _ in $(seq $((seconds * 2))); do
    "$@" && return 0
    kill -0 $pid 2>/dev/null || { echo "gpu.sh: process $pid exited before: $*" >&2; return 1; }
    sleep 0.5
  done
  echo "gpu.sh: not within $seconds s: $*" >&2; return 1
}

serve() {  # serve CONFIG NAME STREAMS... [-- SHARD FLAGS]: one server, a run per stream count
  local model=$1 name=$2; shift 2
  local streams=() flags=()
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do streams+=("$1"); shift; done
  [ $# -gt 0 ] && shift && flags=("$@")
  $PYTHON -m sluice serve --port 8080 --model benchmarks/configs/$model \
    --load-format dummy "${flags[@]}" > "$OUT/serve-$model-$name.log" 2>&1 &
  local pid=$!
  wait_for $pid 300 grep -q '"service": "serve"' "$OUT/serve-$model-$name.log" \
    || { tail -20 "$OUT/serve-$model-$name.log"; return 1; }
  local router; router=$(pgrep -P $pid -f -- "-m router" | head -1)
  for c in "${streams[@]}"; do
    echo "== serving $model ($name), $c concurrent streams"
    local before; before=$(tree_ticks $router)
    $PYTHON benchmarks/serving.py --num-prompts $((c * 8)) --max-concurrency $c \
      --input-len 512 --output-len 128 --json-out "$OUT/serving-$model-$name-c$c.json"
    echo "  router CPU        $(( $(tree_ticks $router) - before )) $TICK"
  done
  kill -TERM $pid; wait $pid
  grep -h "steps beside decodes" "$OUT/serve-$model-$name.log" | cut -c80-400
  grep -E '"level": "ERROR"|Traceback' "$OUT/serve-$model-$name.log" | head -5
}

step_serving() {  # 8B through `sluice serve` at 64 streams (the serving target)
  serve llama-3.1-8b default 64
}

step_serving_1b() {  # a model whose engine outruns one router process
  serve llama-3.2-1b default 64 128
}

step_workers() {  # one 1B shard group, routers of 16, 1, 4, 16, 1 workers in turn at 128 streams
  $PYTHON -m shard --host 127.0.0.1 --port 50200 $M1 > "$OUT/workers-shard.log" 2>&1 &
  local shard=$! n r before shard_before
  wait_for $shard 300 grep -q '"event": "ready"' "$OUT/workers-shard.log" \
    || { tail -20 "$OUT/workers-shard.log"; return 1; }
  for n in 16 1 4 16 1; do
    $PYTHON -m router --host 127.0.0.1 --port 8090 --shard-uri 127.0.0.1:50200 --workers $n \
      > "$OUT/workers-router-$n.log" 2>&1 &
    r=$!
    wait_for $r 60 curl -sf -o /dev/null http://127.0.0.1:8090/health || { kill -TERM $r; break; }
    sleep 5  # every worker up, then a warm-up run: what is measured is serving, not start-up
    $PYTHON benchmarks/serving.py --base-url http://127.0.0.1:8090/v1 --num-prompts 256 \
      --max-concurrency 128 --input-len 512 --output-len 128 > /dev/null 2>&1
    before=$(tree_ticks $r); shard_before=$(tree_ticks $shard)
    echo "== $n router workers, 128 concurrent streams"
    $PYTHON benchmarks/serving.py --base-url http://127.0.0.1:8090/v1 --num-prompts 1024 \
      --max-concurrency 128 --input-len 512 --output-len 128 | grep -E "requests|itl"
    echo "  router CPU $(( $(tree_ticks $r) - before )) ticks, shard CPU" \
      "$(( $(tree_ticks $shard) - shard_before )) $TICK"
    kill -TERM $r; wait $r
  done
  kill -TERM $shard; wait $shard
}

clocks() {  # clocks NAME CMD...: CMD with the GPU's clocks and power sampled every 50 ms
  local name=$1; shift
  nvidia-smi --query-gpu=clocks.sm,clocks.mem,power.draw,utilization.gpu,clocks_event_reasons.active \
    --format=csv,noheader,nounits -lms 50 > "$OUT/clocks-$name.csv" &
  local smi=$!
  "$@"
  kill $smi; wait $smi 2>/dev/null
  $PYTHON - "$OUT/clocks-$name.csv" <<'PY'
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

step_clocks() {  # the 8B batch run: SM clock, power and throttle reasons while it runs
  clocks 8b-b128 offline 8b-b128-clocks $M8 $B128 --repeat 3
}

step_gemv() {  # shard/gemv.py's kernels in every configuration against cuBLAS, 8B and 1B shapes
  # (GEMV_ROWS=1,2,... and GEMV_MODELS="llama-3.1-8b ..." for some of them)
  local i
  for i in $(seq 0 11); do  # Triton's compiles on 12 cores, then one process times
    $PYTHON benchmarks/gemv.py --compile-only $i/12 --rows "${GEMV_ROWS:-1,2,4,8,16}" \
      > "/tmp/gemv-compile-$i.log" 2>&1 &
  done
  wait
  for m in ${GEMV_MODELS:-llama-3.1-8b llama-3.2-1b}; do
    timeout 300 $PYTHON benchmarks/gemv.py --config benchmarks/configs/$m \
      --rows "${GEMV_ROWS:-1,2,4,8,16}" 2>&1 | tee "$OUT/gemv-$m.txt"
  done
}

step_small_batch() {  # batch 1 of both shapes with --gemv and --pdl on, and both off
  # (SMALL=on for the first alone)
  local gemv
  for gemv in ${SMALL:-on off}; do
    offline 8b-b1-gemv-$gemv $M8 $B1 --gemv $gemv --pdl $gemv
    offline 1b-b1-gemv-$gemv $M1 $B1 --repeat 3 --gemv $gemv --pdl $gemv
  done
}

step_curve() {  # the 8B's decode steps at batches 1-16 against their floor: --gemv and --pdl
  # both on (then the batch-1 step's kernels), --gemv alone, neither (CURVE="on:on on:off" for
  # some of them)
  local variant gemv pdl name
  for variant in ${CURVE:-on:on on:off off:off}; do
    gemv=${variant%:*} pdl=${variant#*:} name=8b-curve-gemv-${variant%:*}-pdl-${variant#*:}
    echo "== 8B decode steps, --gemv $gemv --pdl $pdl"
    timeout 150 $PYTHON benchmarks/profile_step.py $M8 --curve 1,2,4,8,16 --steps 30 \
      --gemv $gemv --pdl $pdl $([ $variant = on:on ] && echo --batch 1 --timeline) \
      > "$OUT/$name.txt" 2>&1
    grep -E "^!!|Traceback|Error" "$OUT/$name.txt"
    grep -A6 -- "-- decode steps" "$OUT/$name.txt" | tail -5
    grep -A25 -- "-- timeline" "$OUT/$name.txt"
  done
}

step_studies() {  # what this tree's choices rest on, for the next change to them: the norms
  # inside the products at no row count and at one row alone (gemv.FOLDED_MAX_ROWS 0 and 1;
  # the tree's is 16), and
  # PDL at 2-16 rows (pdl.MAX_ROWS, then a batch-2 timeline), and the 1B's LM head at one
  # row on gemv.py's kernel without PDL (the tree's), on cuBLAS, and on the kernel with PDL;
  # and the one-row plain products' tiles, 4 features a program up to 8,192 wide (the tree's,
  # gemv.WIDE_ONE_ROW_MAX) against 2 everywhere, both shapes; STUDIES=folded, pdl, head or
  # tiles for some of them
  local name rows head wide m
  if [[ ${STUDIES:-folded pdl head tiles} == *tiles* ]]; then
    for m in "1b:$M1 --curve 1,2,1 --steps 100" "8b:$M8 --curve 1,1 --steps 40"; do
      for wide in "" "--one-row-wide-max 0"; do
        name=${m%%:*}-tiles
        echo "== ${m%%:*} decode steps, --gemv on --pdl on ${wide:-(tiles as in the tree)}"
        timeout 150 $PYTHON benchmarks/profile_step.py ${m#*:} --gemv on --pdl on \
          --cuda-graphs 1,2,4 $wide > "$OUT/$name.txt" 2>&1
        grep -E "^!!|Traceback|Error" "$OUT/$name.txt"
        grep -E "batch +[0-9]+:" "$OUT/$name.txt"
      done
    done
  fi
  if [[ ${STUDIES:-folded pdl head tiles} == *head* ]]; then
    for head in "" "--head-fewest-rows 2" "--head-pdl on"; do
      echo "== 1B decode steps, --gemv on --pdl on ${head:-(head as in the tree)}"
      timeout 150 $PYTHON benchmarks/profile_step.py $M1 --curve 1,2,1 --steps 100 \
        --gemv on --pdl on --cuda-graphs 1,2,4 $head > "$OUT/1b-head.txt" 2>&1
      grep -E "^!!|Traceback|Error" "$OUT/1b-head.txt"
      grep -E "batch +[0-9]+:" "$OUT/1b-head.txt"
    done
  fi
  if [[ ${STUDIES:-folded pdl head tiles} == *folded* ]]; then
    for rows in 0 1; do
      name=8b-curve-folded-max-rows-$rows
      echo "== 8B decode steps, --gemv on --pdl on, norms inside the products up to $rows rows"
      timeout 150 $PYTHON benchmarks/profile_step.py $M8 --curve 1,2,4,8,16 --steps 30 \
        --gemv on --pdl on --folded-max-rows $rows > "$OUT/$name.txt" 2>&1
      grep -E "^!!|Traceback|Error" "$OUT/$name.txt"
      grep -A6 -- "-- decode steps" "$OUT/$name.txt" | tail -5
    done
  fi
  [[ ${STUDIES:-folded pdl head tiles} == *pdl* ]] || return 0
  name=8b-curve-pdl-every-row
  timeout 200 $PYTHON benchmarks/profile_step.py $M8 --curve 1,2,4,8,16 --steps 30 --gemv on \
    --pdl on --pdl-max-rows 16 --batch 2 --timeline > "$OUT/$name.txt" 2>&1
  grep -E "^!!|Traceback|Error" "$OUT/$name.txt"
  grep -A6 -- "-- decode steps" "$OUT/$name.txt" | tail -5
  grep -A25 -- "-- timeline" "$OUT/$name.txt"
}

step_attention() {  # decode attention alone, its KV from HBM (decode_attention.py --cold): the
  # 8B shape at batches 1-16 over 512 tokens and at batch 1 over 8k, the 1B at batch 1; every
  # split count, BLOCK_N 64 and 32, fastest first
  local b A="benchmarks/decode_attention.py --block-sizes 16 --contiguous --tiles= --cold \
    --splits 1,2,4,8,16,32 --iters 100"
  for b in 1 2 4 8 16; do
    timeout 90 $PYTHON $A --context 512 --batch $b --triton 64/4/3,32/4/3 \
      > "$OUT/attention-8b-b$b.txt" 2>&1
    echo "== 8B shape, batch $b, 512 tokens"; grep triton "$OUT/attention-8b-b$b.txt" \
      | sort -t: -k2 -n | head -4
  done
  timeout 90 $PYTHON $A --context 8192 --batch 1 --triton 64/4/3,32/4/3 \
    > "$OUT/attention-8b-b1-8k.txt" 2>&1
  echo "== 8B shape, batch 1, 8192 tokens"; grep triton "$OUT/attention-8b-b1-8k.txt" \
    | sort -t: -k2 -n | head -4
  timeout 90 $PYTHON $A --context 512 --batch 1 --head-dim 64 --triton 64/2/3,32/2/3 \
    > "$OUT/attention-1b-b1.txt" 2>&1
  echo "== 1B shape, batch 1, 512 tokens"; grep triton "$OUT/attention-1b-b1.txt" \
    | sort -t: -k2 -n | head -4
}

step_compare() {  # this tree beside others in one sitting: BASE="FOLDER..." holding them
  # (`git archive REV | tar -x -C .base`, each carried with the call as an ignored path; named
  # by the folder, its dot dropped): the 1B's decode steps at batches 1-4 and the 8B's at 1-16,
  # --gemv and --pdl on, every tree's runs of one model back to back (machines differ by several
  # percent: compare within one call); COMPARE="1b" for one model
  local out tree m name folders=("$PWD")
  out=$(cd "$OUT" && pwd)
  for tree in ${BASE:-}; do
    [ -f "$tree/benchmarks/profile_step.py" ] \
      || { echo "gpu.sh compare: $tree is not a tree (BASE=\"FOLDER...\")" >&2; return 1; }
    folders+=("$(cd "$tree" && pwd)")
  done
  [ ${#folders[@]} -gt 1 ] \
    || { echo "gpu.sh compare: BASE=\"FOLDER...\" of the others" >&2; return 1; }
  for m in "1b:$M1 --curve 1,2,4,1 --steps 100" "8b:$M8 --curve 1,2,4,8,16 --steps 40"; do
    [[ " ${COMPARE:-1b 8b} " == *" ${m%%:*} "* ]] || continue
    for tree in "${folders[@]}"; do
      name=${tree##*/}; [ "$tree" = "$PWD" ] && name=tree
      name=compare-${m%%:*}-${name#.}
      (cd "$tree" && PYTHONPATH=$tree:$SITE:$SITE/nvidia_cutlass_dsl/dsl_packages timeout 200 \
        $PYTHON benchmarks/profile_step.py ${m#*:} --gemv on --pdl on --cuda-graphs 1,2,4,8,16 \
        > "$out/$name.txt" 2>&1)
      echo "== $name"; grep -E "^!!|Traceback|Error" "$out/$name.txt"
      grep -E "batch +[0-9]+:" "$out/$name.txt"
    done
  done
}

step_timeline_b1() {  # a steady batch-1 decode step of the 8B and of the 1B: kernels and gaps
  # (GEMV=on: with --gemv and --pdl)
  local m
  for m in "8b:$M8" "1b:$M1"; do
    timeout 300 $PYTHON benchmarks/profile_step.py ${m#*:} --phase decode --batch 1 \
      --steps 30 --timeline --gemv ${GEMV:-off} --pdl ${GEMV:-off} > "$OUT/profile-${m%%:*}-decode-b1-timeline.txt" 2>&1
    grep -E "^!!|Traceback|Error" "$OUT/profile-${m%%:*}-decode-b1-timeline.txt"
    grep -A40 -- "-- timeline" "$OUT/profile-${m%%:*}-decode-b1-timeline.txt"
  done
}

step_prefill() {  # a 512-token prompt's step, one after another, 1B and 8B (--gemv and --pdl
  # on, as small_batch): ms per step, the host's Python by function (cProfile), the kernels
  # and gaps: what the batch-1 runs' first iteration, which launches the prefill, costs
  local m name
  for m in "1b:$M1" "8b:$M8"; do
    name=profile-${m%%:*}-prefill-512
    timeout 300 $PYTHON benchmarks/profile_step.py ${m#*:} --phase prefill --input-len 512 \
      --steps 20 --top 30 --timeline --gemv on --pdl on > "$OUT/$name.txt" 2>&1
    grep -E "^!!|Traceback|Error" "$OUT/$name.txt"
    grep -E "^== " "$OUT/$name.txt"
    grep -A31 -- "-- cProfile" "$OUT/$name.txt"
    grep -A12 -- "-- timeline" "$OUT/$name.txt"
  done
}

step_timeline() {  # a steady batch-128 8B decode step: kernels and idle gaps, the graph alone
  local name=profile-8b-decode-b128-timeline
  timeout 300 $PYTHON benchmarks/profile_step.py $M8 --phase decode --batch 128 --input-len 576 \
    --steps 20 --timeline > "$OUT/$name.txt" 2>&1
  grep -E "^!!|Traceback|Error" "$OUT/$name.txt"
  grep -A45 -- "-- timeline" "$OUT/$name.txt"
}

setup
for step in "$@"; do
  if ! declare -F "step_$step" > /dev/null; then
    echo "gpu.sh: no step '$step' (steps: $(declare -F | sed -n 's/^declare -f step_//p' \
      | paste -sd ' '))" >&2
    exit 2
  fi
done
for step in "$@"; do
  echo "######## $step"
  "step_$step"
done
