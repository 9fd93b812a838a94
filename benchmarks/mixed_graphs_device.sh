#!/usr/bin/env bash
# The device checks of the mixed-step CUDA graphs (kvflow/worker/mixed_graphs.py), one call on
# nvidia-h200 (~6 min): GPU tests, the first-token profile, and same-call A/Bs of
# cudagraph_mode FULL_DECODE_ONLY (mixed steps eager, as before) against FULL on decode1.
#   run(command="KVFLOW_COMMIT=<sha> bash benchmarks/mixed_graphs_device.sh", kind="nvidia-h200",
#       carry=[".whl"])
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
export KVFLOW_CACHE_DIR=${KVFLOW_CACHE_DIR:-/tmp/kvflow-cache}
KVFLOW_TEST_DEVICE=cuda timeout 260 python3 -m pytest -q -x --tb=short --timeout=200 -p no:cacheprovider \
  tests/test_mixed_graphs.py tests/test_sleep_mode.py tests/test_gpu.py tests/test_engine.py 2>&1 | tee "$OUT/tests.log" | tail -4
for m in qwen3-0.6b llama3.1-8b; do
  timeout 100 python3 benchmarks/profile_first_token.py "benchmarks/configs/$m" --out "$OUT" \
    > "$OUT/pft-$m.log" 2>&1
  echo "== first token $m"; grep -A2 "^generate" "$OUT/pft-$m.log" | cut -c1-160
done
ab() {  # MODEL ROUNDS
  for r in $(seq "$2"); do
    for mode in FULL_DECODE_ONLY FULL; do
      echo "== $1 decode1 cudagraph_mode=$mode round $r"
      python3 -m kvflow.cli --log-level WARNING bench throughput --model "benchmarks/configs/$1" \
        --workload decode1 --max-model-len 4096 --dtype bfloat16 --out "$OUT/ab.jsonl" \
        --max-num-seqs 512 --max-num-batched-tokens 16384 -O "{\"cudagraph_mode\": \"$mode\"}" \
        2>&1 | tee -a "$OUT/ab.log" | grep -E '"workload"|Error|Traceback' \
        | grep -oE '"(ms_per_output_token|first_token_s|decode_ms_per_token)": [0-9.]+|Error.*|Traceback'
    done
  done
}
ab llama3.1-8b 2
ab qwen3-0.6b 1
