#!/usr/bin/env bash
# The device checks of the gate | up product's SiLU epilogue (skinny_gemm glu=True), one call
# on nvidia-h200 (~6 min): GPU tests, then same-call A/Bs of KVFLOW_SKINNY_GLU on decode1.
#   run(command="KVFLOW_COMMIT=<sha> bash benchmarks/glu_device.sh", kind="nvidia-h200",
#       carry=[".whl"])
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
export KVFLOW_CACHE_DIR=${KVFLOW_CACHE_DIR:-/tmp/kvflow-cache}
KVFLOW_TEST_DEVICE=cuda timeout 240 python3 -m pytest -q -x --tb=short --timeout=200 -p no:cacheprovider \
  tests/test_skinny_gemm.py tests/test_norm_fold.py tests/test_gpu.py tests/test_models_hf.py 2>&1 \
  | tee "$OUT/tests.log" | grep -E "^E |passed|failed" | head -12
bash "$(dirname "$0")/ab_device.sh" llama3.1-8b decode1 KVFLOW_SKINNY_GLU "0 1" 2
bash "$(dirname "$0")/ab_device.sh" qwen3-0.6b decode1 KVFLOW_SKINNY_GLU "0 1" 1
