#!/bin/bash
# Fine-tune Cascade Mask R-CNN 3x on COCO on the exported backbone (preset coco_xl_cascade_3x; data from
# UNIREPLKNET_COCO_ROOT, backbone from UNIREPLKNET_BACKBONE or the export stage). Same shape as slurm/finetune_ade20k.sh: 1 node x 8 GPUs, 2 images per GPU.
#SBATCH --job-name=unireplknet-finetune-coco
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
run_stage finetune_coco "$@"
