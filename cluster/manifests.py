"""``python -m cluster.manifests [--check]``: the KubeRay RayJob of every fine-tuning stage, from one template.

``cluster/kubernetes/rayjob-finetune-TASK.yaml`` is written for each registered fine-tuning task (``python -m
finetune presets``): its stage, its paper-scale preset, its dataset variable, and as many 8-GPU workers as the
preset's global batch needs at its per-GPU batch. Registering a task and running this command adds its
manifest; ``--check`` fails when a committed manifest differs from what the registry gives (the tests run it).
"""
from __future__ import annotations

import argparse
import math
import os
import string
import sys

__all__ = ["GPUS_PER_NODE", "render", "render_all"]

GPUS_PER_NODE = 8
FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kubernetes")

TEMPLATE = string.Template('''# ${what} as a KubeRay RayJob, task ${task}:
# ${summary}
# (ray.io/v1, KubeRay >= 1.5.1): a Ray cluster of a CPU head and one 8-GPU worker, the driver
# `python -m cluster.stage ${stage}`, the cluster deleted when it finishes.
#
#   kubectl apply -f cluster/kubernetes/rayjob-${component}.yaml
#   kubectl logs -f job/unireplknet-${component}
#
# ${reads}
# volume (/runs, pvc-runs.yaml) and writes RUN_ROOT/${stage} there. Retries (`backoffLimit`) run on a new
# Ray cluster and resume from `latest`; a completed stage is skipped.
# The preset is the stage's default (${preset}); another one: `--config NAME` after the
# entrypoint, single settings `--set KEY=VALUE`; `python -m cluster.stage ${stage} --dry-run` with the
# same environment checks them before you apply.
#
# EDIT (marked "EDIT:"): the image, the dataset location, resources, GPU nodes, deadline.
apiVersion: ray.io/v1
kind: RayJob
metadata:
  name: unireplknet-${component}
  labels:
    app.kubernetes.io/name: unireplknet
    app.kubernetes.io/component: ${component}
spec:
  entrypoint: python -m cluster.stage ${stage}
  submissionMode: K8sJobMode
  submitterConfig:
    backoffLimit: 2
  backoffLimit: 3                        # EDIT: new Ray clusters after a failure; each resumes from `latest`
  activeDeadlineSeconds: 172800          # EDIT: 48 h
  shutdownAfterJobFinishes: true
  ttlSecondsAfterFinished: 600
  rayClusterSpec:
    rayVersion: "2.60.0"                 # EDIT: the Ray version in the image
    enableInTreeAutoscaling: false
    authOptions:
      mode: token
    headGroupSpec:
      rayStartParams:
        dashboard-host: "0.0.0.0"
        num-gpus: "0"
      template:
        metadata:
          labels: {app.kubernetes.io/name: unireplknet}
        spec:
          containers:
            - name: ray-head
              # EDIT: an image with this project installed (see rayjob-pretrain-xl.yaml)
              image: &image ghcr.io/your-org/unireplknet:0.1.0
              env: &env
                - name: UNIREPLKNET_RUN_ROOT          # run directories: RUN_ROOT/${stage}, the backbone
                  value: /runs                        # from RUN_ROOT/export/export/backbone.pth
${data_env}                - name: UNIREPLKNET_NUM_WORKERS       # replicas x GPUs: one Ray Train worker per GPU
                  value: "${workers}"
                # - name: UNIREPLKNET_BACKBONE        # other backbone weights (an official file, a URL)
                #   value: /runs/weights/unireplknet_xl_in22k_pretrain.pth
              envFrom: &envFrom
                - secretRef:
                    name: unireplknet-object-storage
              ports:
                - {containerPort: 6379, name: gcs-server}
                - {containerPort: 8265, name: dashboard}
                - {containerPort: 10001, name: client}
              resources:
                requests: {cpu: "8", memory: 32Gi}
                limits: {cpu: "8", memory: 32Gi}
              volumeMounts: &mounts
                - {name: runs, mountPath: /runs}
                - {name: dshm, mountPath: /dev/shm}
          volumes: &volumes
            - name: runs
              persistentVolumeClaim: {claimName: unireplknet-runs}
            - name: dshm
              emptyDir: {medium: Memory}
    workerGroupSpecs:
      - groupName: gpu-${gpus}x
        replicas: ${replicas}                      # ${batch_note}
        minReplicas: ${replicas}
        maxReplicas: ${replicas}
        rayStartParams: {}
        template:
          metadata:
            labels: {app.kubernetes.io/name: unireplknet}
          spec:
            containers:
              - name: ray-worker
                image: *image
                env: *env
                envFrom: *envFrom
                resources:                 # EDIT
                  requests: {cpu: "${cpus}", memory: ${memory}Gi, nvidia.com/gpu: ${gpus}}
                  limits: {cpu: "${cpus}", memory: ${memory}Gi, nvidia.com/gpu: ${gpus}}
                volumeMounts: *mounts
            volumes: *volumes
            tolerations:
              - {key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}
            # nodeSelector: {node.kubernetes.io/instance-type: p4d.24xlarge}   # EDIT
''')


def render(stage: str) -> str:
    """The RayJob manifest of fine-tuning stage ``stage`` (``finetune_TASK``)."""
    from pretrain.config import load_config

    from .stage import finetune_stages

    spec = finetune_stages()[stage]
    config = load_config(spec.cluster_preset)
    workers = max(1, config.train.global_batch_size // config.train.micro_batch_size)
    replicas = math.ceil(workers / GPUS_PER_NODE)
    gpus = min(workers, GPUS_PER_NODE)  # a recipe of fewer GPUs than a node (one window per step) asks for those
    data_env = "".join(
        f"                - name: {variable:<30s}# EDIT: {key} (a folder under /runs, or a URL)\n"
        f"                  value: s3://my-bucket/{spec.name}\n" for variable, key in spec.environment.items())
    if spec.pretrained_backbone:
        what = "Fine-tune the exported UniRepLKNet backbone"
        reads = "It reads the pretraining run's export (RUN_ROOT/export, `python -m cluster.stage export`) from the shared"
    else:
        what = "Train UniRepLKNet from scratch (the task's recipe; `--init` starts from a backbone)"
        reads = "It needs no pretraining run's export; it uses the shared"
    return TEMPLATE.substitute(
        what=what, reads=reads, summary=spec.summary, task=spec.name, stage=stage, component=stage.replace("_", "-"), preset=spec.cluster_preset,
        data_env=data_env, workers=workers, replicas=replicas, gpus=gpus, cpus=11 * gpus, memory=112 * gpus,
        batch_note=f"{config.train.micro_batch_size} per GPU x {workers} GPUs = the recipe's batch of "
                   f"{config.train.global_batch_size}")


def render_all() -> dict[str, str]:
    """File path -> manifest text, for every fine-tuning stage."""
    from .stage import finetune_stages

    return {os.path.join(FOLDER, f"rayjob-{stage.replace('_', '-')}.yaml"): render(stage) for stage in finetune_stages()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.manifests", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only compare with the committed files (exit 1 if stale)")
    args = parser.parse_args(argv)
    stale = []
    for path, text in render_all().items():
        current = open(path).read() if os.path.isfile(path) else None
        if current == text:
            continue
        stale.append(path)
        if not args.check:
            with open(path, "w") as f:
                f.write(text)
            print(f"wrote {path}")
    if args.check and stale:
        print("out of date (run python -m cluster.manifests): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
