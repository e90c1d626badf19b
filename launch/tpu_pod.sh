#!/usr/bin/env bash
# Run dag_jax training on every host of a Cloud TPU VM slice (single host or pod slice).
#
# Usage (on any machine with the gcloud CLI, from the repository root):
#   bash launch/tpu_pod.sh --tpu=NAME --zone=ZONE [--project=P] \
#       --config=configs/imagereward.py --workdir=gs://BUCKET/runs/NAME \
#       [--setup] [--git=URL [--ref=REF]] [--detach] [--dry-run] \
#       [--config.train.batch_size=64 ...]          # every other flag goes to the trainer
#   bash launch/tpu_pod.sh --tpu=NAME --zone=ZONE --setup-only [--git=URL] [--dry-run]
#   bash launch/tpu_pod.sh --tpu=NAME --zone=ZONE --stop [--dry-run]
#
# What it runs:
#   --setup   first installs the package on every worker, into REMOTE_DIR/.venv. By default it
#             tars this checkout (without .git, .venv, caches), copies it with
#             `gcloud compute tpus tpu-vm scp --worker=all` and unpacks it into REMOTE_DIR;
#             with --git=URL it clones/fetches URL at --ref (default: the remote's HEAD) into
#             REMOTE_DIR instead. Then `pip install -e . $TPU_PIP_PACKAGES` in the venv.
#             --setup-only stops there (no --config/--workdir needed).
#   training  `gcloud compute tpus tpu-vm ssh NAME --worker=all --command=...` runs the SAME
#             command on every host: cd REMOTE_DIR, put .venv/bin first on PATH if it exists,
#               env JAX_COMPILATION_CACHE_DIR=... JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=...
#                   DAG_JAX_DISTRIBUTED=1 $PYTHON -m dag_jax.train --config=... --workdir=... ...
#             with its output copied to LOG_DIR/train-$(hostname).log on each host and its pid
#             in LOG_DIR/train.pid. On a pod slice jax.distributed.initialize() autodetects the
#             coordinator, process count and process id from the TPU metadata server; the
#             trainer calls it because DAG_JAX_DISTRIBUTED=1 (--env=DAG_JAX_DISTRIBUTED=0 turns
#             that off). The workdir must be storage every host sees (gs://...).
#   --detach  start the trainer under nohup and return at once, so the run survives a dropped
#             ssh connection (attached, a lost connection or Ctrl-C ends the run).
#   --stop    send SIGTERM to the trainer on every host: it saves a checkpoint and exits;
#             running the same training command again resumes from the workdir.
#   --dry-run print the exact commands instead of running them (DRY_RUN=1 does the same).
#
# Options:
#   --tpu=NAME --zone=ZONE --project=P   the TPU VM; zone and project default to gcloud's config
#   --config=PATH[:variant] --workdir=DIR  required for training; passed to the trainer
#   --remote-dir=DIR  the checkout on each worker (default ~/dag_jax)
#   --log-dir=DIR     per-host log folder on each worker (default ~/dag_jax_logs)
#   --cache-dir=DIR   JAX persistent compilation cache (default: $JAX_COMPILATION_CACHE_DIR, else
#                     WORKDIR/jax_cache; gs:// works through etils[epath], which orbax installs)
#   --no-cache        leave the compilation cache off
#   --env=KEY=VALUE   extra environment for the trainer on every host (repeatable)
#   --                everything after it goes to the trainer verbatim
#   -h, --help        this text
# Every other argument (e.g. --config.train.batch_size=64) is forwarded to the trainer verbatim,
# quoted with printf %q for the remote shell, so values with spaces or $ survive ssh.
#
# Environment:
#   PYTHON            interpreter on the workers (default: python, the venv's after --setup)
#   GCLOUD            the gcloud binary (default: gcloud)
#   TPU_PIP_PACKAGES  extra requirements --setup installs (default: jax[tpu])
#   SETUP_PYTHON      interpreter that creates the venv on the workers (default: python3)
#   TPU_NAME, ZONE    defaults for --tpu and --zone
#   JAX_COMPILATION_CACHE_DIR                   default for --cache-dir
#   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS  cache only programs that compile longer (1)
#   DRY_RUN=1         same as --dry-run
# The workers' login shell must be bash (the default on TPU VM images).
set -euo pipefail

