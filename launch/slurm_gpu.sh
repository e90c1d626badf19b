#!/usr/bin/env bash
# Submit launch/slurm_gpu.sbatch (multi-host GPU training of dag_jax) with sbatch.
#
# Usage (from the repository root, with your venv active or PYTHON set):
#   bash launch/slurm_gpu.sh [--nodes=N] [--gpus-per-node=G] [--time=HH:MM:SS] \
#       [--partition=P] [--account=A] [--job-name=J] [--sbatch-arg=--qos=high ...] \
#       --config=configs/imagereward.py --workdir=/shared/runs/NAME [--dry-run] \
#       [--config.train.batch_size=64 ...]          # every other flag goes to the trainer
#
# What it runs:
#   sbatch [options] launch/slurm_gpu.sbatch --config=... --workdir=... [forwarded flags]
# Options given here override the #SBATCH directives in launch/slurm_gpu.sbatch; the rest
# keep their values there (2 nodes x 8 GPUs, 24 h, SIGTERM 5 min before the limit, requeue).
# With --dry-run it prints that sbatch command and then what the batch script would run
# on the first node (its own dry run: the srun command with the compilation cache env).
#
# Options:
#   --config=PATH[:variant] --workdir=DIR  required; passed to the trainer (the workdir must be
#                   on a filesystem every node sees)
#   --nodes=N --gpus-per-node=G --time=T --partition=P --account=A --job-name=J
#                   the sbatch options of the same names
#   --sbatch-arg=ARG  any other sbatch option, verbatim (repeatable)
#   --cache-dir=DIR --no-cache  compilation cache, as in slurm_gpu.sbatch
#   --dry-run       print the commands instead of submitting (DRY_RUN=1 does the same)
#   --              everything after it goes to the trainer verbatim
#   -h, --help      this text
# Every other argument (e.g. --config.train.batch_size=64) is forwarded to the trainer verbatim.
#
# Environment:
#   SBATCH   the sbatch binary (default: sbatch)
#   PYTHON, REPO_DIR, SRUN_ARGS, JAX_COMPILATION_CACHE_DIR,
#   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS   passed on to the job (see slurm_gpu.sbatch)
#   DRY_RUN=1  same as --dry-run
# After submitting: squeue --me; tail -f slurm-dag_jax-JOBID.out; scancel --signal=TERM JOBID
# stops a run after a checkpoint; submitting the same command again resumes it.
set -euo pipefail

die() { printf 'slurm_gpu.sh: error: %s\n' "$*" >&2; exit 2; }
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

SCRIPT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/slurm_gpu.sbatch"
CONFIG=""
WORKDIR=""
GPUS=""
[[ ${DRY_RUN:-0} == 1 ]] && DRY_RUN=1 || DRY_RUN=0
SBATCH_OPTS=()
JOB_ARGS=()   # our own options for the batch script
FORWARD=()

while [[ $# -gt 0 ]]; do
  case $1 in
    --config=*) CONFIG=${1#*=} ;;
    --workdir=*) WORKDIR=${1#*=} ;;
    --gpus-per-node=*) GPUS=${1#*=}; SBATCH_OPTS+=("$1") ;;
    --nodes=* | --time=* | --partition=* | --account=* | --job-name=*) SBATCH_OPTS+=("$1") ;;
    --sbatch-arg=*) SBATCH_OPTS+=("${1#*=}") ;;
    --cache-dir=*) JOB_ARGS+=("$1") ;;
    --config | --workdir | --gpus-per-node | --nodes | --time | --partition | --account | \
      --job-name | --sbatch-arg | --cache-dir)
      [[ $# -ge 2 ]] || die "$1 needs a value"
      set -- "$1=$2" "${@:3}"
      continue ;;
    --no-cache) JOB_ARGS+=("$1") ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; FORWARD+=("$@"); break ;;
    *) FORWARD+=("$1") ;;
  esac
  shift
done

[[ -n $CONFIG ]] || die "missing --config=PATH (e.g. --config=configs/imagereward.py)"
[[ -n $WORKDIR ]] || die "missing --workdir=DIR (a directory every node sees, e.g. /shared/runs/NAME)"

ARGS=("--config=$CONFIG" "--workdir=$WORKDIR" ${JOB_ARGS[@]+"${JOB_ARGS[@]}"})
if [[ ${#FORWARD[@]} -gt 0 ]]; then ARGS+=(-- "${FORWARD[@]}"); fi
CMD=("${SBATCH:-sbatch}" ${SBATCH_OPTS[@]+"${SBATCH_OPTS[@]}"} "$SCRIPT" "${ARGS[@]}")

if [[ $DRY_RUN == 1 ]]; then
  show "${CMD[@]}"
  printf '# then, inside the job, %s runs:\n' "$SCRIPT"
  nodes=""
  for opt in ${SBATCH_OPTS[@]+"${SBATCH_OPTS[@]}"}; do
    case $opt in --nodes=*) nodes=${opt#*=} ;; esac
  done
  env DRY_RUN=1 ${GPUS:+"GPUS_PER_NODE=$GPUS"} ${nodes:+"SLURM_JOB_NUM_NODES=$nodes"} \
    bash "$SCRIPT" "${ARGS[@]}"
  exit 0
fi
command -v "${SBATCH:-sbatch}" >/dev/null 2>&1 ||
  die "'${SBATCH:-sbatch}' not found: run this on a Slurm login node (or add --dry-run)"
# sbatch hands this environment to the job, so the GPU count reaches the batch script too
[[ -z $GPUS ]] || export GPUS_PER_NODE=$GPUS
printf '+ %s\n' "$(show "${CMD[@]}")" >&2
exec "${CMD[@]}"
