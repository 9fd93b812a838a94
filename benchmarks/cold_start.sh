#!/usr/bin/env bash
# Startup on an empty Triton cache, with and without the parallel Triton precompile
# (kvflow/compilation/parallel_triton.py), then a restart over the warm cache: one
# `kvflow bench throughput --workload decode1` process per case, init records into
# $OUT/bench.jsonl with a "case" field (cold-workers, warm-workers, cold-serial).
#   run(command="KVFLOW_COMMIT=<sha> bash benchmarks/cold_start.sh MODEL [CASE...]",
#       kind="nvidia-h200", carry=[".whl"])
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
model=$1; shift
[ $# -gt 0 ] || set -- cold-workers warm-workers cold-serial
nproc
for case in "$@"; do
  case $case in
    cold-workers) dir=/tmp/tc-workers; rm -rf $dir; par=1 ;;
    warm-workers) dir=/tmp/tc-workers; par=1 ;;
    cold-serial)  dir=/tmp/tc-serial; rm -rf $dir; par=0 ;;
  esac
  TRITON_CACHE_DIR=$dir KVFLOW_PARALLEL_COMPILE=$par KVFLOW_CACHE_DIR=/tmp/kvflow-cache-$case \
    python3 -m kvflow.cli --log-level INFO bench throughput --model benchmarks/configs/$model \
    --workload decode1 --max-model-len 4096 --dtype bfloat16 --out "$OUT/raw-$case.jsonl" 2>&1 \
    | grep -E "Triton precompile|Traceback|Error" | cut -c1-300
  python3 - "$OUT/raw-$case.jsonl" "$case" >> "$OUT/bench.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r["record"] == "init":
        r["case"] = sys.argv[2]
        print(json.dumps(r))
        print(sys.argv[2], {k: r.get(k) for k in ("ready_s", "profile_s", "triton_precompile_s",
              "kernel_warmup_s", "cuda_graph_s")}, file=sys.stderr)
PY
done
