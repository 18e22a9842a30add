#!/usr/bin/env bash
# The main job on the embedded default: synthetic videos → shards → pretraining on two CPU
# ranks (or the GPUs present) → finetuning the recommender → export, with MLflow tracking in
# local sqlite files.
# Everything lands in $VIDREC_DEMO_DIR (default: demo_output/ in the repository).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"

OUT=${VIDREC_DEMO_DIR:-$ROOT/demo_output}
mkdir -p "$OUT"
echo "[vidrec demo] output directory: $OUT"

echo "[vidrec demo] 1/7 synthesizing videos, captions and interactions"
vidrec shards synth --out "$OUT/synth" --items "${VIDREC_DEMO_ITEMS:-240}" \
  --users "${VIDREC_DEMO_USERS:-400}" --no-progress > "$OUT/synth_summary.json"

echo "[vidrec demo] 2/7 building shards (warm items to train on, cold-start items held out)"
for split in warm cold; do
  vidrec shards build --manifest "$OUT/synth/manifest_$split.jsonl" --out "$OUT/shards_$split" \
    --clip-seconds 3 --fps 8 --short-side 112 --samples-per-shard 32
done

echo "[vidrec demo] 3/7 inspecting shards"
vidrec shards inspect "$OUT/shards_warm" --decode 64 --clips 8

echo "[vidrec demo] 4/7 streaming training batches"
vidrec shards stream "$OUT/shards_warm" --batches 4 --batch-size 8 --frames 8 --size 112 \
  --workers 2

echo "[vidrec demo] 5/7 pretraining the small preset (MiniLM text tower) on ${VIDREC_DEMO_RANKS:-2} ranks"
CONFIG=$ROOT/launch/configs/small.yaml GPUS=${VIDREC_DEMO_RANKS:-2} bash "$ROOT/launch/pretrain.sh" \
  --set data.train_shards="$OUT/shards_warm" --set data.eval_shards="$OUT/shards_cold" \
  --set train.output_dir="$OUT/pretrain" --set train.steps="${VIDREC_DEMO_STEPS:-70}" \
  --set train.eval_every=0 --set train.save_every=35 2>&1 | grep -v "^\[20"
python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
summary = json.loads((out / "pretrain" / "summary.json").read_text())
evaluation = summary["evaluation"] or {}
chance = 100 / evaluation["num_samples"] if evaluation.get("num_samples") else float("nan")
print(f"[vidrec demo] pretraining: {summary['steps']} steps on {summary['world_size']} ranks, "
      f"loss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f}")
print(f"[vidrec demo] retrieval on {evaluation.get('num_samples')} held-out videos: "
      f"text->video R@1 {evaluation.get('t2v_r1', float('nan')):.1f}% "
      f"R@5 {evaluation.get('t2v_r5', float('nan')):.1f}% (chance R@1 {chance:.1f}%)")
print(f"[vidrec demo] MLflow run {summary['mlflow_run_id']}: "
      f"mlflow ui --backend-store-uri sqlite:///{out / 'pretrain' / 'mlflow.db'}")
PY

echo "[vidrec demo] 6/7 finetuning the recommender (frozen encoders) on ${VIDREC_DEMO_RANKS:-2} ranks"
GPUS=${VIDREC_DEMO_RANKS:-2} MASTER_PORT=29501 bash "$ROOT/launch/finetune.sh" \
  --set data.interactions="$OUT/synth/interactions.csv" --set data.catalogue="$OUT/synth/items.jsonl" \
  --set data.cold_items="$OUT/synth/synth.json" \
  --set "data.shards=[$OUT/shards_warm, $OUT/shards_cold]" \
  --set encoder.pretrain_dir="$OUT/pretrain" --set train.output_dir="$OUT/finetune" \
  --set train.steps="${VIDREC_DEMO_FINETUNE_STEPS:-300}" 2>&1 | grep -v "^\[20"


echo "[vidrec demo] 7/7 exporting, registering in MLflow, recommending from the export (no DeepSpeed)"
rm -rf "$OUT/export"
vidrec export --checkpoint "$OUT/finetune" --out "$OUT/export" --register vidrec-demo \
  --tracking-uri "sqlite:///$OUT/finetune/mlflow.db" 2>&1 | grep -E "^(exported|registered)" || true
# Outside the vidrec command nothing turns transformers' "Loading weights" bar off: say so here.
HF_HUB_DISABLE_PROGRESS_BARS=1 python - "$OUT" <<'PY'
# A fresh process that loads the export only: vidrec's recommender, no training stack.
import json, sys
from pathlib import Path
from finetune.recommend import load_recommender, read_histories, recommend_items, select_users
out = Path(sys.argv[1])
users = ["user_00000", "user_00001", "user_00002"]
recommender = load_recommender(out / "export")
histories = read_histories(out / "synth" / "interactions.csv", recommender)
rows = recommend_items(recommender, select_users(histories, users, "interactions.csv"), k=5)
titles = {json.loads(line)["item_id"]: json.loads(line)["title"]
          for line in (out / "synth" / "items.jsonl").read_text().splitlines()}
assert "deepspeed" not in sys.modules
for user in users:
    print(f"[vidrec demo] {user}: " + "; ".join(
        titles[r.item_id] + (" (new)" if r.cold_start else "") for r in rows if r.user_id == user))
PY
echo "[vidrec demo] serving: the export's item index, a new video added live, and why"
vidrec index info --model "$OUT/export" | sed 's/^/[vidrec demo] /'
python - "$OUT" <<'PY'
# A new upload: a held-out (cold-start) video under a new id, with its title and tags.
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
cold = json.loads((out / "synth" / "synth.json").read_text())["cold_start_items"][0]
item = next(json.loads(line) for line in (out / "synth" / "items.jsonl").read_text().splitlines()
            if json.loads(line)["item_id"] == cold)
new = {"item_id": "new_upload", "title": item["title"], "caption": item["caption"],
       "tags": item["tags"], "video": str(out / "synth" / "videos" / f"{cold}.mp4")}
(out / "new_video.jsonl").write_text(json.dumps(new) + "\n")
print(f"[vidrec demo] new video: {new['title']} ({Path(new['video']).name})")
PY
vidrec index add --model "$OUT/export" --items "$OUT/new_video.jsonl" 2>&1 \
  | grep -E "^(added|vidrec index add:)"
echo "[vidrec demo] the users it scores highest for, at once (served from its content):"
vidrec recommend --model "$OUT/export" --item new_upload --users-from "$OUT/synth/interactions.csv" \
  --top-k 3 | tee "$OUT/new_video_users.txt"
fan=$(awk '$1 == "new_upload" && $2 == 1 {print $3}' "$OUT/new_video_users.txt")
echo "[vidrec demo] $fan's list, with the history items that added most to each score:"
vidrec recommend --model "$OUT/export" --interactions "$OUT/synth/interactions.csv" --users "$fan" \
  --top-k 5 --explain 2
echo "[vidrec demo] finetune MLflow: mlflow ui --backend-store-uri sqlite:///$OUT/finetune/mlflow.db"
echo "[vidrec demo] done: contact sheet $OUT/shards_warm/contact_sheet.png, loss curve $OUT/pretrain/loss_curve.png, ranking $OUT/finetune/comparison.png, export $OUT/export"
