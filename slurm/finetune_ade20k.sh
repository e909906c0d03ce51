#!/bin/bash
# Fine-tune UperNet on ADE20K (160k iterations, crop 640) on the exported backbone: Ray Train over a Ray
# cluster started in this job, one worker per GPU. Defaults: 1 node x 8 GPUs, 2 images per GPU (the
# authors' 16 per step). Overridable like every stage script, e.g.
#   UNIREPLKNET_ADE20K_ROOT=/data/ADEChallengeData2016 sbatch slurm/finetune_ade20k.sh
#   sbatch slurm/finetune_ade20k.sh --config ade20k_l_upernet_640_160k --init /weights/l_in22k.pth
# The backbone defaults to the export stage's RUN_ROOT/export/export/backbone.pth (UNIREPLKNET_BACKBONE
# or --init for another). Arguments go to `python -m cluster.stage finetune_ade20k`. USR1 before the time
# limit: checkpoint, requeue, resume from `latest`.
#SBATCH --job-name=unireplknet-finetune-ade20k
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

# shellcheck source=slurm/ray_cluster.sh
source "${UNIREPLKNET_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/ray_cluster.sh"
run_stage finetune_ade20k "$@"
