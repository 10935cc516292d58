#!/usr/bin/env bash
# The GPU suite on a box without internet (see experiments/benchmarks/gpu_suite.py):
# installs the wheels carried in <repo>/.whl/ into /tmp/site (no index, no dependency
# resolution), puts the checkout itself on PYTHONPATH (dpjax is not installed) and runs
# the suite, writing gpu_suite.json and gpu_suite.md (gpu_suite_dry_run.* with --dry_run)
# into ${OUT:-.}.
#
#   OUT=results bash experiments/benchmarks/gpu_suite.sh [--budget_s=480] [suite flags]
#   bash experiments/benchmarks/gpu_suite.sh --dry_run      # the same on a CPU, tiny shapes
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON="${PYTHON:-python3}"
OUT="${OUT:-.}"
mkdir -p "$OUT"
shopt -s nullglob
wheels=(.whl/*.whl)
if ((${#wheels[@]})); then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "${wheels[@]}"
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  echo "installed ${#wheels[@]} wheels from .whl/ into /tmp/site"
else
  echo "no wheels in .whl/: using the installed packages only"
fi
export PYTHONPATH="$PWD:$PYTHONPATH"
export PYTHONUNBUFFERED=1
"$PYTHON" -c 'import jax; print("jax", jax.__version__, "devices:", jax.devices())' ||
  echo "jax does not start here; the suite will report every row's error"
exec "$PYTHON" -m experiments.benchmarks.gpu_suite --out_dir="$OUT" "$@"
