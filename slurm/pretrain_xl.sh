#!/bin/bash
# Pretrain UniRepLKNet-XL at 384 on ImageNet-22K shards: Ray Train over a Ray cluster started in this job,
# DeepSpeed ZeRO, one worker per GPU. The defaults are the authors' XL run (4 nodes x 8 GPUs);
# every #SBATCH value can be overridden on the command line, e.g.
#   sbatch slurm/pretrain_xl.sh                                            # from the project checkout
#   sbatch --nodes=2 --time=12:00:00 slurm/pretrain_xl.sh --set train.max_steps=1000
#   UNIREPLKNET_TRAIN_SHARDS=s3://bucket/in22k/train sbatch slurm/pretrain_xl.sh
# Arguments after the script go to `python -m cluster.stage pretrain_xl` (--config, --set ...).
# Before the time limit Slurm sends USR1: the run checkpoints, the job requeues itself and resumes
# from `latest`. Logs: slurm-<name>-<jobid>.out here, Ray logs per node under RUN_ROOT/slurm-logs/.
#SBATCH --job-name=unireplknet-pretrain-xl
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -uo pipefail

# shellcheck source=slurm/ray_cluster.sh
source "${UNIREPLKNET_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/ray_cluster.sh"
run_stage pretrain_xl "$@"
