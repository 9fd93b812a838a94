#!/usr/bin/env bash
# Where the throughput workloads' time goes (benchmarks/profile_workload.py), one call on
# nvidia-h200 (~6 min): Qwen3-0.6B, then Llama-3.1-8B, nanovllm and throughput8k, with the
# scheduler limits of the published runs (1024 sequences, 16384 batched tokens: vLLM's defaults).
#   run(command="KVFLOW_COMMIT=<sha> bash benchmarks/profile_workload_device.sh [MODEL...]",
#       kind="nvidia-h200", carry=[".whl"])
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
export KVFLOW_CACHE_DIR=${KVFLOW_CACHE_DIR:-/tmp/kvflow-cache}
models=${*:-qwen3-0.6b llama3.1-8b}
for m in $models; do
  python3 benchmarks/profile_workload.py benchmarks/configs/$m --workloads ${WORKLOADS:-nanovllm,throughput8k} \
    --out "$OUT/profile-$m-${KVFLOW_COMMIT:-unknown}.json" 2>&1 | tee -a "$OUT/profile.log" \
    | grep -vE "^\s*$" | cut -c1-3000 | grep -E "^\{|Error|error|Traceback" 
done
if [ -n "${GEMMS:-}" ]; then
  for m in $models; do python3 benchmarks/gemm_shapes.py benchmarks/configs/$m | tee -a "$OUT/gemm.log"; done
fi
