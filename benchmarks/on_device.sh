#!/usr/bin/env bash
# Run the GPU checks on the `device` tool's machine, which has its own Python and torch, no network
# and no `pip install -e .`: the repository goes on PYTHONPATH and bitsandbytes (missing there)
# comes as a carried wheel in .whl/ (see docs/gpu.md, "On a lent GPU").
#   bash benchmarks/on_device.sh tests                  # tests/test_cuda.py
#   bash benchmarks/on_device.sh suite [gpu_suite.py options, e.g. --only comm memory]
# Logs and the suite's gpu_suite.json / gpu_suite.md go to $OUT (what the tool brings back: a few
# files, not the runs' folders, which stay in /tmp).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results/device}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 - <<'PY' 2>&1 | tee "$out/versions.txt"
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device")
for name in ("timm", "torchvision", "bitsandbytes", "sklearn", "yaml", "matplotlib"):
    try:
        print(name, __import__(name).__version__)
    except Exception as exc:
        print(name, "MISSING:", exc)
PY
part=${1:-}
shift || true
case "$part" in
    tests)
        python3 -m pytest -q -rs tests/test_cuda.py "$@" 2>&1 | tee "$out/test_cuda.log" ;;
    suite)
        python3 benchmarks/gpu_suite.py --results /tmp/gpu_suite "$@" 2>&1 | tee "$out/gpu_suite.log"
        cp /tmp/gpu_suite/gpu_suite.json /tmp/gpu_suite/gpu_suite.md "$out"/ 2>/dev/null ;;
    *)
        echo "usage: bash benchmarks/on_device.sh tests|suite [options]" >&2; exit 2 ;;
esac
