# shellcheck shell=bash
#
# Helpers shared by the launch/ scripts. This file is sourced, not executed.
#
# Before sourcing it a script sets ROOT (the repository root) and defines:
#   SYNOPSIS      one-line usage, printed with every usage error
#   usage()       the --help text
#   parse_flag()  handles the script's own flags; returns 1 for a flag it does not know
#
# dpjax_parse_args then sets:
#   CONFIG     --config=FILE[:VARIANT], FILE made relative to ROOT when it lies inside it
#   WORKDIR    --workdir=DIR, as given
#   PASS_ARGS  --config.KEY=VALUE overrides and everything after `--`, verbatim and in order
#   DRY_RUN    1 with --dry-run, else 0
#
# Written for bash 3.2 and later (macOS ships 3.2): no associative arrays, no
# `wait -n`, and empty arrays are expanded as ${a[@]+"${a[@]}"} under `set -u`.

PROG=${PROG:-$(basename "$0")}
CALLER_DIR=$(pwd -P)
CONFIG=
WORKDIR=
DRY_RUN=0
PASS_ARGS=()

# Prints "PROG: error: MESSAGE. Usage: SYNOPSIS" on one line to stderr and exits 2.
dpjax_usage_error() {
  printf '%s: error: %s. Usage: %s\n' "$PROG" "$1" "$SYNOPSIS" >&2
  exit 2
}

# Prints "PROG: error: MESSAGE" to stderr and exits 1.
dpjax_die() {
  printf '%s: error: %s\n' "$PROG" "$1" >&2
  exit 1
}

dpjax_log() {
  printf '%s: %s\n' "$PROG" "$*" >&2
}

# Prints its arguments as one shell-quoted command line (no trailing newline).
dpjax_quote() {
  local quoted
  printf -v quoted '%q ' "$@"
  printf '%s' "${quoted% }"
}

# With --dry-run prints the command on one line; otherwise runs it.
dpjax_step() {
  if ((DRY_RUN)); then
    printf '%s\n' "$(dpjax_quote "$@")"
  else
    "$@"
  fi
}

dpjax_is_posint() {
  [[ $1 =~ ^[1-9][0-9]*$ ]]
}

dpjax_parse_args() {
  while (($# > 0)); do
    case $1 in
      -h | --help)
        usage
        exit 0
        ;;
      --dry-run) DRY_RUN=1 ;;
      --config=*) CONFIG=${1#--config=} ;;
      --workdir=*) WORKDIR=${1#--workdir=} ;;
      --config.*) PASS_ARGS+=("$1") ;;
      --config | --workdir) dpjax_usage_error "$1 needs a value, as in $1=VALUE" ;;
      --)
        shift
        PASS_ARGS+=("$@")
        break
        ;;
      *) parse_flag "$1" || dpjax_usage_error "unknown argument: $1" ;;
    esac
    shift
  done
  [[ -n $CONFIG ]] || dpjax_usage_error "missing --config=FILE[:VARIANT]"
  [[ -n $WORKDIR ]] || dpjax_usage_error "missing --workdir=DIR"
}

# The interpreter: $PYTHON if set (a relative path is taken from the caller's
# directory), else ROOT/.venv/bin/python if it exists, else python3.
dpjax_local_python() {
  if [[ -n ${PYTHON:-} ]]; then
    if [[ $PYTHON == */* && $PYTHON != /* ]]; then
      printf '%s' "$CALLER_DIR/$PYTHON"
    else
      printf '%s' "$PYTHON"
    fi
  elif [[ -x $ROOT/.venv/bin/python ]]; then
    printf '%s' "$ROOT/.venv/bin/python"
  else
    printf '%s' python3
  fi
}

# A local path made absolute against the caller's directory; URLs (gs://...) unchanged.
dpjax_abs_path() {
  local path=$1
  case $path in
    /* | *://*) ;;
    \~) path=$HOME ;;
    \~/*) path=$HOME/${path#\~/} ;;
    *)
      while [[ $path == ./* ]]; do path=${path#./}; done
      if [[ $path == . ]]; then path=$CALLER_DIR; else path=$CALLER_DIR/$path; fi
      ;;
  esac
  printf '%s' "$path"
}

# The commands run with ROOT as the current directory, so the config file is
# looked up from the caller's directory first, then from ROOT. A file inside
# ROOT is written relative to it, one outside as an absolute path. Exits 2 when
# the file is not found.
dpjax_resolve_config() {
  local file=${CONFIG%%:*}
  local variant=${CONFIG#"$file"}
  local found=
  if [[ $file == /* ]]; then
    [[ -f $file ]] && found=$file
  elif [[ -f $CALLER_DIR/$file ]]; then
    found=$CALLER_DIR/$file
  elif [[ -f $ROOT/$file ]]; then
    found=$ROOT/$file
  fi
  if [[ -z $found ]]; then
    dpjax_usage_error "config file not found: $file (looked in $CALLER_DIR and $ROOT)"
  fi
  found="$(cd "$(dirname "$found")" && pwd -P)/$(basename "$found")"
  if [[ $found == "$ROOT"/* ]]; then
    found=${found#"$ROOT"/}
  fi
  CONFIG=$found$variant
}
