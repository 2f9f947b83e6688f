#!/usr/bin/env bash
# The GPU check in one command, as the lent CUDA machine runs it (bench/gpu.py's header): installs the carried
# wheels of .whl/ (bench/gpu_wheels.sh) into $GPU_SITE (default /tmp/site), puts them and this repository on
# PYTHONPATH, runs bench/gpu.py with this script's arguments and, where $OUT is set (the device tool), copies
# bench/results/gpu.json and the log there. Exit status: bench/gpu.py's.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SITE=${GPU_SITE:-/tmp/site}
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
        || exit 1
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
LOG=${OUT:-${TMPDIR:-/tmp}}/gpu_log.txt
STARTED=$(mktemp)
"$PY" bench/gpu.py "$@" 2>&1 | tee "$LOG"
rc=${PIPESTATUS[0]}
if [ -n "${OUT:-}" ] && [ bench/results/gpu.json -nt "$STARTED" ]; then  # written by this run
    cp bench/results/gpu.json "$OUT/"
fi
rm -f "$STARTED"
exit "$rc"
