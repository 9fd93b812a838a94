#!/usr/bin/env bash
# Llama-4-Scout-shaped model (benchmarks/configs/Llama-4-Scout-17B-16E, dummy bf16 weights) served
# with tensor parallel 2 at max_model_len 4096 and 8192 on an nvidia-h200-x2 machine.
#   bash benchmarks/scout_device.sh            # env: LENS ("4096 8192"), WORKLOADS (decode1)
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
for L in ${LENS:-4096 8192}; do
  timeout ${PER_RUN_S:-240} python3 -m kvflow.cli --log-level INFO bench throughput \
    --model benchmarks/configs/Llama-4-Scout-17B-16E --tensor-parallel-size 2 --dtype bfloat16 \
    --max-model-len $L --workload ${WORKLOADS:-decode1} --out "$OUT/scout-tp2.jsonl" ${SCOUT_ARGS:-} 2>&1 \
    | tee -a "$OUT/scout.log" | grep -E "record|Error|Traceback|ready in|graphs|attention backend" | cut -c1-400
done
