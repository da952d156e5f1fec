#!/usr/bin/env bash
# Continue an embedded tiny model's training on a lent GPU in one call (the `device` tool runs it from the repository
# root): resumes from the shipped export (or the work folder when present; qimg-tiny's recipe has a new VAE, so it
# trains every stage anew from the export's encoder and transformer blocks), checkpoints every 500 (qimg-tiny) or 250
# (layered) steps, exports what it has when the minutes run out, and copies the export, the log and the steps/s
# into $OUT. Usage:
#   tools/gpu_train_tiny.sh [MINUTES=8] [BATCH=256 for tiny, 64 for layered] [MODEL=tiny|layered]
set -euo pipefail
MINUTES=${1:-8}
MODEL=${3:-tiny}
case "$MODEL" in
  tiny) NAME=qimg-tiny; BATCH=${2:-256} ;;
  layered) NAME=qimg-tiny-layered; BATCH=${2:-64} ;;
  *) echo "MODEL must be tiny or layered, got $MODEL" >&2; exit 2 ;;
esac
OUT=${OUT:-out}
mkdir -p "$OUT"
pip install -q -e . >/dev/null 2>&1 || true
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python -m qimg.cli tiny train --model "$MODEL" --device cuda --batch "$BATCH" --minutes "$MINUTES" \
  --out "$OUT/$NAME" 2>&1 | tee "$OUT/train.log"  # work folder: the CLI's default, runs/tiny or runs/tiny-layered
grep -o "[0-9.]* it/s" "$OUT/train.log" | tail -5 | tee "$OUT/steps-per-s.txt"
