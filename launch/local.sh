#!/usr/bin/env bash
# Run dag_jax training on this machine: one process driving all local devices.
#
# Usage:
#   bash launch/local.sh --config=configs/imagereward.py --workdir=runs/NAME \
#       [--cpu] [--devices=N] [--cache-dir=DIR | --no-cache] [--dry-run] \
#       [--config.train.batch_size=64 ...]          # every other flag goes to the trainer
#   bash launch/local.sh --config=configs/imagereward.py:tiny --workdir=/tmp/tiny --cpu
#
# What it runs (replacing this shell, so Ctrl-C and SIGTERM reach the trainer directly):
#   env [JAX_PLATFORMS=cpu] [XLA_FLAGS=...] JAX_COMPILATION_CACHE_DIR=...
#       JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=... $PYTHON -m dag_jax.train
#       --config=... --workdir=... [forwarded flags]
# SIGTERM (or Ctrl-C) makes the trainer save a checkpoint and exit; the same command resumes.
#
# Options:
#   --config=PATH[:variant] --workdir=DIR  required; passed to the trainer
#   --cpu             force the CPU backend (JAX_PLATFORMS=cpu), even with a GPU/TPU present
#   --devices=N       N virtual CPU devices (XLA_FLAGS+=--xla_force_host_platform_device_count=N)
#                     to exercise the sharded code paths without accelerators; implies --cpu
#   --cache-dir=DIR   JAX persistent compilation cache (default: $JAX_COMPILATION_CACHE_DIR,
#                     else WORKDIR/jax_cache)
#   --no-cache        leave the compilation cache off
#   --dry-run         print the exact command instead of running it (DRY_RUN=1 does the same)
#   --                everything after it goes to the trainer verbatim
#   -h, --help        this text
# Every other argument (e.g. --config.train.batch_size=64) is forwarded to the trainer verbatim.
#
# Environment:
#   PYTHON     interpreter (default: python, e.g. your activated venv's)
#   XLA_FLAGS  kept; --devices appends to it
#   JAX_COMPILATION_CACHE_DIR                   default for --cache-dir
#   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS  cache only programs that compile longer (1)
#   DRY_RUN=1  same as --dry-run
set -euo pipefail

die() { printf 'local.sh: error: %s\n' "$*" >&2; exit 2; }
usage() { awk 'NR == 1 { next } /^#SBATCH/ { print; next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "${BASH_SOURCE[0]}"; }
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

CONFIG=""
WORKDIR=""
CPU=0
DEVICES=""
CACHE_DIR=""
NO_CACHE=0
[[ ${DRY_RUN:-0} == 1 ]] && DRY_RUN=1 || DRY_RUN=0
FORWARD=()

while [[ $# -gt 0 ]]; do
  case $1 in
    --config=*) CONFIG=${1#*=} ;;
    --workdir=*) WORKDIR=${1#*=} ;;
    --devices=*) DEVICES=${1#*=} ;;
    --cache-dir=*) CACHE_DIR=${1#*=} ;;
    --config | --workdir | --devices | --cache-dir)
      [[ $# -ge 2 ]] || die "$1 needs a value"
      set -- "$1=$2" "${@:3}"
      continue ;;
    --cpu) CPU=1 ;;
    --no-cache) NO_CACHE=1 ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; FORWARD+=("$@"); break ;;
    *) FORWARD+=("$1") ;;
  esac
  shift
done

[[ -n $CONFIG ]] || die "missing --config=PATH (e.g. --config=configs/imagereward.py:tiny)"
[[ -n $WORKDIR ]] || die "missing --workdir=DIR (e.g. --workdir=runs/tiny)"
if [[ -n $DEVICES ]]; then
  [[ $DEVICES =~ ^[1-9][0-9]*$ ]] || die "--devices needs a positive integer, got: $DEVICES"
  CPU=1
fi

CMD=(env)
[[ $CPU == 0 ]] || CMD+=(JAX_PLATFORMS=cpu)
if [[ -n $DEVICES ]]; then
  CMD+=("XLA_FLAGS=${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$DEVICES")
fi
if [[ $NO_CACHE == 0 ]]; then
  CMD+=("JAX_COMPILATION_CACHE_DIR=${CACHE_DIR:-${JAX_COMPILATION_CACHE_DIR:-${WORKDIR%/}/jax_cache}}")
  CMD+=("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-1}")
fi
CMD+=("${PYTHON:-python}" -m dag_jax.train "--config=$CONFIG" "--workdir=$WORKDIR")
CMD+=(${FORWARD[@]+"${FORWARD[@]}"})

if [[ $DRY_RUN == 1 ]]; then
  show "${CMD[@]}"
  exit 0
fi
printf '+ %s' "$(show "${CMD[@]}")" >&2
printf '\n' >&2
exec "${CMD[@]}"
