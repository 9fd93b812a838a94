#!/usr/bin/env bash
# Same-call A/B of engine arguments on the device (leases differ by up to ~4%, so compared
# settings must run in one call, interleaved):
#   bash benchmarks/ab_args_device.sh MODEL WORKLOADS ROUNDS "ARGS A" "ARGS B" ...
# e.g. bash benchmarks/ab_args_device.sh llama3.1-8b nanovllm 2 "--ride-chunk 0" "--ride-chunk 256"
# Each (round, args) is a fresh process after one warm-up process (compiles, fills the caches);
# records go to $OUT/ab.jsonl, whose init records carry the scheduler settings.
set -uo pipefail
model=$1; workloads=$2; rounds=$3; shift 3
source "$(dirname "$0")/device_env.sh"
export KVFLOW_CACHE_DIR=${KVFLOW_CACHE_DIR:-/tmp/kvflow-cache}
base="--max-num-seqs 1024 --max-num-batched-tokens 16384 --max-model-len 4096 --dtype bfloat16"
run() {  # $1: label, $2: extra args, $3: output file
  echo "== $model $workloads [$2] $1"
  python3 -m kvflow.cli --log-level WARNING bench throughput --model "benchmarks/configs/$model" \
    --workload "$workloads" --out "$3" $base $2 2>&1 | tee -a "$OUT/ab.log" \
    | grep -E "record|Error|Traceback" | cut -c1-400
}
run warm-up "$1" "$OUT/warmup.jsonl"
for r in $(seq "$rounds"); do
  for a in "$@"; do run "round $r" "$a" "$OUT/ab.jsonl"; done
done
