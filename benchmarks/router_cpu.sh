#!/usr/bin/env bash
# The router's CPU time per streamed token: starts `sluice serve` on MODEL, streams
# STREAMS x 8 streamed completions of OUTPUT tokens through benchmarks/serving.py (aiohttp), and
# divides the router's CPU ticks over the run (every router process: with --workers, the
# parent and its workers) by the tokens it streamed.
#
#   bash benchmarks/router_cpu.sh MODEL [STREAMS] [OUTPUT] [-- SERVE FLAGS]
#   bash benchmarks/router_cpu.sh tiny 64 128 -- --device cpu --workers 1
#   API=tgi bash benchmarks/router_cpu.sh ...   # TGI's /generate_stream instead
#
# A tiny model keeps the shard's share of the machine small; the router is what is measured.
# MODEL `tiny` is the tests' random two-layer Llama (shard/tests/tiny_model.py), made here.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
model=$1; shift
streams=${1:-64}; [ $# -gt 0 ] && shift
output=${1:-128}; [ $# -gt 0 ] && shift
[ "${1:-}" = "--" ] && shift
if [ "$model" = tiny ]; then
  tiny=$(mktemp -d)
  $PY -c "import sys; from pathlib import Path; from shard.tests.tiny_model import \
write_tiny_model; write_tiny_model(Path(sys.argv[1]))" "$tiny/llama"
  model=$tiny/llama
fi
log=$(mktemp)
$PY -m sluice serve --port 8097 --shard-port 50097 --model "$model" "$@" > "$log" 2>&1 &
pid=$!
trap 'kill -TERM $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$log" ${tiny:+"$tiny"}' EXIT
for _ in $(seq 300); do
  grep -q '"service": "serve"' "$log" && break
  kill -0 $pid 2>/dev/null || { cat "$log"; exit 1; }
  sleep 1
done
routers=$(pgrep -f -- "-m router --host .* --port 8097")
ticks() { for pid in $routers; do awk '{print $14 + $15}' /proc/$pid/stat; done |
          awk '{n += $1} END {print n}'; }
before=$(ticks)
if [ "${API:-openai}" = tgi ]; then api="--backend tgi --base-url http://127.0.0.1:8097"
else api="--base-url http://127.0.0.1:8097/v1"; fi
$PY benchmarks/serving.py $api --num-prompts $((streams * 8)) \
  --max-concurrency "$streams" --input-len 32 --output-len "$output" --json-out "$log.json" \
  > "$log.out"
head -2 "$log.out"
used=$(( $(ticks) - before ))
tokens=$($PY -c "import json; print(json.load(open('$log.json'))['output_tokens'])")
rm -f "$log.json" "$log.out"
echo "router CPU: $used ticks of 1/$(getconf CLK_TCK) s for $tokens tokens:" \
  "$(( used * 1000000 / $(getconf CLK_TCK) / tokens )) µs per token"
