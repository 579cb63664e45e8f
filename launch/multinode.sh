#!/usr/bin/env bash
# Multi-node torchrun with c10d rendezvous. Run the same command on every node:
#   NNODES=2 NPROC_PER_NODE=4 RDZV_ENDPOINT=node0:29400 bash launch/multinode.sh --config configs/digits.yaml mode=ps
# Rank 0 (the parameter server in mode=ps) is placed by the rendezvous; see docs/distributed.md, "Placement".
# MAX_RESTARTS=n restarts every process after a failure; with checkpoint.every set, the run resumes.
set -euo pipefail
: "${NNODES:?set NNODES}" "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port of the first node}"
exec torchrun --nnodes="$NNODES" --nproc_per_node="${NPROC_PER_NODE:-1}" \
  --rdzv-backend=c10d --rdzv-endpoint="$RDZV_ENDPOINT" --rdzv-id="${RDZV_ID:-lte}" \
  --max-restarts="${MAX_RESTARTS:-0}" -m lte.train "$@"
