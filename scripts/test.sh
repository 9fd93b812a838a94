#!/usr/bin/env bash
# The test command (README): the CPU suite. GPU tests are marked `gpu` and skip without CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec python3 -m pytest -q --timeout=900 -p no:cacheprovider tests "$@"
