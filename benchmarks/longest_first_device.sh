#!/usr/bin/env bash
# Device checks of the longest-first attention dispatch (AttentionMetadata.decode_order), one
# call on nvidia-h200 (~7 min): GPU tests of the kernel and the decode graphs, then same-call
# A/Bs of KVFLOW_ATTN_LONGEST_FIRST on the throughput workloads.
#   run(command="KVFLOW_COMMIT=<sha> bash benchmarks/longest_first_device.sh", kind="nvidia-h200",
#       carry=[".whl"])
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
export KVFLOW_CACHE_DIR=${KVFLOW_CACHE_DIR:-/tmp/kvflow-cache}
KVFLOW_TEST_DEVICE=cuda timeout 200 python3 -m pytest -q -x --tb=short --timeout=150 -p no:cacheprovider \
  tests/test_kernels.py tests/test_decode_graph_inputs.py tests/test_gpu.py 2>&1 \
  | tee "$OUT/tests.log" | grep -E "^E |passed|failed" | head -12
bash "$(dirname "$0")/ab_device.sh" qwen3-0.6b nanovllm,throughput8k KVFLOW_ATTN_LONGEST_FIRST "0 1" 2
bash "$(dirname "$0")/ab_device.sh" llama3.1-8b throughput8k KVFLOW_ATTN_LONGEST_FIRST "0 1" 1
