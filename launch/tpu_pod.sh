#!/usr/bin/env bash
# Runs dpjax.main on a Cloud TPU VM slice (single- or multi-host) with gcloud:
# create the TPU VM, copy the repository to every worker, install it, run the
# same command on all workers, and delete the TPU VM (unless --keep).
# See `launch/tpu_pod.sh --help` and launch/README.md.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$ROOT/launch/common.sh"

SYNOPSIS="tpu_pod.sh --tpu_name=NAME --zone=ZONE --accelerator_type=TYPE [--project=P] [--runtime_version=V] [--keep] --config=FILE[:VARIANT] --workdir=DIR [--config.KEY=VALUE ...] [--dry-run] [--help]"

# What is left out of the copy of the repository: ./NAME only at the top, NAME anywhere.
TAR_EXCLUDES=(./.git ./.venv ./venv ./build ./dist ./logs ./workdirs ./.hypothesis ./.pytest_cache
  __pycache__ '*.egg-info')
REMOTE_DIR=dpjax         # on every worker, under the home directory
REMOTE_TARBALL=dpjax.tar.gz

usage() {
  cat <<EOF
Usage: $SYNOPSIS

Steps, in order (each is one command; --dry-run prints them all):
  1. tar the repository (without ${TAR_EXCLUDES[*]})
     into \${TMPDIR:-/tmp}/dpjax-NAME.tar.gz
  2. gcloud compute tpus tpu-vm create NAME ...
  3. gcloud compute tpus tpu-vm scp TARBALL NAME:$REMOTE_TARBALL --worker=all ...
  4. gcloud compute tpus tpu-vm ssh NAME --worker=all --command='unpack into ~/$REMOTE_DIR;
     \$PYTHON -m pip install -e . jax[tpu]'
  5. gcloud compute tpus tpu-vm ssh NAME --worker=all --command='cd $REMOTE_DIR &&
     \$PYTHON -m dpjax.main --config=... --workdir=... [--config.KEY=VALUE ...]'
  6. gcloud compute tpus tpu-vm delete NAME ...   (skipped with --keep)
Once the TPU VM exists it is deleted on every exit, also when a step fails or
the script is interrupted; a TPU VM that could not be created is not touched.
Every worker runs the same command; jax.distributed.initialize() detects the
slice on its own.

  --tpu_name=NAME          TPU VM name (required)
  --zone=ZONE              e.g. us-central2-b (required)
  --accelerator_type=TYPE  e.g. v4-32, v5litepod-16, v5p-8, v6e-8 (required)
  --project=P              Google Cloud project (default: gcloud's configured one)
  --runtime_version=V      TPU software version (default by TYPE: v2-v4:
                           tpu-ubuntu2204-base, v5litepod: v2-alpha-tpuv5-lite,
                           v5p: v2-alpha-tpuv5, v6e: v2-alpha-tpuv6e)
  --keep                   do not delete the TPU VM at the end
  --config=FILE[:VARIANT]  experiment config inside the repository
  --workdir=DIR            output directory as the workers see it; use a gs://
                           bucket so that all workers share it (a relative DIR is
                           taken from ~/$REMOTE_DIR on the workers)
  --config.KEY=VALUE       config override, passed to dpjax.main verbatim (repeatable)
  -- ARGS...               everything after -- is passed to dpjax.main verbatim
  --dry-run                print the commands, shell-quoted, one per line; run
                           nothing (gcloud need not be installed)
  -h, --help               show this help

Environment:
  PYTHON   interpreter on the TPU workers (default: python3). The install needs
           the Python version dpjax requires (setup.cfg); pick a runtime version
           or an interpreter that has it.
  TMPDIR   where the tarball is written (default: /tmp)
EOF
}

TPU_NAME=
ZONE=
ACCELERATOR_TYPE=
PROJECT=
RUNTIME_VERSION=
KEEP=0

parse_flag() {
  case $1 in
    --tpu_name=*) TPU_NAME=${1#*=} ;;
    --zone=*) ZONE=${1#*=} ;;
    --accelerator_type=*) ACCELERATOR_TYPE=${1#*=} ;;
    --project=*) PROJECT=${1#*=} ;;
    --runtime_version=*) RUNTIME_VERSION=${1#*=} ;;
    --keep) KEEP=1 ;;
    *) return 1 ;;
  esac
}

