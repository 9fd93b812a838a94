#!/usr/bin/env bash
# The device checks of the rotary + KV-cache write in the q|k|v GEMV's epilogue
# (skinny_gemm rope_cache=, Attention.forward_projected), one call on nvidia-h200 (~8 min): GPU
# tests, then same-call A/Bs of KVFLOW_QKV_ROPE on decode1.
#   run(command="KVFLOW_COMMIT=<sha> bash benchmarks/qkv_rope_device.sh", kind="nvidia-h200",
#       carry=[".whl"])
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
export KVFLOW_CACHE_DIR=${KVFLOW_CACHE_DIR:-/tmp/kvflow-cache}
KVFLOW_TEST_DEVICE=cuda timeout 300 python3 -m pytest -q -x --tb=short --timeout=250 -p no:cacheprovider \
  tests/test_qkv_rope_epilogue.py tests/test_qk_rope_cache.py tests/test_skinny_gemm.py \
  tests/test_norm_fold.py tests/test_gpu.py tests/test_models_hf.py tests/test_fp8_kv.py 2>&1 \
  | tee "$OUT/tests.log" | grep -E "^E |passed|failed" | head -12
bash "$(dirname "$0")/ab_device.sh" llama3.1-8b decode1 KVFLOW_QKV_ROPE "0 1" ${ROUNDS:-2}
