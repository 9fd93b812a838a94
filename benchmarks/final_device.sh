#!/usr/bin/env bash
# A session's closing device call on nvidia-h200 (~8 min): the GPU tests of the decode path
# (skinny GEMM, norm fold, GPU suite, HF parity; TESTS="files" to choose), then the three anchor workloads for the given
# models (default: Llama-3.1-8B and Qwen3-0.6B) into $OUT/bench.jsonl.
#   run(command="KVFLOW_COMMIT=<sha> bash benchmarks/final_device.sh [MODEL...]",
#       kind="nvidia-h200", carry=[".whl"])
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
export KVFLOW_CACHE_DIR=${KVFLOW_CACHE_DIR:-/tmp/kvflow-cache}
tests=${TESTS:-tests/test_skinny_gemm.py tests/test_norm_fold.py tests/test_gpu.py tests/test_models_hf.py}
KVFLOW_TEST_DEVICE=cuda timeout 260 python3 -m pytest -q -x --tb=short --timeout=200 -p no:cacheprovider \
  $tests 2>&1 \
  | tee "$OUT/tests.log" | grep -E "^E |passed|failed" | head -12
[ $# -gt 0 ] || set -- llama3.1-8b qwen3-0.6b
LOG_LEVEL=WARNING bash "$(dirname "$0")/device_run.sh" bench "$@" \
  | grep -E '"record"' | cut -c1-600
