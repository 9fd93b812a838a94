#!/usr/bin/env bash
# Mixed-step graphs with decode tiles (split_decodes, 0a9b63a): GPU correctness, then a same-lease
# A/B on Mixtral-8x7B nanovllm with prompts riding decode steps (longest max_tokens first, small
# step budgets: the mixed-step graphs' territory). One device call on nvidia-h200, ~8 min:
#   run(command="KVFLOW_COMMIT=<sha> bash benchmarks/split_decodes_device.sh", kind="nvidia-h200",
#       carry=[".whl"])
# PART=tests or PART=ab runs one half (each fits a call on its own).
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
export KVFLOW_CACHE_DIR=${KVFLOW_CACHE_DIR:-/tmp/kvflow-cache}
if [ "${PART:-all}" != ab ]; then
  KVFLOW_TEST_DEVICE=cuda timeout 300 python3 -m pytest -q -x -p no:cacheprovider \
    tests/test_kernels.py tests/test_mixed_graphs.py tests/test_attention_fused_merge.py \
    tests/test_gpu.py 2>&1 | tee "$OUT/gpu-tests.log" | tail -3
fi
if [ "${PART:-all}" != tests ]; then
  for split in 1 0 1 0; do
    # The records name the setting through their commit field.
    KVFLOW_ATTN_SPLIT_DECODES=$split KVFLOW_COMMIT="${KVFLOW_COMMIT:-unknown}-split$split" \
      M=mixtral-8x7b VARIANTS="${VARIANTS:-nanovllm_longest:384}" \
      bash "$(dirname "$0")/order_probe_device.sh" | sed "s/^/split=$split /"
  done
  cp "$OUT/probe.jsonl" "$OUT/split-decodes-ab.jsonl"
fi
