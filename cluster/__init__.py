"""Orchestration: stages run as Ray drivers on any Ray cluster (Slurm, the Ray cluster launcher, KubeRay).

``python -m cluster.stage NAME`` runs one stage (``pretrain_xl``, ``export``, ``finetune_ade20k``,
``finetune_coco``), ``python -m cluster.pipeline`` the whole chain; ``slurm/`` holds the sbatch
scripts that start a Ray cluster inside a Slurm job and run a stage or the pipeline on it.
"""
