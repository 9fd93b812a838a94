# Sourced by the benchmarks/*_device.sh scripts (and device_run.sh): the environment of a device
# call. $OUT exists; the wheels carried in .whl (packages the device image lacks) are installed
# into /tmp/site; kvflow is imported from this checkout; nothing reaches for a hub.
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
