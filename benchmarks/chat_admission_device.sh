# Device call: chat_admission_probe.py with admission control on and off, interleaved.
#   KV="100000 60000" REQUESTS=1500 bash benchmarks/chat_admission_device.sh
source benchmarks/device_env.sh
export KVFLOW_CACHE_DIR=/tmp/kvflow-cache
M=${M:-llama3.1-8b}
for kv in ${KV:-100000}; do
  for flag in --admission-control --no-admission-control; do
    python3 benchmarks/chat_admission_probe.py --model benchmarks/configs/$M $flag --kv-tokens $kv \
      --requests ${REQUESTS:-1500} --out $OUT/chat-admission.jsonl 2>&1 | grep -E '^\{|Error|Traceback'
  done
done
