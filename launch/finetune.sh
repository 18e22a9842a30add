#!/usr/bin/env bash
# Launch finetuning with the deepspeed launcher: the same environment as launch/pretrain.sh
# (GPUS, NODES, HOSTFILE, MASTER_PORT, CONFIG; default config launch/configs/finetune_small.yaml).
STAGE=finetune exec bash "$(dirname "${BASH_SOURCE[0]}")/pretrain.sh" "$@"
