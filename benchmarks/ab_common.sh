# Sourced by the same-call A/B scripts (ab_device.sh: an environment switch; ab_args_device.sh:
# engine arguments; ab_file_device.sh: two versions of source files). Leases differ by up to
# ~4%, so compared settings run in one call, each a fresh process, interleaved.
source "$(dirname "${BASH_SOURCE[0]}")/device_env.sh"
export KVFLOW_CACHE_DIR=${KVFLOW_CACHE_DIR:-/tmp/kvflow-cache}
# Scheduler limits of the published runs (vLLM 0.26's defaults on this GPU class).
AB_LIMITS=${BENCH_ARGS:---max-num-seqs 1024 --max-num-batched-tokens 16384}

# ab_bench MODEL WORKLOADS OUT_FILE LABEL [ENGINE ARGS...]: one bench process; its log is
# appended to $OUT/ab.log and its records to OUT_FILE.
ab_bench() {
  local model=$1 workloads=$2 out=$3 label=$4; shift 4
  echo "== $model $workloads $label"
  python3 -m kvflow.cli --log-level WARNING bench throughput --model "benchmarks/configs/$model" \
    --workload "$workloads" --max-model-len 4096 --dtype bfloat16 --out "$out" $AB_LIMITS "$@" \
    2>&1 | tee -a "$OUT/ab.log" | grep -E '"record"|Error|Traceback' | cut -c1-400
}
