#!/usr/bin/env bash
# Train the GPU preset to completion on one CUDA GPU and print its figures:
# final val loss (whole val split), train tokens/s, peak GPU memory and wall time (from out-dir/metrics.json).
# Usage: bash benchmarks/gpu_preset.sh [OUT_DIR] [extra main.py flags, e.g. --compile]
set -euo pipefail
out=${1:-out-gpu}
shift || true
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 main.py --preset gpu --out-dir "$out" --max-new-tokens 300 "$@"
cat "$out/metrics.json"
