#!/usr/bin/env bash
# The demo's data in OUT, unless already there: the synthetic catalogue (240 items, 400
# users), shards of its warm items to train on and of its cold-start items held out, built as
# launch/demo.sh builds them. Sourced by the benchmark scripts that pretrain on it.
#   . launch/demo_data.sh OUT
if [ ! -f "$1/shards_cold/index.json" ]; then
  vidrec shards synth --out "$1/synth" --items 240 --users 400 --no-progress > /dev/null
  for split in warm cold; do
    vidrec shards build --manifest "$1/synth/manifest_$split.jsonl" \
      --out "$1/shards_$split" --clip-seconds 3 --fps 8 --short-side 112 \
      --samples-per-shard 32 > /dev/null
  done
fi
