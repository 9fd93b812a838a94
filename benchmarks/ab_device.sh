#!/usr/bin/env bash
# Same-call A/B of one environment switch on the device:
#   bash benchmarks/ab_device.sh MODEL WORKLOADS VAR "VALUE ..." [ROUNDS]
# e.g. bash benchmarks/ab_device.sh llama3.1-8b decode1 KVFLOW_SKINNY_L2_PREFETCH_MB "0 default" 2
# The value "default" leaves VAR unset. Each (round, value) is a fresh process (switches read at
# build or capture time take effect); records go to $OUT/ab.jsonl with the switches in "env".
set -uo pipefail
model=$1; workloads=$2; var=$3; values=$4; rounds=${5:-1}
source "$(dirname "$0")/ab_common.sh"
for r in $(seq "$rounds"); do
  for v in $values; do
    if [ "$v" = default ]; then unset "$var"; else export "$var=$v"; fi
    ab_bench "$model" "$workloads" "$OUT/ab.jsonl" "$var=$v round $r"
  done
done
unset "$var"
