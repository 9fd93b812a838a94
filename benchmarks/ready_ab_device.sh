#!/usr/bin/env bash
# Warm-cache ready time of the 8B model, this tree against the files saved in ab_old/ (the
# commit before a startup change), alternating in one call; then ready_probe.py on this tree.
#   mkdir ab_old; for f in $(git diff --name-only BASE); do mkdir -p ab_old/$(dirname $f); git show BASE:$f > ab_old/$f; done
#   run: bash benchmarks/ready_ab_device.sh [MODEL] [ROUNDS]
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
export KVFLOW_CACHE_DIR=/tmp/kvflow-cache
model=${1:-llama3.1-8b}; rounds=${2:-3}
b() {  # one bench process (decode1): its init record's startup timings
  KVFLOW_COMMIT=$1 WORKLOADS=decode1 OUT=$OUT/$2 bash benchmarks/device_run.sh bench $model > /dev/null 2>&1
  python3 -c "import json;r=json.loads(open('$OUT/$2/bench.jsonl').readline());print('$2', {k:r.get(k) for k in ('model_load_s','profile_s','kv_cache_alloc_s','kernel_warmup_s','cuda_graph_s','ready_s','llm_constructor_s')})"
}
swap() { rm -rf kvflow.keep; cp -r kvflow kvflow.keep; cp -r ab_old/kvflow/. kvflow/; }
unswap() { rm -rf kvflow; mv kvflow.keep kvflow; }
b new cold
for i in $(seq $rounds); do
  b new new$i
  swap; b old old$i; unswap
done
python3 benchmarks/ready_probe.py --model benchmarks/configs/$model --out $OUT/ready-new.json > /dev/null 2>$OUT/ready-new.log
python3 -c "import json;r=json.load(open('$OUT/ready-new.json'));print('probe', r['import_s'], r['llm_constructor_s'], 'dynamo loaded:', r['dynamo_loaded'], r['startup'])"
