#!/usr/bin/env bash
# One device call: install carried wheels, run the GPU checks and/or benchmarks.
#   bash benchmarks/device_run.sh tests            # GPU suite
#   bash benchmarks/device_run.sh bench MODEL...   # offline benchmarks (configs under benchmarks/configs)
# Results land in $OUT (bench.jsonl, logs). The device's copy of the tree may carry a stale .git:
# pass the commit being measured as KVFLOW_COMMIT=<sha> so the records name it.
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
export KVFLOW_CACHE_DIR=${KVFLOW_CACHE_DIR:-/tmp/kvflow-cache}
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
mode=${1:-tests}; shift || true
case "$mode" in
  tests)
    KVFLOW_TEST_DEVICE=cuda timeout 500 python3 -m pytest -q -x --timeout=300 -p no:cacheprovider \
      tests/test_gpu.py tests/test_models_hf.py tests/test_engine.py "$@" 2>&1 | tee "$OUT/tests.log" | tail -25
    ;;
  bench)
    # Scheduler limits: the engine's defaults, which are vLLM 0.26's on this GPU class (1024
    # sequences, 16384 tokens; its published runs used them), given explicitly. Mixtral's KV
    # cache holds ~282K tokens, ~370 throughput8k requests: admission control (on by default
    # since session 18) keeps the rest waiting instead of preempting, as 384 set by hand did.
    for m in "$@"; do
      extra=${BENCH_ARGS:---max-num-seqs 1024 --max-num-batched-tokens 16384}
      python3 -m kvflow.cli --log-level ${LOG_LEVEL:-INFO} bench throughput --model benchmarks/configs/$m \
        --workload ${WORKLOADS:-nanovllm,decode1,throughput8k} --max-model-len 4096 --dtype bfloat16 \
        --out "$OUT/bench.jsonl" $extra 2>&1 | tee -a "$OUT/bench.log" | grep -E "record|Error|error|Traceback|ready|plan|graphs|compile" 
    done
    ;;
esac
