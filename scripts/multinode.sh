#!/usr/bin/env bash
# Multi-node training with DeepSpeed's launcher (ssh to every host in the hostfile).
#   scripts/multinode.sh HOSTFILE MODEL DATA OUT [extra train.py options...]
# e.g. scripts/multinode.sh scripts/hostfile 2b_res_64 /data/laion/'{000000..099999}'.tar runs/2b --wandb
# Run it again with --resume to continue from the latest complete checkpoint in OUT.
set -euo pipefail
if [ $# -lt 4 ]; then
  sed -n '2,5p' "$0"; exit 2
fi
HOSTFILE=$1 MODEL=$2 DATA=$3 OUT=$4; shift 4
REPO=$(cd "$(dirname "$0")/.." && pwd)
MASTER_ADDR=${MASTER_ADDR:-$(grep -v '^\s*#' "$HOSTFILE" | awk 'NF {print $1; exit}')}
MASTER_PORT=${MASTER_PORT:-29500}
# NCCL over InfiniBand when present; set NCCL_SOCKET_IFNAME if the hosts have several networks
export NCCL_ASYNC_ERROR_HANDLING=${NCCL_ASYNC_ERROR_HANDLING:-1}
cd "$REPO"
exec deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  imagen_ds/train.py --model "$MODEL" --data "$DATA" --out "$OUT" "$@"
