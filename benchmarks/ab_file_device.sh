#!/usr/bin/env bash
# Same-call A/B of two versions of some source files (a change with no switch):
#   bash benchmarks/ab_file_device.sh FILE[,FILE...] OTHER_VERSION[,OTHER...] MODEL WORKLOADS [ROUNDS]
# Each OTHER_VERSION is a copy of its FILE as it was (e.g. `git show HEAD~1:FILE > _ab_old.py`,
# carried as an untracked file). Each round runs the OTHER_VERSIONs ("old"), then the FILEs
# ("new"), each a fresh process; records go to $OUT/ab.jsonl with "ab_variant" in their env
# (KVFLOW_AB_VARIANT). BENCH_ARGS: the scheduler limits (default 1024 sequences, 16384 tokens).
set -uo pipefail
IFS=, read -r -a files <<< "$1"
IFS=, read -r -a others <<< "$2"
model=$3; workloads=$4; rounds=${5:-1}
[ ${#files[@]} = ${#others[@]} ] || { echo "FILE and OTHER_VERSION lists differ in length"; exit 2; }
source "$(dirname "$0")/ab_common.sh"
mkdir -p /tmp/ab_new
for i in "${!files[@]}"; do cp "${files[$i]}" "/tmp/ab_new/$i"; done
for r in $(seq "$rounds"); do
  for v in old new; do
    for i in "${!files[@]}"; do
      if [ $v = old ]; then cp "${others[$i]}" "${files[$i]}"; else cp "/tmp/ab_new/$i" "${files[$i]}"; fi
    done
    KVFLOW_AB_VARIANT=$v ab_bench "$model" "$workloads" "$OUT/ab.jsonl" "$v round $r"
  done
done
for i in "${!files[@]}"; do cp "/tmp/ab_new/$i" "${files[$i]}"; done
