#!/usr/bin/env bash
# Same-call A/B of one environment switch on the device (lease-to-lease variance is ~3%, so
# compared settings must run in one call, interleaved):
#   bash benchmarks/ab_device.sh MODEL WORKLOADS VAR "VALUE ..." [ROUNDS]
# e.g. bash benchmarks/ab_device.sh llama3.1-8b decode1 KVFLOW_SKINNY_L2_PREFETCH_MB "0 default" 2
# The value "default" leaves VAR unset. Each (round, value) is a fresh process (switches read at
# build or capture time take effect); records go to $OUT/ab.jsonl with the switches in "env".
set -uo pipefail
model=$1; workloads=$2; var=$3; values=$4; rounds=${5:-1}
source "$(dirname "$0")/device_env.sh"
export KVFLOW_CACHE_DIR=${KVFLOW_CACHE_DIR:-/tmp/kvflow-cache}
extra=${BENCH_ARGS:---max-num-seqs 1024 --max-num-batched-tokens 16384}
for r in $(seq "$rounds"); do
  for v in $values; do
    if [ "$v" = default ]; then unset "$var"; else export "$var=$v"; fi
    echo "== $model $workloads $var=$v round $r"
    python3 -m kvflow.cli --log-level WARNING bench throughput --model "benchmarks/configs/$model" \
      --workload "$workloads" --max-model-len 4096 --dtype bfloat16 --out "$OUT/ab.jsonl" \
      $extra 2>&1 | tee -a "$OUT/ab.log" | grep -E "record|Error|Traceback" | cut -c1-400
  done
done
unset "$var"
