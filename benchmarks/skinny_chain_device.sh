#!/usr/bin/env bash
# Chain-aware tuning of Llama-3.1-8B's batch-1 GEMVs (benchmarks/skinny_chain_tune.py), then a
# same-call A/B of the resulting table against the committed one on decode1. One call on
# nvidia-h200 (~8 min):
#   run(command="KVFLOW_COMMIT=<sha> bash benchmarks/skinny_chain_device.sh", kind="nvidia-h200",
#       carry=[".whl"])
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
export KVFLOW_CACHE_DIR=${KVFLOW_CACHE_DIR:-/tmp/kvflow-cache}
(cd "$(dirname "$0")" && timeout 420 python3 skinny_chain_tune.py --out "$OUT" \
  --budget-s "${BUDGET_S:-300}" 2>&1 | tee "$OUT/chain.log" | grep -v "kind\": \"trial" | tail -12)
table=$(ls "$OUT"/skinny_gemm_chain_*.json 2>/dev/null | head -1)
[ -n "$table" ] && bash "$(dirname "$0")/ab_device.sh" llama3.1-8b decode1 KVFLOW_SKINNY_TABLE \
  "default $table" "${ROUNDS:-2}"