die() { printf 'tpu_pod.sh: error: %s\n' "$*" >&2; exit 2; }
usage() { awk 'NR == 1 { next } /^#SBATCH/ { print; next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "${BASH_SOURCE[0]}"; }
# one word for the remote shell (printf %q), keeping a leading ~/ so it expands there
rq() {
  # shellcheck disable=SC2088
  case $1 in
    "~") printf '%s' "$1" ;;
    "~/"*) printf '%s%q' "${1%%/*}/" "${1#*/}" ;;
    *) printf '%q' "$1" ;;
  esac
}
# a command line for the remote shell: every argument through printf %q
rcmd() {
  [[ $# -gt 0 ]] || return 0
  local out
  out=$(printf '%q ' "$@")
  printf '%s' "${out% }"
}
# a command line to show: plain words bare, others in single quotes (exact, copy-pasteable)
show() {
  local arg out="" sep="" q="'\\''"
  for arg in "$@"; do
    if [[ $arg =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
      out+="$sep$arg"
    else
      out+="$sep'${arg//\'/$q}'"
    fi
    sep=" "
  done
  printf '%s\n' "$out"
}
run() {
  if [[ $DRY_RUN == 1 ]]; then
    show "$@"
  else
    printf '+ %s' "$(show "$@")" >&2
    printf '\n' >&2
    "$@"
  fi
}

TPU=${TPU_NAME:-}
ZONE=${ZONE:-}
PROJECT=""
CONFIG=""
WORKDIR=""
# shellcheck disable=SC2088  # a literal ~, expanded by the worker's shell
REMOTE_DIR="~/dag_jax" LOG_DIR="~/dag_jax_logs"
CACHE_DIR=""
NO_CACHE=0
GIT_URL=""
GIT_REF=""
SETUP=0
SETUP_ONLY=0
DETACH=0
STOP=0
[[ ${DRY_RUN:-0} == 1 ]] && DRY_RUN=1 || DRY_RUN=0
ENVS=()
FORWARD=()

while [[ $# -gt 0 ]]; do
  case $1 in
    --tpu=*) TPU=${1#*=} ;;
    --zone=*) ZONE=${1#*=} ;;
    --project=*) PROJECT=${1#*=} ;;
    --config=*) CONFIG=${1#*=} ;;
    --workdir=*) WORKDIR=${1#*=} ;;
    --remote-dir=*) REMOTE_DIR=${1#*=} ;;
    --log-dir=*) LOG_DIR=${1#*=} ;;
    --cache-dir=*) CACHE_DIR=${1#*=} ;;
    --git=*) GIT_URL=${1#*=} ;;
    --ref=*) GIT_REF=${1#*=} ;;
    --env=*) ENVS+=("${1#*=}") ;;
    --tpu | --zone | --project | --config | --workdir | --remote-dir | --log-dir | \
      --cache-dir | --git | --ref | --env)
      [[ $# -ge 2 ]] || die "$1 needs a value"
      set -- "$1=$2" "${@:3}"
      continue ;;
    --no-cache) NO_CACHE=1 ;;
    --setup) SETUP=1 ;;
    --setup-only) SETUP=1; SETUP_ONLY=1 ;;
    --detach) DETACH=1 ;;
    --stop) STOP=1 ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; FORWARD+=("$@"); break ;;
    *) FORWARD+=("$1") ;;
  esac
  shift
done

