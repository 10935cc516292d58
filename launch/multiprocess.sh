#!/usr/bin/env bash
# Runs dpjax.main as N cooperating CPU processes on this machine: the multi-host
# code path (jax.distributed over a local coordinator) without a cluster.
# See `launch/multiprocess.sh --help` and launch/README.md.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$ROOT/launch/common.sh"

SYNOPSIS="multiprocess.sh --config=FILE[:VARIANT] --workdir=DIR --num_processes=N [--devices_per_process=K] [--port=P] [--config.KEY=VALUE ...] [--dry-run] [--help]"
TAIL_LINES=30
KILL_GRACE_TENTHS=50 # 5 s between SIGTERM and SIGKILL

usage() {
  cat <<EOF
Usage: $SYNOPSIS

Starts N processes from the repository root, process i as
  env JAX_PLATFORMS=cpu PYTHONUNBUFFERED=1 [XLA_FLAGS=...] \\
    \$PYTHON -m dpjax.main --config=... --workdir=DIR [--config.KEY=VALUE ...] \\
    --coordinator_address=127.0.0.1:P --num_processes=N --process_id=i \\
    > DIR/logs/process_i.log 2>&1 &
then waits for all of them. When one fails, the others are stopped (SIGTERM,
then SIGKILL after 5 s), the failed process and the last $TAIL_LINES lines of its
log are printed, and the exit status is 1.

  --config=FILE[:VARIANT]  experiment config; FILE is looked up from the current
                           directory, then from the repository root
  --workdir=DIR            output directory, shared by all processes (a relative
                           DIR is taken from the current directory)
  --num_processes=N        number of processes (required)
  --devices_per_process=K  K virtual CPU devices per process, through
                           XLA_FLAGS=--xla_force_host_platform_device_count=K
                           (appended to any XLA_FLAGS already set)
  --port=P                 coordinator port on 127.0.0.1 (default 12355)
  --config.KEY=VALUE       config override, passed to dpjax.main verbatim (repeatable)
  -- ARGS...               everything after -- is passed to dpjax.main verbatim
  --dry-run                print the commands, shell-quoted, one per line; run nothing
  -h, --help               show this help

Environment:
  PYTHON     interpreter (default: .venv/bin/python under the repository root if
             it exists, else python3)
  XLA_FLAGS  kept; --devices_per_process appends to it
EOF
}

NUM_PROCESSES=
DEVICES_PER_PROCESS=
PORT=12355

parse_flag() {
  case $1 in
    --num_processes=*) NUM_PROCESSES=${1#*=} ;;
    --devices_per_process=*) DEVICES_PER_PROCESS=${1#*=} ;;
    --port=*) PORT=${1#*=} ;;
    *) return 1 ;;
  esac
}

dpjax_parse_args "$@"
[[ -n $NUM_PROCESSES ]] || dpjax_usage_error "missing --num_processes=N"
dpjax_is_posint "$NUM_PROCESSES" ||
  dpjax_usage_error "--num_processes must be a positive integer, not '$NUM_PROCESSES'"
if [[ -n $DEVICES_PER_PROCESS ]] && ! dpjax_is_posint "$DEVICES_PER_PROCESS"; then
  dpjax_usage_error "--devices_per_process must be a positive integer, not '$DEVICES_PER_PROCESS'"
fi
if ! dpjax_is_posint "$PORT" || ((PORT > 65535)); then
  dpjax_usage_error "--port must be an integer in 1..65535, not '$PORT'"
