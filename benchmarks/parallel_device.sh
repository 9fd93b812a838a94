#!/usr/bin/env bash
# Tensor and expert parallel on GPUs (issue 7): greedy tokens of TP=2 / EP=2 against one GPU,
# with dummy weights that are identical in every layout, and throughput. Each part fits one
# 10-minute device call; run them one by one on an nvidia-h200-x2 (or -x4: adds TP=4 / EP=4).
#
#   bash benchmarks/parallel_device.sh llama       # Llama-3.1-8B  fp32 strict + bf16 agreement
#   bash benchmarks/parallel_device.sh mixtral32   # Mixtral-8x7B, first 8 layers, fp32 strict:
#                                                  #   TP=2, EP=2, EP=2 with KVFLOW_FUSED_MOE=1
#   bash benchmarks/parallel_device.sh mixtral16   # Mixtral-8x7B full depth bf16: TP=2, EP=2
#                                                  #   (TP=1 needs one H200: 93 GB of weights)
#   bash benchmarks/parallel_device.sh ray         # Llama-3.1-8B fp32 TP=2 over Ray actors vs TP=1
#                                                  #   (needs ray importable on the machine: its
#                                                  #   ~80 MB wheel exceeds what a call can carry)
#   bash benchmarks/parallel_device.sh bench-llama    # kvflow bench throughput, TP=1 / TP=2
#   bash benchmarks/parallel_device.sh bench-mixtral  # kvflow bench throughput, TP=2 / EP=2
#
# What "equal" means (details in benchmarks/parallel_check.py): TP changes the summation order of
# the all-reduce, so logits are not bit-identical across layouts. A pass = every greedy
# divergence happens where the TP=1 reference's top-2 logprob gap is a near-tie (fp32: < 1e-3,
# bf16: < 0.1); a sharding bug diverges at once with large gaps. The JSON also gives the
# token-agreement rate and the first divergence per prompt. Checks run eager (--enforce-eager:
# no compile time per layout); the bench parts use the engine defaults (BENCH_ARGS adds flags,
# e.g. BENCH_ARGS=--enforce-eager if compiling does not fit the time limit).
#
# Results in $OUT: parallel_check.jsonl (one record per comparison, "ok": true/false),
# runs/*.json (tokens, top-2 logprobs, tokens/s per layout), bench.jsonl, *.log.
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
mkdir -p "$OUT/runs"
export KVFLOW_CACHE_DIR=${KVFLOW_CACHE_DIR:-/tmp/kvflow-cache}
export KVFLOW_DUMMY_WEIGHTS=scaled   # see kvflow/models/dummy.py: meaningful greedy tokens
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
NGPU=$(nvidia-smi -L | wc -l)
# Overridable so the plumbing can be dry-run on CPU with tiny models (see the report of issue 7).
LLAMA=${LLAMA:-benchmarks/configs/llama3.1-8b}
MIXTRAL=${MIXTRAL:-benchmarks/configs/mixtral-8x7b}
CHECK="python3 benchmarks/parallel_check.py"
FAILED=0

# run NAME ARGS... : one layout in its own process (frees the GPUs between layouts).
run() {
  local name=$1; shift
  timeout 420 $CHECK run --enforce-eager --out "$OUT/runs/$name.json" "$@" \
    > "$OUT/$name.log" 2>&1 || { echo "RUN FAILED: $name (see $name.log)"; tail -5 "$OUT/$name.log"; FAILED=1; return 1; }
  tail -1 "$OUT/$name.log"
}
# compare REF GOT TIE_GAP
compare() {
  [ -f "$OUT/runs/$1.json" ] && [ -f "$OUT/runs/$2.json" ] || { FAILED=1; return 1; }
  $CHECK compare "$OUT/runs/$1.json" "$OUT/runs/$2.json" --tie-gap "$3" \
    --jsonl "$OUT/parallel_check.jsonl" | tail -1 || FAILED=1
}

