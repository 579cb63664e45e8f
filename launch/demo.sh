#!/usr/bin/env bash
# The embedded demo: the same ViT on the bundled digits (no download), trained four ways on this
# machine's CPUs, then the results side by side:
#   full  full-rank, one process          ddp  full-rank DDP, 2 processes (Gloo)
#   lte   4 simulated LTE heads           ps   parameter server + 2 workers x 2 heads, nf4 base (Gloo)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT_DIR:-runs}
cfg=configs/digits.yaml
common=(checkpoint.resume=false train.log_every=250 "$@")
lte-train --config $cfg mode=full out_dir="$out/digits-full" "${common[@]}"
lte-train --nproc-per-node 2 --config $cfg mode=ddp out_dir="$out/digits-ddp" "${common[@]}"
lte-train --config $cfg mode=lte out_dir="$out/digits-lte" "${common[@]}"
lte-train --nproc-per-node 3 --config $cfg mode=ps out_dir="$out/digits-ps" "${common[@]}"
echo
python -m lte.train.report "$out/digits-full" "$out/digits-ddp" "$out/digits-lte" "$out/digits-ps"
