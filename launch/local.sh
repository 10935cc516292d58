#!/usr/bin/env bash
# Runs dpjax.main as a single process on this machine.
# See `launch/local.sh --help` and launch/README.md.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$ROOT/launch/common.sh"

SYNOPSIS="local.sh --config=FILE[:VARIANT] --workdir=DIR [--config.KEY=VALUE ...] [--dry-run] [--help]"

usage() {
  cat <<EOF
Usage: $SYNOPSIS

Runs one process from the repository root:
  \$PYTHON -m dpjax.main --config=FILE[:VARIANT] --workdir=DIR [--config.KEY=VALUE ...]
JAX uses the local accelerators, or detects a TPU VM / SLURM job on its own.

  --config=FILE[:VARIANT]  experiment config; FILE is looked up from the current
                           directory, then from the repository root
  --workdir=DIR            output directory (a relative DIR is taken from the current directory)
  --config.KEY=VALUE       config override, passed to dpjax.main verbatim (repeatable)
  -- ARGS...               everything after -- is passed to dpjax.main verbatim
  --dry-run                print the commands, shell-quoted, one per line; run nothing
  -h, --help               show this help

Environment:
  PYTHON   interpreter (default: .venv/bin/python under the repository root if it
           exists, else python3)
EOF
}

parse_flag() {
  return 1
}

dpjax_parse_args "$@"
dpjax_resolve_config
WORKDIR=$(dpjax_abs_path "$WORKDIR")
PY=$(dpjax_local_python)

cmd=("$PY" -m dpjax.main "--config=$CONFIG" "--workdir=$WORKDIR" ${PASS_ARGS[@]+"${PASS_ARGS[@]}"})

dpjax_step cd "$ROOT"
if ((DRY_RUN)); then
  dpjax_step "${cmd[@]}"
  exit 0
fi
dpjax_log "running: $(dpjax_quote "${cmd[@]}")"
exec "${cmd[@]}"
