#!/usr/bin/env bash
# The embedded demo: the same ViT on the bundled digits, trained full-rank and with LTE heads,
# then the two results side by side. No download; about two minutes on two CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT_DIR:-runs}
lte-train --config configs/digits.yaml mode=full out_dir="$out/digits-full" checkpoint.resume=false "$@"
lte-train --config configs/digits.yaml mode=lte out_dir="$out/digits-lte" checkpoint.resume=false "$@"
echo
python -m lte.train.report "$out/digits-full" "$out/digits-lte"
