#!/usr/bin/env bash
# Same-call A/B of two versions of one source file (a heuristic change with no switch):
#   bash benchmarks/ab_file_device.sh FILE OTHER_VERSION MODEL WORKLOADS [ROUNDS]
# OTHER_VERSION is a copy of FILE as it was (e.g. `git show HEAD~1:FILE > _ab_old.py`, carried
# as an untracked file). Each round runs OTHER_VERSION ("old"), then FILE ("new"), each a fresh
# process; records go to $OUT/ab.jsonl with "ab_variant" in their env (KVFLOW_AB_VARIANT).
set -uo pipefail
file=$1; other=$2; model=$3; workloads=$4; rounds=${5:-1}
source "$(dirname "$0")/device_env.sh"
export KVFLOW_CACHE_DIR=${KVFLOW_CACHE_DIR:-/tmp/kvflow-cache}
extra=${BENCH_ARGS:---max-num-seqs 512 --max-num-batched-tokens 16384}
cp "$file" /tmp/ab_new_version
for r in $(seq "$rounds"); do
  for v in old new; do
    if [ $v = old ]; then cp "$other" "$file"; else cp /tmp/ab_new_version "$file"; fi
    echo "== $model $workloads $v round $r"
    KVFLOW_AB_VARIANT=$v python3 -m kvflow.cli --log-level WARNING bench throughput \
      --model "benchmarks/configs/$model" --workload "$workloads" --max-model-len 4096 \
      --dtype bfloat16 --out "$OUT/ab.jsonl" $extra 2>&1 | tee -a "$OUT/ab.log" \
      | grep -E '"record": "workload"|Error|Traceback' | cut -c1-400
  done
done
cp /tmp/ab_new_version "$file"