part=${1:-llama}
case "$part" in
  llama)
    A="--model $LLAMA --num-prompts 32 --max-tokens 64"
    run llama-fp32-tp1 $A --dtype float32
    run llama-fp32-tp2 $A --dtype float32 --tp 2
    compare llama-fp32-tp1 llama-fp32-tp2 1e-3
    run llama-bf16-tp1 $A --dtype bfloat16
    run llama-bf16-tp2 $A --dtype bfloat16 --tp 2
    compare llama-bf16-tp1 llama-bf16-tp2 0.1
    if [ "$NGPU" -ge 4 ]; then
      run llama-fp32-tp4 $A --dtype float32 --tp 4 && compare llama-fp32-tp1 llama-fp32-tp4 1e-3
    fi
    ;;
  mixtral32)
    A="--model $MIXTRAL --layers 8 --dtype float32 --num-prompts 32 --max-tokens 64"
    run mixtral8l-fp32-tp1 $A
    run mixtral8l-fp32-tp2 $A --tp 2
    compare mixtral8l-fp32-tp1 mixtral8l-fp32-tp2 1e-3
    run mixtral8l-fp32-ep2 $A --tp 2 --ep
    compare mixtral8l-fp32-tp1 mixtral8l-fp32-ep2 1e-3
    KVFLOW_FUSED_MOE=1 run mixtral8l-fp32-ep2-triton $A --tp 2 --ep
    compare mixtral8l-fp32-tp1 mixtral8l-fp32-ep2-triton 1e-3
    if [ "$NGPU" -ge 4 ]; then
      run mixtral8l-fp32-ep4 $A --tp 4 --ep && compare mixtral8l-fp32-tp1 mixtral8l-fp32-ep4 1e-3
    fi
    ;;
  mixtral16)
    A="--model $MIXTRAL --dtype bfloat16 --num-prompts 32 --max-tokens 64"
    run mixtral-bf16-tp1 $A --gpu-memory-utilization 0.95
    run mixtral-bf16-tp2 $A --tp 2
    compare mixtral-bf16-tp1 mixtral-bf16-tp2 0.1
    run mixtral-bf16-ep2 $A --tp 2 --ep
    compare mixtral-bf16-tp1 mixtral-bf16-ep2 0.1
    ;;
  ray)
    python3 -c "import ray" 2>/dev/null || { echo "SKIP: ray is not installed here"; exit 0; }
    A="--model $LLAMA --num-prompts 32 --max-tokens 64 --dtype float32"
    run llama-fp32-tp1 $A
    run llama-fp32-tp2-ray $A --tp 2 --backend ray
    compare llama-fp32-tp1 llama-fp32-tp2-ray 1e-3
    ;;
  bench-llama|bench-mixtral)
    if [ "$part" = bench-llama ]; then M=$LLAMA; LAYOUTS="1: 2:"; else M=$MIXTRAL; LAYOUTS="2: 2:--enable-expert-parallel"; fi
    for l in $LAYOUTS; do
      tp=${l%%:*}; ep=${l#*:}
      log="$OUT/bench-$(basename "$M").log"
      timeout 280 python3 -m kvflow.cli bench throughput --model "$M" \
        --workload "${WORKLOADS:-decode1,throughput8k}" --max-model-len 4096 --dtype bfloat16 \
        --tensor-parallel-size "$tp" $ep ${BENCH_ARGS:-} --out "$OUT/bench.jsonl" >> "$log" 2>&1 \
        || { echo "BENCH FAILED: $M tp=$tp $ep"; tail -5 "$log"; FAILED=1; }
    done
    grep '"record": "workload"' "$OUT/bench.jsonl" 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    r = json.loads(line)
    print(r["model"], "tp", r.get("tensor_parallel_size"), "ep", r.get("enable_expert_parallel"),
          r["workload"], {k: v for k, v in r.items() if k.endswith(("tok_s", "_token"))})'
    ;;
  *) echo "unknown part $part (llama, mixtral32, mixtral16, ray, bench-llama, bench-mixtral)"; exit 2 ;;
esac
exit $FAILED
