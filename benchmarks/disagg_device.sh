#!/usr/bin/env bash
# Disaggregated prefill/decode on nvidia-h200-x2: TTFT and inter-token latency against a
# colocated instance. Writes $OUT/disagg.json (copy it to benchmarks/results/) and server logs.
#
#   bash benchmarks/disagg_device.sh                  # Llama-3.1-8B shape, dummy weights
#   MODEL=benchmarks/configs/qwen3-0.6b bash benchmarks/disagg_device.sh
#   ISOLATE=1 bash benchmarks/disagg_device.sh        # CUDA_VISIBLE_DEVICES=N per process
#
# Runs, one after the other (each server on its own GPU, see CUDA_VISIBLE_DEVICES):
#   colocated     one `kvflow serve` on GPU 0
#   disagg-nccl   producer on GPU 0, consumer on GPU 1, KV over NCCL, `kvflow proxy` in front
#   disagg-tcp    the same with the TCP (pyzmq) transport, for comparison
# Needs pyzmq and httpx on the device (carry wheels in .whl/: device_run.sh's convention), e.g.
#   pip download pyzmq httpx httpcore h11 anyio sniffio --only-binary=:all: -d .whl
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
export KVFLOW_CACHE_DIR=${KVFLOW_CACHE_DIR:-/tmp/kvflow-cache}
MODEL=${MODEL:-benchmarks/configs/llama3.1-8b}
VOCAB=$(python3 -c "import json;print(json.load(open('$MODEL/config.json'))['vocab_size'])")
RESULT="$OUT/disagg.json"; rm -f "$RESULT"
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
python3 -c "import zmq, httpx, torch; print('pyzmq', zmq.__version__, 'torch', torch.__version__, 'gpus', torch.cuda.device_count())" || exit 1
COMMON=(--load-format dummy --dtype bfloat16 --max-model-len 8192 --skip-tokenizer-init
        --served-model-name bench --disable-log-requests --disable-uvicorn-access-log
        --gpu-memory-utilization 0.85 --host 127.0.0.1)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done; wait 2>/dev/null; PIDS=(); }
trap cleanup EXIT
wait_up() {  # url, seconds
  for _ in $(seq "$2"); do
    python3 -c "import sys,urllib.request;urllib.request.urlopen(sys.argv[1]+'/health',timeout=2)" "$1" \
      2>/dev/null && return 0
    sleep 1
  done
  echo "not healthy: $1"; return 1
}
# Both processes see both GPUs by default (--device cuda:N), so NCCL can use its direct
# GPU-to-GPU (P2P/NVLink) path; ISOLATE=1 gives each process only its GPU instead (NCCL then
# may fall back to copies through host shared memory).
serve() {  # gpu port log [extra args...]
  local gpu=$1 port=$2 log=$3; shift 3
  if [ "${ISOLATE:-0}" = 1 ]; then
    CUDA_VISIBLE_DEVICES=$gpu python3 -m kvflow.cli serve "$MODEL" "${COMMON[@]}" --port "$port" "$@" \
      >"$OUT/$log.log" 2>&1 &
  else
    CUDA_VISIBLE_DEVICES=0,1 python3 -m kvflow.cli serve "$MODEL" "${COMMON[@]}" --device "cuda:$gpu" \
      --port "$port" "$@" >"$OUT/$log.log" 2>&1 &
  fi
  PIDS+=($!)
}
bench() {  # url label [reference]
  python3 benchmarks/disagg_bench.py --url "$1" --label "$2" --out "$RESULT" --vocab "$VOCAB" \
    ${3:+--reference "$3"} 2>&1 | tee -a "$OUT/bench.log"
}

# 1. colocated
serve 0 8100 colocated
wait_up http://127.0.0.1:8100 600 && bench http://127.0.0.1:8100 colocated
cleanup

# 2./3. disaggregated, per transport
for transport in nccl tcp; do
  serve 0 8200 "prefill-$transport" --kv-transfer-config \
    "{\"connector\":\"p2p\",\"role\":\"producer\",\"transport\":\"$transport\",\"port\":8201,\"nccl_port\":8202}"
  serve 1 8300 "decode-$transport" --kv-transfer-config \
    "{\"connector\":\"p2p\",\"role\":\"consumer\",\"transport\":\"$transport\",\"failure_policy\":\"fail\"}"
  python3 -m kvflow.cli proxy --prefill http://127.0.0.1:8200 --decode http://127.0.0.1:8300 \
    --host 127.0.0.1 --port 8400 >"$OUT/proxy-$transport.log" 2>&1 &
  PIDS+=($!)
  if wait_up http://127.0.0.1:8200 600 && wait_up http://127.0.0.1:8300 600 && wait_up http://127.0.0.1:8400 60; then
    bench http://127.0.0.1:8400 "disagg-$transport" colocated
  fi
  grep -h "KV transfer" "$OUT/decode-$transport.log" | tail -5
  cleanup
done
python3 - "$RESULT" <<'EOF'
import json, subprocess, sys
res = json.load(open(sys.argv[1]))
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
for r in res:
    r["commit"], r["kind"] = commit, "nvidia-h200-x2"
json.dump(res, open(sys.argv[1], "w"), indent=2)
for r in res:
    s, l = r["phases"]["single_2k_in_128_out"], r["phases"]["load_4k_in_256_out_c16"]
    print(f"{r['label']:12s} single TTFT {s['ttft']['p50_ms']:8.1f} ms  ITL {s['itl']['p50_ms']:6.2f} ms | "
          f"load TTFT {l['ttft']['p50_ms']:8.1f} ms  ITL p50 {l['itl']['p50_ms']:6.2f} p99 {l['itl']['p99_ms']:6.2f} ms "
          f"{l['output_tok_s']:7.0f} tok/s  agreement {r.get('greedy_agreement_vs_colocated', '-')}")
EOF
