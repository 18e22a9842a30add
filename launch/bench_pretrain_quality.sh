#!/usr/bin/env bash
# Pretraining quality in the demo's budget: the demo's pretraining (small preset, 2 ranks, 60
# steps of 16 clips per rank) with the settings of launch/configs/small.yaml ("new") and with
# the settings it had before 2026-12-01 ("old"), over several seeds; the held-out text→video
# retrieval (36 cold-start items, never trained on) and the wall time of each run, then the
# mean ± sd of each config. The demo's data, built once.
#   bash launch/bench_pretrain_quality.sh [OUT]     (default /tmp/vidrec-pretrain-quality)
# Environment: SEEDS (default "1 2 3"; seed 0 was the one tuned on), VARIANTS (default
# "new old"), STEPS (default 60).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
OUT=${1:-/tmp/vidrec-pretrain-quality}
STEPS=${STEPS:-60}
mkdir -p "$OUT"
. "$ROOT/launch/demo_data.sh" "$OUT"
# small.yaml before 2026-12-01: every objective at weight 1, 90% of the tubes masked, the
# reader's default crops and flips, 20 warmup steps.
OLD=(--set objectives.masked_language=1.0 --set objectives.mask_ratio=0.9
     --set data.crop_scale=[0.4,1.0] --set data.flip_prob=0.5 --set optimizer.warmup_steps=20)
# Seeds outside, configs inside: the two configs of a seed run back to back, under about the
# same load of the shared machine. CPU seconds (all processes of a run) alongside wall time.
for seed in ${SEEDS:-1 2 3}; do
  for variant in ${VARIANTS:-new old}; do
    case $variant in
      new) overrides=() ;;
      old) overrides=("${OLD[@]}") ;;
      *) echo "unknown variant $variant (new, old)" >&2; exit 2 ;;
    esac
    run=$OUT/pretrain_${variant}_s$seed
    rm -rf "$run"
    started=$(date +%s)
    /usr/bin/time -o "$run.cpu" -f "%U %S" env CONFIG="$ROOT/launch/configs/small.yaml" GPUS=2 \
      bash "$ROOT/launch/pretrain.sh" \
      --set data.train_shards="$OUT/shards_warm" --set data.eval_shards="$OUT/shards_cold" \
      --set train.output_dir="$run" --set train.steps="$STEPS" --set train.seed="$seed" \
      --set train.eval_every=0 --set train.save_every=0 "${overrides[@]}" > "$run.log" 2>&1
    echo "$(( $(date +%s) - started )) $(awk '{print $1 + $2}' "$run.cpu")" > "$run/seconds"
  done
done
python - "$OUT" ${VARIANTS:-new old} <<'PY'
import json, statistics, sys
from pathlib import Path
out, variants = Path(sys.argv[1]), sys.argv[2:]
metrics = ("t2v_r1", "t2v_r5", "v2t_r1", "wall s", "cpu s")
print(f"{'config':>6} {'seeds':>6} " + " ".join(f"{m:>13}" for m in metrics))
for variant in variants:
    runs = sorted(out.glob(f"pretrain_{variant}_s*/summary.json"))
    rows = []
    for path in runs:
        evaluation = json.loads(path.read_text())["evaluation"]
        wall, cpu = map(float, (path.parent / "seconds").read_text().split())
        rows.append([evaluation[m] for m in metrics[:3]] + [wall, cpu])
        print(f"{variant:>6} {path.parent.name[-2:]:>6} " + " ".join(f"{v:>13.1f}" for v in rows[-1]))
    cells = []
    for column in zip(*rows, strict=True):
        spread = statistics.stdev(column) if len(column) > 1 else float("nan")
        cells.append(f"{statistics.mean(column):7.1f} ± {spread:4.1f}")
    print(f"{variant:>6} {len(rows):>6} " + " ".join(f"{c:>13}" for c in cells))
PY
