#!/usr/bin/env bash
# The main job on the embedded default: synthetic videos → shards → streaming batches.
# Everything lands in $VIDREC_DEMO_DIR (default: demo_output/ in the repository).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"

OUT=${VIDREC_DEMO_DIR:-$ROOT/demo_output}
mkdir -p "$OUT"
echo "[vidrec demo] output directory: $OUT"

echo "[vidrec demo] 1/4 synthesizing videos, captions and interactions"
vidrec shards synth --out "$OUT/synth" --items "${VIDREC_DEMO_ITEMS:-240}" \
  --users "${VIDREC_DEMO_USERS:-400}" --no-progress > "$OUT/synth_summary.json"

echo "[vidrec demo] 2/4 building shards"
vidrec shards build --manifest "$OUT/synth/manifest.jsonl" --out "$OUT/shards" \
  --clip-seconds 3 --fps 8 --short-side 112 --samples-per-shard 32

echo "[vidrec demo] 3/4 inspecting shards"
vidrec shards inspect "$OUT/shards" --decode 64 --clips 8

echo "[vidrec demo] 4/4 streaming training batches"
vidrec shards stream "$OUT/shards" --batches 6 --batch-size 8 --frames 8 --size 112 --workers 2

echo "[vidrec demo] done: contact sheet at $OUT/shards/contact_sheet.png"
