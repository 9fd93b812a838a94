#!/usr/bin/env bash
# The GC freeze at the end of startup (kvflow/gc_heap.py), one call on nvidia-h200 (~7 min):
# its GPU tests (a dropped CUDA engine, graphs included, is freed by refcount), then same-call
# A/Bs of KVFLOW_GC_FREEZE on the throughput workloads.
#   run(command="KVFLOW_COMMIT=<sha> bash benchmarks/gc_freeze_device.sh", kind="nvidia-h200",
#       carry=[".whl"])
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
export KVFLOW_CACHE_DIR=${KVFLOW_CACHE_DIR:-/tmp/kvflow-cache}
KVFLOW_TEST_DEVICE=cuda timeout 200 python3 -m pytest -q -x --tb=short --timeout=150 -p no:cacheprovider \
  tests/test_gc_heap.py tests/test_sleep_mode.py 2>&1 | tee "$OUT/tests.log" | grep -E "^E |passed|failed" | head -12
bash "$(dirname "$0")/ab_device.sh" qwen3-0.6b throughput8k,nanovllm KVFLOW_GC_FREEZE "0 1" 2
bash "$(dirname "$0")/ab_device.sh" llama3.1-8b throughput8k KVFLOW_GC_FREEZE "0 1" 1