fi
if [[ $WORKDIR == *://* ]]; then
  dpjax_usage_error "--workdir must be a local directory (the logs go to DIR/logs), not $WORKDIR"
fi
dpjax_resolve_config
WORKDIR=$(dpjax_abs_path "$WORKDIR")
PY=$(dpjax_local_python)
LOG_DIR=$WORKDIR/logs

env_vars=(JAX_PLATFORMS=cpu PYTHONUNBUFFERED=1)
if [[ -n $DEVICES_PER_PROCESS ]]; then
  env_vars+=("XLA_FLAGS=${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$DEVICES_PER_PROCESS")
fi

# The command line of process $1, into the array `cmd`.
process_command() {
  cmd=(env "${env_vars[@]}" "$PY" -m dpjax.main "--config=$CONFIG" "--workdir=$WORKDIR"
    ${PASS_ARGS[@]+"${PASS_ARGS[@]}"}
    "--coordinator_address=127.0.0.1:$PORT" "--num_processes=$NUM_PROCESSES" "--process_id=$1")
}

log_file() {
  printf '%s' "$LOG_DIR/process_$1.log"
}

if ((DRY_RUN)); then
  dpjax_step cd "$ROOT"
  dpjax_step mkdir -p "$LOG_DIR"
  for ((i = 0; i < NUM_PROCESSES; i++)); do
    process_command "$i"
    printf '%s > %s 2>&1 &\n' "$(dpjax_quote "${cmd[@]}")" "$(dpjax_quote "$(log_file "$i")")"
  done
  printf 'wait\n'
  exit 0
fi

PIDS=()   # pid of process i
STATUS=() # exit status of process i; unset while it runs

# Stops every process that has not been waited for: SIGTERM, then SIGKILL.
stop_running() {
  local i alive tick
  for ((i = 0; i < ${#PIDS[@]}; i++)); do
    [[ -n ${STATUS[i]:-} ]] || kill -TERM "${PIDS[i]}" 2>/dev/null || true
  done
  for ((tick = 0; tick < KILL_GRACE_TENTHS; tick++)); do
    alive=0
    for ((i = 0; i < ${#PIDS[@]}; i++)); do
      if [[ -z ${STATUS[i]:-} ]] && kill -0 "${PIDS[i]}" 2>/dev/null; then alive=1; fi
    done
    ((alive)) || break
    sleep 0.1
  done
  for ((i = 0; i < ${#PIDS[@]}; i++)); do
    if [[ -z ${STATUS[i]:-} ]]; then
      kill -KILL "${PIDS[i]}" 2>/dev/null || true
      STATUS[i]=0
      wait "${PIDS[i]}" 2>/dev/null || STATUS[i]=$?
    fi
  done
}

on_signal() {
  dpjax_log "interrupted; stopping the processes"
  stop_running
  exit "$1"
}

# From here on, no command substitution: bash 5.2 can drop a SIGINT that arrives while it
# waits for one (3 of 40 and 4 of 100 signals sent into a loop of them), and the processes
# would outlive the interrupt.
trap stop_running EXIT
trap 'on_signal 130' INT
trap 'on_signal 143' TERM

cd "$ROOT"
mkdir -p "$LOG_DIR"
for ((i = 0; i < NUM_PROCESSES; i++)); do
  process_command "$i"
  "${cmd[@]}" >"$LOG_DIR/process_$i.log" 2>&1 &
  PIDS[i]=$!
  dpjax_log "started process $i (pid ${PIDS[i]}), log: $LOG_DIR/process_$i.log"
done

remaining=$NUM_PROCESSES
failed=
while ((remaining > 0)); do
  for ((i = 0; i < NUM_PROCESSES; i++)); do
    [[ -z ${STATUS[i]:-} ]] || continue
    kill -0 "${PIDS[i]}" 2>/dev/null && continue
    STATUS[i]=0
    wait "${PIDS[i]}" || STATUS[i]=$?
    remaining=$((remaining - 1))
    if ((STATUS[i] != 0)); then
      failed=$i
      break 2
    fi
  done
  sleep 0.1
done

if [[ -n $failed ]]; then
  dpjax_log "process $failed failed with exit code ${STATUS[failed]}; stopping the other processes"
  stop_running
  dpjax_log "last $TAIL_LINES lines of $LOG_DIR/process_$failed.log:"
  tail -n "$TAIL_LINES" "$LOG_DIR/process_$failed.log" >&2 || true
  dpjax_log "process $failed failed (exit code ${STATUS[failed]}); logs in $LOG_DIR"
  exit 1
fi
dpjax_log "all $NUM_PROCESSES processes finished; logs in $LOG_DIR"
