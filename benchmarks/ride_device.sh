#!/usr/bin/env bash
# Prompts riding in decode steps (ride_budget, 520d183): same-lease A/B of ride budgets on the
# anchors' workloads with the anchors' scheduler limits, one fresh process per run.
#   M: config under benchmarks/configs (default mixtral-8x7b); BUDGETS: "auto" (the engine's
#   offline default: 384 for Mixtral, 512 paced by 64 for dense models of 2B+ parameters, else
#   0), token counts, or NgG (budget N, --ride-granule G; 256g0: session 29's fixed 256-token
#   steps), run in this order (default "auto 0 auto 0"); WORKLOADS (default nanovllm). Mixtral's default run is ~7 min:
#   run(command="KVFLOW_COMMIT=<sha> bash benchmarks/ride_device.sh", kind="nvidia-h200",
#       carry=[".whl"])
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
export KVFLOW_CACHE_DIR=${KVFLOW_CACHE_DIR:-/tmp/kvflow-cache}
M=${M:-mixtral-8x7b}
run() {  # $1: auto, a budget N or NgG (budget N, --ride-granule G), $2: workloads
  local flag=""
  case "$1" in
    auto) ;;
    *g*) flag="--ride-budget ${1%g*} --ride-granule ${1#*g}" ;;
    *) flag="--ride-budget $1" ;;
  esac
  KVFLOW_COMMIT="${KVFLOW_COMMIT:-unknown}-ride$1" python3 -m kvflow.cli --log-level WARNING \
    bench throughput --model "benchmarks/configs/$M" --workload "$2" --max-model-len 4096 \
    --dtype bfloat16 --max-num-seqs 1024 --max-num-batched-tokens 16384 $flag \
    --out "$OUT/ride-ab.jsonl" 2>&1 | tee -a "$OUT/ride-ab.log" | grep -E '"record"|Error|Traceback' | python3 -c "
import sys, json
for l in sys.stdin:
    try: d = json.loads(l)
    except Exception: print(l.strip()); continue
    print('$M ride=$1', d['record'], d.get('workload'), d.get('output_tok_s'), d.get('wall_s'), d.get('llm_constructor_s'), d.get('ride_budget'), d.get('num_preemptions'))"
}
for rb in ${BUDGETS:-auto 0 auto 0}; do run "$rb" "${WORKLOADS:-nanovllm}"; done
