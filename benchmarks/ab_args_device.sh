#!/usr/bin/env bash
# Same-call A/B of engine arguments on the device:
#   bash benchmarks/ab_args_device.sh MODEL WORKLOADS ROUNDS "ARGS A" "ARGS B" ...
# e.g. bash benchmarks/ab_args_device.sh llama3.1-8b nanovllm 2 "--ride-chunk 0" "--ride-chunk 256"
# Each (round, args) is a fresh process after one warm-up process (compiles, fills the caches);
# records go to $OUT/ab.jsonl, whose init records carry the scheduler settings.
set -uo pipefail
model=$1; workloads=$2; rounds=$3; shift 3
source "$(dirname "$0")/ab_common.sh"
ab_bench "$model" "$workloads" "$OUT/warmup.jsonl" "[$1] warm-up" $1
for r in $(seq "$rounds"); do
  for a in "$@"; do ab_bench "$model" "$workloads" "$OUT/ab.jsonl" "[$a] round $r" $a; done
done
