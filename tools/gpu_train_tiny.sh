#!/usr/bin/env bash
# Continue qimg-tiny's training on a lent GPU in one call (the `device` tool runs it from the repository root):
# resumes from the shipped export (or runs/tiny when present), checkpoints every 500 steps, exports what it has when
# the minutes run out, and copies the export, the log and the steps/s into $OUT. Usage:
#   tools/gpu_train_tiny.sh [MINUTES=8] [BATCH=256]
set -euo pipefail
MINUTES=${1:-8}
BATCH=${2:-256}
OUT=${OUT:-out}
mkdir -p "$OUT"
pip install -q -e . >/dev/null 2>&1 || true
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python -m qimg.cli tiny train --device cuda --batch "$BATCH" --minutes "$MINUTES" --work runs/tiny \
  --out "$OUT/qimg-tiny" 2>&1 | tee "$OUT/train.log"
grep -o "[0-9.]* it/s" "$OUT/train.log" | tail -5 | tee "$OUT/steps-per-s.txt"
