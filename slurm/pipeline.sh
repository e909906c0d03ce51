#!/bin/bash
# The whole chain in one job: XL pretraining -> export -> the fine-tunes in parallel -> summary
# (`python -m cluster.pipeline --config xl`, RUN_ROOT/pipeline/summary.json). Stage worker counts come from
# the pipeline's presets or per-stage overrides, e.g.
#   sbatch slurm/pipeline.sh --config xl --set pretrain_xl:launch.num_workers=32 finetune_ade20k:launch.num_workers=8
# USR1 before the time limit: the running stages checkpoint, the job requeues and the rerun skips complete
# stages and resumes the rest from `latest`.
#SBATCH --job-name=unireplknet-pipeline
#SBATCH --nodes=4
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
run_pipeline --config xl "$@"