[[ -n $TPU ]] || die "missing --tpu=NAME (the TPU VM to run on)"
TRAIN=1
if [[ $SETUP_ONLY == 1 || $STOP == 1 ]]; then TRAIN=0; fi
if [[ $TRAIN == 1 ]]; then
  [[ -n $CONFIG ]] || die "missing --config=PATH (e.g. --config=configs/imagereward.py)"
  [[ -n $WORKDIR ]] || die "missing --workdir=DIR (e.g. --workdir=gs://BUCKET/runs/NAME)"
  if [[ $WORKDIR != gs://* ]]; then
    printf 'tpu_pod.sh: warning: --workdir=%s is not gs://...; on a multi-host slice every host must see the same workdir\n' "$WORKDIR" >&2
  fi
fi
for kv in ${ENVS[@]+"${ENVS[@]}"}; do
  [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env needs KEY=VALUE, got: $kv"
done
GCLOUD=${GCLOUD:-gcloud}
if [[ $DRY_RUN == 0 ]] && ! command -v "$GCLOUD" >/dev/null 2>&1; then
  die "'$GCLOUD' not found: install the Google Cloud CLI (or add --dry-run to see the commands)"
fi

WHERE=()
[[ -n $ZONE ]] && WHERE+=("--zone=$ZONE")
[[ -n $PROJECT ]] && WHERE+=("--project=$PROJECT")
RDIR=$(rq "$REMOTE_DIR")
LDIR=$(rq "$LOG_DIR")

# run a one-line bash script on every worker of the slice
on_all_workers() {
  [[ $DRY_RUN == 0 ]] || printf '# on every worker of %s:\n' "$TPU"
  run "$GCLOUD" compute tpus tpu-vm ssh "$TPU" ${WHERE[@]+"${WHERE[@]}"} --worker=all \
    "--command=$1"
}

if [[ $STOP == 1 ]]; then
  on_all_workers "if pid=\$(cat $LDIR/train.pid 2>/dev/null) && grep -q dag_jax.train /proc/\$pid/cmdline 2>/dev/null && kill -TERM \$pid; then echo \"\$(hostname): sent SIGTERM to \$pid\"; else echo \"\$(hostname): no trainer running\"; fi"
  exit 0
fi

if [[ $SETUP == 1 ]]; then
  if [[ -n $GIT_URL ]]; then
    url=$(rq "$GIT_URL")
    fetch="if [ ! -d $RDIR/.git ]; then git clone -q $url $RDIR; fi; git -C $RDIR fetch -q $url $(rq "${GIT_REF:-HEAD}"); git -C $RDIR checkout -q --detach FETCH_HEAD"
  else
    ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    TARBALL="${TMPDIR:-/tmp}/dag_jax_src.$$.tar.gz"
    REMOTE_TARBALL=/tmp/dag_jax_src.tar.gz
    if [[ $DRY_RUN == 0 ]]; then trap 'rm -f "$TARBALL"' EXIT; fi
    run tar -C "$ROOT" --exclude=.git --exclude=__pycache__ --exclude='*.pyc' \
      --exclude='*.egg-info' --exclude=.pytest_cache --exclude=.ruff_cache --exclude=./.venv --exclude=./.venv-test \
      --exclude=./venv --exclude=./.whl --exclude=./build --exclude=./dist --exclude=./out \
      --exclude=./runs --exclude=./samples -czf "$TARBALL" .
    run "$GCLOUD" compute tpus tpu-vm scp "$TARBALL" "$TPU:$REMOTE_TARBALL" \
      ${WHERE[@]+"${WHERE[@]}"} --worker=all
    fetch="mkdir -p $RDIR; tar -xzf $REMOTE_TARBALL -C $RDIR; rm -f $REMOTE_TARBALL"
  fi
  read -r -a extra <<<"${TPU_PIP_PACKAGES-jax[tpu]}"
  base=$(rq "${SETUP_PYTHON:-python3}")
  on_all_workers "set -euo pipefail; $fetch; cd $RDIR; if [ ! -x .venv/bin/python ]; then $base -m venv .venv || { rm -rf .venv; sudo apt-get update -qq && sudo apt-get install -y -qq python3-venv && $base -m venv .venv; }; fi; .venv/bin/python -m pip install -q -U pip; .venv/bin/python -m pip install -q -e . $(rcmd ${extra[@]+"${extra[@]}"}); echo \"\$(hostname): ready, jax \$(.venv/bin/python -c \"import dag_jax, jax; print(jax.__version__)\")\""
  [[ $SETUP_ONLY == 0 ]] || exit 0
fi

CMD=(env)
if [[ $NO_CACHE == 0 ]]; then
  CMD+=("JAX_COMPILATION_CACHE_DIR=${CACHE_DIR:-${JAX_COMPILATION_CACHE_DIR:-${WORKDIR%/}/jax_cache}}")
  CMD+=("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-1}")
fi
CMD+=(DAG_JAX_DISTRIBUTED=1 ${ENVS[@]+"${ENVS[@]}"})
CMD+=("${PYTHON:-python}" -m dag_jax.train "--config=$CONFIG" "--workdir=$WORKDIR")
CMD+=(${FORWARD[@]+"${FORWARD[@]}"})
LOG="$LDIR/train-\$(hostname).log"
# ( ... ) is a subshell: it writes its own pid, then exec turns it into the trainer
if [[ $DETACH == 1 ]]; then
  START="( echo \$BASHPID > $LDIR/train.pid; exec nohup $(rcmd "${CMD[@]}") ) > $LOG 2>&1 < /dev/null & echo \"\$(hostname): started, log: $LOG\""
else
  START="( echo \$BASHPID > $LDIR/train.pid; exec $(rcmd "${CMD[@]}") ) 2>&1 | tee $LOG"
fi
on_all_workers "set -euo pipefail; cd $RDIR; if [ -d .venv/bin ]; then export PATH=\"\$PWD/.venv/bin:\$PATH\"; fi; mkdir -p $LDIR; $START"
