#!/bin/bash
# Train UniRepLKNet-B on Kinetics-400 (the authors' recipe, 90 epochs, 16-frame clips as 896 x 896 maps): Ray
# Train over a Ray cluster started in this job, one worker per GPU. Defaults: 1 node x 8 GPUs, 8 clips (4 videos
# x 2 repeats) per GPU, accumulation 2 (the authors' 64 videos per step). Overridable like every stage script:
#   UNIREPLKNET_KINETICS_ROOT=/data/kinetics400 sbatch slurm/finetune_video.sh
#   sbatch slurm/finetune_video.sh --set video.eval_views=single
# The recipe starts from scratch, but the stage, as every fine-tuning stage, passes the export stage's backbone
# (RUN_ROOT/export/export/backbone.pth, UNIREPLKNET_BACKBONE or --init): it must be a UniRepLKNet-B file. Arguments
# go to `python -m cluster.stage finetune_video`. USR1 before the time limit: checkpoint, requeue, resume.
#SBATCH --job-name=unireplknet-finetune-video
#SBATCH --nodes=1
#SBATCH --time=72:00:00
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=96
#SBATCH --exclusive
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -uo pipefail

# shellcheck source=slurm/ray_cluster.sh
source "${UNIREPLKNET_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/ray_cluster.sh"
run_stage finetune_video "$@"
