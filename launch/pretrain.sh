#!/usr/bin/env bash
# Launch a training stage with the deepspeed launcher, configured from the environment:
#   STAGE     pretrain (default) or finetune; launch/finetune.sh sets finetune
#   CONFIG    run config (default launch/configs/small.yaml, or finetune_small.yaml)
#   GPUS      processes per node (default: every GPU, or 2 CPU ranks without GPUs)
#   NODES     nodes (default 1); with NODES > 1 set HOSTFILE (lines "host slots=N")
#   HOSTFILE  deepspeed hostfile for multi-node runs
#   MASTER_PORT  rendezvous port (default 29500)
# Extra arguments go to `vidrec $STAGE`, e.g. --set train.steps=500.
# The config is validated for the whole world size before any rank starts.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STAGE=${STAGE:-pretrain}
case $STAGE in
  pretrain) CONFIG=${CONFIG:-$ROOT/launch/configs/small.yaml} ;;
  finetune) CONFIG=${CONFIG:-$ROOT/launch/configs/finetune_small.yaml} ;;
  *) echo "STAGE must be pretrain or finetune, not '$STAGE'" >&2; exit 2 ;;
esac
NODES=${NODES:-1}
MASTER_PORT=${MASTER_PORT:-29500}
if [ -z "${GPUS:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    GPUS=$(nvidia-smi -L | wc -l)
  else
    GPUS=2
  fi
fi
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export DS_ACCELERATOR=cpu
fi
VIDREC=$(command -v vidrec)

vidrec "$STAGE" --config "$CONFIG" --check --world-size $((GPUS * NODES)) "$@" > /dev/null

if [ "$NODES" -gt 1 ]; then
  : "${HOSTFILE:?set HOSTFILE for multi-node runs}"
  exec deepspeed --hostfile "$HOSTFILE" --num_nodes "$NODES" --num_gpus "$GPUS" \
    --master_port "$MASTER_PORT" "$VIDREC" "$STAGE" --config "$CONFIG" "$@"
fi
exec deepspeed --num_gpus "$GPUS" --master_port "$MASTER_PORT" \
  "$VIDREC" "$STAGE" --config "$CONFIG" "$@"