dpjax_parse_args "$@"
[[ -n $TPU_NAME ]] || dpjax_usage_error "missing --tpu_name=NAME"
[[ -n $ZONE ]] || dpjax_usage_error "missing --zone=ZONE"
[[ -n $ACCELERATOR_TYPE ]] || dpjax_usage_error "missing --accelerator_type=TYPE"
if [[ -z $RUNTIME_VERSION ]]; then
  case $ACCELERATOR_TYPE in
    v2-* | v3-* | v4-*) RUNTIME_VERSION=tpu-ubuntu2204-base ;;
    v5litepod-* | v5e-*) RUNTIME_VERSION=v2-alpha-tpuv5-lite ;;
    v5p-*) RUNTIME_VERSION=v2-alpha-tpuv5 ;;
    v6e-*) RUNTIME_VERSION=v2-alpha-tpuv6e ;;
    *) dpjax_usage_error "no default --runtime_version for --accelerator_type=$ACCELERATOR_TYPE; pass one" ;;
  esac
fi
dpjax_resolve_config
if [[ $CONFIG == /* ]]; then
  dpjax_usage_error "the config file must be inside the repository ($ROOT), which is what the workers get: $CONFIG"
fi
PY=${PYTHON:-python3}

TARBALL=${TMPDIR:-/tmp}
TARBALL=${TARBALL%/}/dpjax-$TPU_NAME.tar.gz

gcloud_tpu() { # gcloud_tpu VERB ARGS... -> the gcloud command line, into `cmd`
  cmd=(gcloud compute tpus tpu-vm "$@" "--zone=$ZONE")
  if [[ -n $PROJECT ]]; then cmd+=("--project=$PROJECT"); fi
  cmd+=(--quiet)
}

tar_cmd=(tar -czf "$TARBALL")
for pattern in "${TAR_EXCLUDES[@]}"; do tar_cmd+=("--exclude=$pattern"); done
tar_cmd+=(-C "$ROOT" .)

gcloud_tpu create "$TPU_NAME" "--accelerator-type=$ACCELERATOR_TYPE" "--version=$RUNTIME_VERSION"
create_cmd=("${cmd[@]}")

gcloud_tpu scp "$TARBALL" "$TPU_NAME:$REMOTE_TARBALL" --worker=all
scp_cmd=("${cmd[@]}")

install_remote="mkdir -p $REMOTE_DIR && tar -xzf $REMOTE_TARBALL -C $REMOTE_DIR && cd $REMOTE_DIR && $(dpjax_quote "$PY" -m pip install -q -e . 'jax[tpu]')"
gcloud_tpu ssh "$TPU_NAME" --worker=all "--command=$install_remote"
install_cmd=("${cmd[@]}")

run_remote="cd $REMOTE_DIR && $(dpjax_quote "$PY" -m dpjax.main "--config=$CONFIG" "--workdir=$WORKDIR" ${PASS_ARGS[@]+"${PASS_ARGS[@]}"})"
gcloud_tpu ssh "$TPU_NAME" --worker=all "--command=$run_remote"
run_cmd=("${cmd[@]}")

gcloud_tpu delete "$TPU_NAME"
delete_cmd=("${cmd[@]}")

if ((DRY_RUN)); then
  dpjax_step "${tar_cmd[@]}"
  dpjax_step "${create_cmd[@]}"
  dpjax_step "${scp_cmd[@]}"
  dpjax_step "${install_cmd[@]}"
  dpjax_step "${run_cmd[@]}"
  if ((KEEP)); then
    printf '# --keep: the TPU VM is kept; delete it with: %s\n' "$(dpjax_quote "${delete_cmd[@]}")"
  else
    dpjax_step "${delete_cmd[@]}"
  fi
  dpjax_step rm -f "$TARBALL"
  exit 0
fi

command -v gcloud >/dev/null 2>&1 ||
  dpjax_die "gcloud not found; install the Google Cloud CLI (or use --dry-run)"

CREATED=0
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  rm -f "$TARBALL"
  if ((CREATED && KEEP)); then
    dpjax_log "TPU VM $TPU_NAME kept (--keep); delete it with: $(dpjax_quote "${delete_cmd[@]}")"
  elif ((CREATED)); then
    dpjax_log "deleting TPU VM $TPU_NAME"
    if ! "${delete_cmd[@]}"; then
      dpjax_log "warning: could not delete TPU VM $TPU_NAME; delete it yourself: $(dpjax_quote "${delete_cmd[@]}")"
      if ((rc == 0)); then rc=1; fi
    fi
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

step() {
  dpjax_log "$1: $(dpjax_quote "${@:2}")"
  "${@:2}"
}

step "packing the repository" "${tar_cmd[@]}"
step "creating TPU VM $TPU_NAME" "${create_cmd[@]}"
CREATED=1
step "copying the repository to all workers" "${scp_cmd[@]}"
step "installing on all workers" "${install_cmd[@]}"
step "running on all workers" "${run_cmd[@]}"
dpjax_log "run finished"
