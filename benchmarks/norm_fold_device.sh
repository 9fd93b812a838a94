#!/usr/bin/env bash
# The device checks the norm fold (kvflow/layers/norm_fold.py) needs before it is merged, in
# one call on nvidia-h200 (~5 min): the GPU tests, then same-call A/Bs of KVFLOW_NORM_FOLD.
#   run(command="KVFLOW_COMMIT=<sha> bash benchmarks/norm_fold_device.sh", kind="nvidia-h200",
#       carry=[".whl"])
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
export KVFLOW_CACHE_DIR=${KVFLOW_CACHE_DIR:-/tmp/kvflow-cache}
KVFLOW_TEST_DEVICE=cuda timeout 300 python3 -m pytest -q -x --timeout=250 -p no:cacheprovider \
  tests/test_norm_fold.py tests/test_skinny_gemm.py tests/test_gpu.py tests/test_models_hf.py tests/test_engine.py 2>&1 | tee "$OUT/tests.log" | tail -5
bash "$(dirname "$0")/ab_device.sh" llama3.1-8b decode1 KVFLOW_NORM_FOLD "0 1" 2
bash "$(dirname "$0")/ab_device.sh" qwen3-0.6b decode1 KVFLOW_NORM_FOLD "0 1" 1
