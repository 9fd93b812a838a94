#!/usr/bin/env bash
# GSM8K accuracy of a real checkpoint: kvflow at max_model_len 2048 and 4096 (each through
# `kvflow serve` + `kvflow eval gsm8k`) and Hugging Face transformers on the same prompts.
#   N=400 bash benchmarks/accuracy_device.sh MODEL.gguf
# Env: N (questions, default all), SHOTS (5), MAX_TOKENS (512), DTYPE (float32), PORT (8123).
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
model=$1; port=${PORT:-8123}; dtype=${DTYPE:-float32}
nq=${N:+--num-questions $N}
data=${GSM8K_PATH:+--data-path $GSM8K_PATH}
common="$nq $data --num-shots ${SHOTS:-5} --max-tokens ${MAX_TOKENS:-512}"
for len in 2048 4096; do
  python3 -m kvflow.cli serve "$model" --max-model-len $len --dtype $dtype --port $port \
    --max-num-seqs 256 > "$OUT/serve_$len.log" 2>&1 &
  pid=$!
  for _ in $(seq 300); do curl -sf localhost:$port/health >/dev/null && break; sleep 1; done
  python3 -m kvflow.cli eval gsm8k --port $port $common --concurrency 256 --disable-tqdm \
    --result-file "$OUT/gsm8k_kvflow_$len.json" 2>&1 | tail -2
  kill -INT $pid; wait $pid
done
python3 benchmarks/gsm8k_hf.py --model "$model" $common --dtype $dtype --batch-size ${HF_BATCH:-128} \
  --result-file "$OUT/gsm8k_hf.json" 2>&1 | tail -2
python3 benchmarks/accuracy_compare.py kvflow-2048="$OUT/gsm8k_kvflow_2048.json" \
  kvflow-4096="$OUT/gsm8k_kvflow_4096.json" hf="$OUT/gsm8k_hf.json" --out "$OUT/accuracy.jsonl"
