#!/usr/bin/env bash
# `kvflow bench serve` against `kvflow serve` on one GPU: dummy weights, ShareGPT prompts.
#   bash benchmarks/serve_device.sh MODEL_CONFIG_DIR TOKENIZER_DIR SHAREGPT.json
# Env: RATES ("4 16 inf"), NUM_PROMPTS (200), PORT (8124). Results: $OUT/serve-<rate>.json.
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
model=$1; tok=$2; data=$3; port=${PORT:-8124}
python3 -m kvflow.cli serve "$model" --load-format dummy --tokenizer "$tok" --dtype bfloat16 \
  --max-model-len 4096 --port $port --served-model-name bench > "$OUT/serve.log" 2>&1 &
pid=$!
for _ in $(seq 300); do curl -sf localhost:$port/health >/dev/null && break; sleep 1; done
grep -h "ready in" "$OUT/serve.log"
for rate in ${RATES:-4 16 inf}; do
  python3 -m kvflow.cli bench serve --port $port --model bench --tokenizer "$tok" \
    --dataset-name sharegpt --dataset-path "$data" --num-prompts ${NUM_PROMPTS:-200} \
    --request-rate $rate --seed 0 --disable-tqdm --result-file "$OUT/serve-$rate.json" 2>&1 \
    | grep -v -E "httpx|^INFO" | tail -22
done
kill -INT $pid; wait $pid
