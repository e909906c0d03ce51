"""Orchestration: stages run as Ray drivers on any Ray cluster (Slurm, the Ray cluster launcher, KubeRay).

``python -m cluster.stage NAME`` runs one stage (``pretrain_xl``, ``export``; the fine-tune stages
once ``finetune/`` exists); ``slurm/`` holds the sbatch scripts that start a Ray cluster inside a
Slurm job and run a stage on it.
"""
