#!/usr/bin/env bash
# The device check: model tests on the GPU, our step vs torchvision's (bf16 and fp16 autocast,
# R50-FPN, canvas 1024, batch 8), host syncs per step; one JSON ($OUT/gpu_check.json, or
# ./gpu_check.json, or --out). Needs python3 with torch and torchvision only (pytest for the
# tests). At most 8 minutes on one GPU. Dry run on a CPU: bash bench/gpu_check.sh --device cpu --steps 1
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 480 "$PYTHON" bench/gpu_check.py "$@"
