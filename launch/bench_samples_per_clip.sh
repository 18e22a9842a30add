#!/usr/bin/env bash
# What repeated sampling costs in learning: the demo's pretraining with 1 and with 2 training
# samples per decoded clip, at the same number of decoded clips (same steps, same clips per
# micro-batch: k = 2 trains on twice the samples), and the held-out text→video retrieval of
# each. One seed per run; the demo's data (synthetic, warm items to train on, cold-start
# items held out).
#   bash launch/bench_samples_per_clip.sh [OUT]     (default /tmp/vidrec-samples-per-clip)
# Environment: STEPS (default 60, the demo's), CLIPS (clips per micro-batch, default 16, the
# small preset's), SEED (default 0), KS (default "1 2").
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
OUT=${1:-/tmp/vidrec-samples-per-clip}
STEPS=${STEPS:-60}
CLIPS=${CLIPS:-16}
SEED=${SEED:-0}
mkdir -p "$OUT"
. "$ROOT/launch/demo_data.sh" "$OUT"
rm -f "$OUT/walls.txt"
for k in ${KS:-1 2}; do
  started=$(date +%s)
  CONFIG=$ROOT/launch/configs/small.yaml GPUS=2 bash "$ROOT/launch/pretrain.sh" \
    --set data.train_shards="$OUT/shards_warm" --set data.eval_shards="$OUT/shards_cold" \
    --set train.output_dir="$OUT/pretrain_k$k" --set train.steps="$STEPS" \
    --set train.seed="$SEED" --set train.eval_every=0 --set train.save_every=0 \
    --set data.samples_per_clip="$k" --set parallel.micro_batch_size=$((CLIPS * k)) \
    > "$OUT/pretrain_k$k.log" 2>&1
  echo "k=$k: $(( $(date +%s) - started )) s wall" >> "$OUT/walls.txt"
done
python - "$OUT" "$STEPS" "$CLIPS" ${KS:-1 2} <<'PY'
import json, sys
from pathlib import Path
out, steps, clips, ks = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
walls = dict(line.split(": ", 1) for line in (out / "walls.txt").read_text().splitlines())
print(f"{'k':>2} {'decoded clips':>14} {'training samples':>17} {'t2v R@1':>8} {'t2v R@5':>8} "
      f"{'v2t R@1':>8}  wall")
for k in ks:
    summary = json.loads((out / f"pretrain_k{k}" / "summary.json").read_text())
    evaluation, world = summary["evaluation"], summary["world_size"]
    decoded = steps * clips * world
    print(f"{k:>2} {decoded:>14} {decoded * int(k):>17} {evaluation['t2v_r1']:>8.1f} "
          f"{evaluation['t2v_r5']:>8.1f} {evaluation['v2t_r1']:>8.1f}  {walls['k=' + k]}")
PY
