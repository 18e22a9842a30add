#!/usr/bin/env bash
# Pretraining quality in the demo's budget: the demo's pretraining (small preset, 2 ranks, 16
# clips per rank and step) with the settings of launch/configs/small.yaml and the demo's 70
# steps ("new"), and with the settings before ("old": masked video modelling with its decoder,
# 60 steps, the same wall time), over several seeds; the held-out text→video retrieval (36
# cold-start items, never trained on) and the wall and CPU time of each run, then the mean ±
# sd of each config. The demo's data, built once.
#   bash launch/bench_pretrain_quality.sh [OUT]     (default /tmp/vidrec-pretrain-quality)
# Environment: SEEDS (default "1 2 3"; seed 0 was the one tuned on), VARIANTS (default
# "new old"), NEW_STEPS (default 70), OLD_STEPS (default 60).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
OUT=${1:-/tmp/vidrec-pretrain-quality}
NEW_STEPS=${NEW_STEPS:-70}
OLD_STEPS=${OLD_STEPS:-60}
mkdir -p "$OUT"
. "$ROOT/launch/demo_data.sh" "$OUT"
# small.yaml before: masked video modelling at weight 1 through its decoder, the clip masked
# for it (and the contrastive embedding pooling the same visible tubes).
OLD=(--set objectives.masked_video=1.0 --set objectives.contrastive_masking=false)
# Seeds outside, configs inside: the two configs of a seed run back to back, under about the
# same load of the shared machine. CPU seconds (all processes of a run) alongside wall time.
for seed in ${SEEDS:-1 2 3}; do
  for variant in ${VARIANTS:-new old}; do
    case $variant in
      new) overrides=(--set train.steps="$NEW_STEPS") ;;
      old) overrides=("${OLD[@]}" --set train.steps="$OLD_STEPS") ;;
      *) echo "unknown variant $variant (new, old)" >&2; exit 2 ;;
    esac
    run=$OUT/pretrain_${variant}_s$seed
    rm -rf "$run"
    started=$(date +%s)
    /usr/bin/time -o "$run.cpu" -f "%U %S" env CONFIG="$ROOT/launch/configs/small.yaml" GPUS=2 \
      bash "$ROOT/launch/pretrain.sh" \
      --set data.train_shards="$OUT/shards_warm" --set data.eval_shards="$OUT/shards_cold" \
      --set train.output_dir="$run" --set train.seed="$seed" \
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
