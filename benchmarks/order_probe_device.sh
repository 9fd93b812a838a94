# Probe runs: VARIANTS="workload:budget ..." (one process each, so no prefix-cache carry-over).
source benchmarks/device_env.sh
export KVFLOW_CACHE_DIR=/tmp/kvflow-cache KVFLOW_COMMIT=${KVFLOW_COMMIT:-unknown}
M=${M:-llama3.1-8b}
for v in ${VARIANTS:-nanovllm:16384 nanovllm_longest:16384}; do
  w=${v%%:*}; b=${v##*:}
  python3 benchmarks/order_probe.py --log-level WARNING bench throughput --model benchmarks/configs/$M \
    --workload $w --max-model-len 4096 --dtype bfloat16 --max-num-seqs 1024 \
    --max-num-batched-tokens $b --out $OUT/probe.jsonl 2>&1 | grep -E '"record"|Error|Traceback' | python3 -c "
import sys, json
for l in sys.stdin:
    try: d = json.loads(l)
    except Exception: print(l.strip()); continue
    print('$M', $b, d['record'], d.get('workload'), d.get('output_tok_s'), d.get('wall_s'), d.get('llm_constructor_s'), d.get('num_preemptions'))"
done
