#!/bin/bash
# Fine-tune the exported backbone on any registered task (`python -m finetune presets` lists them): Ray Train
# over a Ray cluster started in this job, one worker per GPU, the task's paper-scale preset. The first
# argument is the task, the rest go to `python -m cluster.stage finetune_TASK`, e.g.
#   UNIREPLKNET_ADE20K_ROOT=/data/ADEChallengeData2016 sbatch slurm/finetune.sh ade20k
#   sbatch slurm/finetune.sh coco --config coco_l_cascade_3x --init /weights/l_in22k.pth
# Defaults: 1 node x 8 GPUs (override with sbatch --nodes / --gpus-per-node). USR1 before the time limit:
# checkpoint, requeue, resume from `latest`. finetune_ade20k.sh and finetune_coco.sh are this script with
# their task fixed.
#SBATCH --job-name=unireplknet-finetune
#SBATCH --nodes=1
#SBATCH --time=48:00:00
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -uo pipefail

if [[ $# -lt 1 || "$1" == -* ]]; then
    echo "usage: sbatch slurm/finetune.sh TASK [cluster.stage arguments]" >&2
    exit 2
fi
task=$1
shift
# shellcheck source=slurm/ray_cluster.sh
source "${UNIREPLKNET_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/ray_cluster.sh"
run_stage "finetune_$task" "$@"
