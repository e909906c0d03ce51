"""The shipped cluster configs, offline: the KubeRay manifests (``cluster/kubernetes/``) against the KubeRay
v1.7 CRD schemas, closed so that a misspelled key fails, and the core objects against the Kubernetes schemas
(``kubernetes-validate``); every RayJob entrypoint is a ``python -m cluster.stage``/``cluster.pipeline``
command that passes the project's own ``--dry-run`` with the manifest's environment; the Ray cluster-launcher
YAMLs against Ray's own schema (what ``ray up`` checks); the ``ray submit`` stage scripts.

The CRDs are read from ``../shared/schemas`` beside the project (or ``$UNIREPLKNET_SCHEMAS``); the tests that
need them skip, saying so, where they are absent."""
from __future__ import annotations

import copy
import functools
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
KUBE = REPO / "cluster" / "kubernetes"
LAUNCHER_CONFIGS = [REPO / "cluster" / "cluster.yaml", REPO / "cluster" / "cluster.local.yaml"]
STAGE_SCRIPTS = ["pretrain_xl", "finetune_coco", "finetune_ade20k", "finetune", "pipeline"]
RAY_KINDS = {"RayJob": "ray.io_rayjobs.yaml", "RayCluster": "ray.io_rayclusters.yaml"}
CORE_KINDS = {"PersistentVolumeClaim", "Secret", "ConfigMap"}
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}
NOT_YET = "not available yet"  # what cluster.stage says for a stage this version does not have


def load_manifests() -> list[tuple[str, dict]]:
    """(file name, document) for every YAML document under cluster/kubernetes/."""
    found = []
    for path in sorted(KUBE.glob("*.y*ml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                found.append((path.name, doc))
    return found


MANIFESTS = load_manifests()
RAY_MANIFESTS = [(name, doc) for name, doc in MANIFESTS if doc.get("kind") in RAY_KINDS]
RAYJOBS = [(name, doc) for name, doc in MANIFESTS if doc.get("kind") == "RayJob"]
CORE_MANIFESTS = [(name, doc) for name, doc in MANIFESTS if doc.get("kind") in CORE_KINDS]


def ids(items):
    return [name for name, _ in items]


def schemas_dir() -> Path | None:
    path = Path(os.environ.get("UNIREPLKNET_SCHEMAS") or REPO.parent / "shared" / "schemas")
    return path if (path / "kuberay-v1.7.0").is_dir() else None


def close_objects(schema):
    """A copy of ``schema`` where every object schema with ``properties`` and no ``additionalProperties``
    rejects other keys (the CRDs leave them open, so a misspelled key would pass)."""
    if isinstance(schema, list):
        return [close_objects(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {key: close_objects(value) for key, value in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema \
            and not schema.get("x-kubernetes-preserve-unknown-fields"):
        closed["additionalProperties"] = False
    return closed


def crd_schema(kind: str, closed: bool = True) -> dict:
    """The CRD's ``openAPIV3Schema`` for ``kind`` (version v1), closed by :func:`close_objects` unless asked."""
    root = schemas_dir()
    if root is None:
        pytest.skip("KubeRay CRD schemas not found: expected ../shared/schemas/kuberay-v1.7.0 beside the project "
                    "or UNIREPLKNET_SCHEMAS=DIR")
    return _load_crd_schema(root / "kuberay-v1.7.0" / RAY_KINDS[kind], closed)


@functools.lru_cache(maxsize=None)
def _load_crd_schema(path: Path, closed: bool) -> dict:
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 1 MB: C loader
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = version["schema"]["openAPIV3Schema"]
    return close_objects(schema) if closed else schema


def schema_errors(doc: dict, schema: dict) -> list[str]:
    import jsonschema

    validator = jsonschema.Draft7Validator(schema)
    return [f"{'.'.join(map(str, error.absolute_path)) or '<root>'}: {error.message}"
            for error in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))]


def cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def pod_specs(doc: dict) -> list[tuple[str, dict]]:
    """("head" | group name, pod spec) of every Ray pod the manifest makes."""
    spec = cluster_spec(doc)
    pods = [("head", spec["headGroupSpec"]["template"]["spec"])]
    pods += [(group["groupName"], group["template"]["spec"]) for group in spec.get("workerGroupSpecs", [])]
    return pods


def head_container(doc: dict) -> dict:
    return cluster_spec(doc)["headGroupSpec"]["template"]["spec"]["containers"][0]


def container_env(container: dict) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env", []) if "value" in item}


# ---------------------------------------------------------------------------------------------------- KubeRay


def test_the_expected_manifests_are_there():
    names = {name for name, _ in MANIFESTS}
    assert {"rayjob-pretrain-xl.yaml", "rayjob-finetune-coco.yaml", "rayjob-finetune-ade20k.yaml",
            "rayjob-pipeline.yaml", "raycluster.yaml", "pvc-runs.yaml", "secret-object-storage.yaml"} <= names
    unknown = [(name, doc.get("kind")) for name, doc in MANIFESTS if doc.get("kind") not in {*RAY_KINDS, *CORE_KINDS}]
    assert not unknown, f"kinds this test does not validate: {unknown}"


@pytest.mark.parametrize("name,doc", RAY_MANIFESTS, ids=ids(RAY_MANIFESTS))
def test_kuberay_manifest_matches_the_closed_crd_schema(name, doc):
    assert doc["apiVersion"] == "ray.io/v1"
    errors = schema_errors(doc, crd_schema(doc["kind"]))
    assert not errors, f"{name}:\n" + "\n".join(errors)


@pytest.mark.parametrize("name,doc", RAYJOBS, ids=ids(RAYJOBS))
def test_rayjob_obeys_the_rules_the_schema_cannot_check(name, doc):
    """KubeRay's CEL rules and operator checks (cluster.md): name, submission mode, retries, TTL, cluster."""
    spec = doc["spec"]
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"]) and len(doc["metadata"]["name"]) <= 47
    assert spec.get("submissionMode", "K8sJobMode") in SUBMISSION_MODES
    assert ("rayClusterSpec" in spec) != ("clusterSelector" in spec)
    assert spec["backoffLimit"] >= 1, "a retry resumes from `latest`: give the job at least one"
    assert spec.get("submissionMode") != "InteractiveMode" and "clusterSelector" not in spec  # backoffLimit > 0
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] >= 0
    assert spec["activeDeadlineSeconds"] > 0


def test_a_misspelled_key_fails_the_closed_schema_and_only_it():
    name, doc = next((n, d) for n, d in RAYJOBS if n == "rayjob-pretrain-xl.yaml")
    open_schema, closed = crd_schema("RayJob", closed=False), crd_schema("RayJob")
    typo_top = copy.deepcopy(doc)
    typo_top["spec"]["shutdownAfterJobFinish"] = typo_top["spec"].pop("shutdownAfterJobFinishes")
    typo_pod = copy.deepcopy(doc)
    container = typo_pod["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    container["volumeMount"] = container.pop("volumeMounts")
    for bad, key in ((typo_top, "shutdownAfterJobFinish"), (typo_pod, "volumeMount")):
        assert not schema_errors(bad, open_schema), "the CRD as shipped accepts unknown keys (why it is closed)"
        errors = schema_errors(bad, closed)
        assert any(f"'{key}' was unexpected" in error for error in errors), errors


@pytest.mark.parametrize("name,doc", RAY_MANIFESTS, ids=ids(RAY_MANIFESTS))
def test_ray_pods_share_the_run_volume_image_and_environment(name, doc):
    from cluster.stage import environment

    ENVIRONMENT = environment()

    volumes = {n: d for n, d in MANIFESTS if d.get("kind") == "PersistentVolumeClaim"}
    secrets = {d["metadata"]["name"]: d for n, d in MANIFESTS if d.get("kind") == "Secret"}
    claims = {d["metadata"]["name"] for d in volumes.values()}
    head = head_container(doc)
    for group, pod in pod_specs(doc):
        (container,) = pod["containers"]
        assert container["image"] == head["image"] and container.get("env") == head.get("env"), group
        env = container_env(container)
        assert set(env) <= set(ENVIRONMENT), f"{group}: not read by cluster.stage: {set(env) - set(ENVIRONMENT)}"
        pvcs = {v["name"]: v["persistentVolumeClaim"]["claimName"]
                for v in pod["volumes"] if "persistentVolumeClaim" in v}
        assert set(pvcs.values()) <= claims, f"{group}: claims {pvcs} not among pvc manifests {claims}"
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert mounts.get(env["UNIREPLKNET_RUN_ROOT"]) in pvcs, f"{group}: the run root is not on the shared volume"
        for source in container.get("envFrom", []):
            assert source["secretRef"]["name"] in secrets, source
        if group != "head":  # whole 8-GPU nodes, or the fewer GPUs a one-node recipe needs
            assert container["resources"]["limits"]["nvidia.com/gpu"] in (1, 2, 4, 8)
            assert container["resources"]["requests"] == container["resources"]["limits"]
    if doc["kind"] == "RayJob":  # a fixed-size cluster: one Ray Train worker per GPU of it
        gpus = sum(g["replicas"] * g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
                   for g in cluster_spec(doc)["workerGroupSpecs"])
        entrypoint = doc["spec"]["entrypoint"]
        if "cluster.pipeline" in entrypoint:
            assert f"pretrain_xl:launch.num_workers={gpus}" in entrypoint
        else:
            assert int(container_env(head)["UNIREPLKNET_NUM_WORKERS"]) == gpus


@pytest.mark.parametrize("name,doc", CORE_MANIFESTS, ids=ids(CORE_MANIFESTS))
def test_core_manifest_validates_with_kubernetes_validate(name, doc):
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install -e '.[dev]' installs it")
    version = kubernetes_validate.latest_version()
    kubernetes_validate.validate(doc, version, strict=True)
    bad = copy.deepcopy(doc)
    bad["metadata"]["nmae"] = "typo"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, version, strict=True)
    if doc["kind"] == "PersistentVolumeClaim":
        assert doc["spec"]["accessModes"] == ["ReadWriteMany"], "every Ray pod mounts the run directories"
    if doc["kind"] == "Secret":
        assert set(doc["stringData"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"}
        assert doc["stringData"]["AWS_ACCESS_KEY_ID"] == doc["stringData"]["AWS_SECRET_ACCESS_KEY"] == "REPLACE_ME"


# ------------------------------------------------------------------------------------------ RayJob entrypoints


def parse_entrypoint(entrypoint: str) -> tuple[str, list[str]]:
    """("cluster.stage" | "cluster.pipeline", arguments) of ``python -m MODULE ARGS``, else AssertionError."""
    words = shlex.split(entrypoint)
    assert words[:2] == ["python", "-m"] and words[2] in {"cluster.stage", "cluster.pipeline"}, entrypoint
    return words[2], words[3:]


def run_module(module: str, args: list[str], env: dict, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=timeout)


def stage_dry_run(stage: str, args: list[str], env: dict, cwd: Path) -> dict | None:
    """``python -m cluster.stage STAGE ARGS --dry-run``: the config it prints; None (xfail) for a stage that
    this version does not have, which must say so."""
    result = run_module("cluster.stage", [stage, *args, "--dry-run"], env, cwd)
    if result.returncode != 0 and NOT_YET in result.stderr:
        assert result.returncode == 1 and f"{stage}: {NOT_YET}" in result.stderr
        return None
    assert result.returncode == 0, f"{stage} {' '.join(args)}:\n{result.stderr[-3000:]}"
    return json.loads(result.stdout)


def check_stage_config(stage: str, config: dict | None, env: dict, run_root: Path, workers: int | None) -> None:
    """What the stage took from the manifest: its run directory, data, worker count."""
    from cluster.stage import finetune_stages

    if config is None or stage not in {"pretrain_xl", *finetune_stages()}:
        return
    assert config["run_dir"] == str(run_root / stage)
    if workers is not None:
        assert config["launch"]["num_workers"] == workers
    if stage == "pretrain_xl":
        assert (config["data"]["train_urls"], config["data"]["val_urls"]) == \
            (env["UNIREPLKNET_TRAIN_SHARDS"], env["UNIREPLKNET_VAL_SHARDS"])
    else:
        spec = finetune_stages()[stage]
        assert config["task"] == spec.name
        for variable, key in spec.environment.items():
            section, name = key.split(".")
            assert config[section][name] == env[variable]
        backbone = str(run_root / "export" / "export" / "backbone.pth") if spec.pretrained_backbone else ""
        assert config["model"]["init_from"] == backbone


def pipeline_stage_commands(args: list[str]) -> list[tuple[str, list[str]]]:
    """(stage, cluster.stage arguments) of the training stages ``python -m cluster.pipeline ARGS`` runs, from
    its ``pipelines()`` table and ``--set STAGE:KEY=VALUE`` (the pipeline has no dry run of its own)."""
    import argparse

    from cluster.pipeline import pipelines

    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="demo")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[])
    known, _ = parser.parse_known_args(args)
    pipeline, extra = pipelines()[known.config], {}
    for item in known.overrides:
        stage, _, override = item.partition(":")
        extra.setdefault(stage, []).append(override)

    def with_extra(stage: str, arguments) -> list[str]:
        arguments = list(arguments)
        more = extra.get(stage, [])
        return arguments + (more if "--set" in arguments else ["--set", *more]) if more else arguments

    return [("pretrain_xl", with_extra("pretrain_xl", pipeline.pretrain)),
            *((stage, with_extra(stage, arguments)) for stage, arguments in pipeline.finetunes.items())]


@pytest.mark.parametrize("name,doc", RAYJOBS, ids=ids(RAYJOBS))
def test_rayjob_entrypoint_passes_the_stage_dry_run(name, doc, tmp_path):
    """The entrypoint with the head's environment (the driver runs there), the run root in tmp_path."""
    from cluster.stage import stages

    STAGES = stages()

    module, args = parse_entrypoint(doc["spec"]["entrypoint"])
    run_root = tmp_path / "runs"
    env = {**container_env(head_container(doc)), "UNIREPLKNET_RUN_ROOT": str(run_root), "RAY_AUTH_MODE": "disabled"}
    if module == "cluster.pipeline":
        if not (REPO / "cluster" / "pipeline.py").exists():
            pytest.skip("cluster/pipeline.py is not written yet: the entrypoint parses, nothing to run")
        helped = run_module(module, ["--help"], env, tmp_path)
        assert helped.returncode == 0, helped.stderr
        if "--dry-run" in helped.stdout:
            result = run_module(module, [*args, "--dry-run"], env, tmp_path)
            assert result.returncode == 0, result.stderr[-3000:]
            return
        for stage, arguments in pipeline_stage_commands(args):  # each stage as the pipeline will run it
            config = stage_dry_run(stage, arguments, env, tmp_path)
            check_stage_config(stage, config, env, run_root, None)
        assert not run_root.exists(), "a dry run writes nothing"
        return
    stage, *rest = args
    assert stage in STAGES, f"{name}: unknown stage {stage!r}"
    config = stage_dry_run(stage, rest, env, tmp_path)
    assert not run_root.exists(), "a dry run writes nothing"
    if config is None:
        pytest.xfail(f"{stage} is not available in this version (it says so), so it has no dry run")
    check_stage_config(stage, config, env, run_root, int(env["UNIREPLKNET_NUM_WORKERS"]))


def test_entrypoint_parser_refuses_other_commands():
    for entrypoint in ("python train.py", "python -m pretrain --config demo", "bash -c 'python -m cluster.stage x'"):
        with pytest.raises(AssertionError):
            parse_entrypoint(entrypoint)


# --------------------------------------------------------------------------------------- Ray cluster launcher


def launcher_config_error(config: dict) -> Exception | None:
    """What ``ray up`` checks before it starts anything: Ray's defaults for the provider filled in, then
    ``ray.autoscaler._private.util.validate_config`` (``ray-schema.json`` and the node-type rules)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        validate_config(prepare_config(copy.deepcopy(config)))
    except Exception as error:  # jsonschema.ValidationError, ValueError
        return error
    return None


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=[p.name for p in LAUNCHER_CONFIGS])
def test_launcher_config_validates_against_rays_schema(path):
    config = yaml.safe_load(path.read_text())
    assert launcher_config_error(config) is None, launcher_config_error(config)
    typo = copy.deepcopy(config)
    typo["setup_comands"] = typo.pop("setup_commands", [])
    assert "'setup_comands' was unexpected" in str(launcher_config_error(typo))
    typo = copy.deepcopy(config)
    typo["auth"]["ssh_private_keys"] = "~/.ssh/x"
    assert "'ssh_private_keys' was unexpected" in str(launcher_config_error(typo))
    starts = " ".join(config.get("head_start_ray_commands", []) + config.get("worker_start_ray_commands", []))
    for port in map(int, re.findall(r"--port=(\d+)", starts)):
        assert not 10002 <= port <= 19999, "the head port must lie outside Ray's default worker ports"


def test_the_aws_config_installs_the_project_and_has_8_gpu_workers():
    config = yaml.safe_load(LAUNCHER_CONFIGS[0].read_text())
    assert config["provider"]["type"] == "aws"
    assert "." in config["file_mounts"].values(), "the checkout is copied to the nodes"
    assert any("pip install" in c and "-e" in c and "[all]" in c for c in config["setup_commands"])
    assert any("UNIREPLKNET_RUN_ROOT" in c for c in config["setup_commands"])
    workers = {n: t for n, t in config["available_node_types"].items() if n != config["head_node_type"]}
    assert [t["node_config"]["InstanceType"] for t in workers.values()] == ["p4d.24xlarge"]


def test_the_local_config_never_runs_ray_stop():
    """`ray stop` ends every Ray instance of the user on the machine, not only this cluster's."""
    config = yaml.safe_load(LAUNCHER_CONFIGS[1].read_text())
    assert config["provider"] == {"type": "local", "head_ip": "127.0.0.1", "worker_ips": []}
    commands = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert not any("ray stop" in command for command in commands)
    assert all("--temp-dir=" in command for command in commands)


# -------------------------------------------------------------------------------------------- stage scripts


@pytest.mark.parametrize("script", STAGE_SCRIPTS)
def test_stage_script_is_an_executable_python_file_without_extension(script):
    path = REPO / "cluster" / script
    assert path.is_file() and not path.suffix and os.access(path, os.X_OK)
    assert path.read_text().startswith("#!/usr/bin/env python3\n\"\"\"")
    tracked = subprocess.run(["git", "ls-files", "-s", str(path)], cwd=REPO, capture_output=True, text=True).stdout
    if tracked:  # what `git clone` gives users
        assert tracked.startswith("100755"), tracked


def run_script(script: str, *args: str, python: list[str] | None = None, env: dict | None = None,
               cwd: Path | None = None) -> subprocess.CompletedProcess:
    """As ``ray submit`` runs it on the head: ``python ~/SCRIPT ARGS`` from elsewhere than the checkout."""
    return subprocess.run([*(python or [sys.executable]), str(REPO / "cluster" / script), *args], cwd=cwd or REPO,
                          capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=180)


def test_stage_script_help_works_through_the_script(tmp_path):
    result = run_script("finetune_ade20k", "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "usage: python -m cluster.stage" in result.stdout and "UNIREPLKNET_RUN_ROOT" in result.stdout


def test_stage_script_runs_its_own_stage(tmp_path):
    env = {"UNIREPLKNET_RUN_ROOT": str(tmp_path / "runs"), "UNIREPLKNET_NUM_WORKERS": "8"}
    result = run_script("pretrain_xl", "--dry-run", "--set", "train.max_steps=10", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)
    assert (config["run_dir"], config["train"]["max_steps"]) == (str(tmp_path / "runs" / "pretrain_xl"), 10)


def test_the_generic_finetune_script_runs_the_named_tasks_stage(tmp_path):
    env = {"UNIREPLKNET_RUN_ROOT": str(tmp_path / "runs"), "UNIREPLKNET_NUM_WORKERS": "8",
           "UNIREPLKNET_ADE20K_ROOT": str(tmp_path / "ade20k")}
    result = run_script("finetune", "ade20k", "--dry-run", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)
    assert (config["task"], config["run_dir"]) == ("ade20k", str(tmp_path / "runs" / "finetune_ade20k"))
    assert config["ade20k"]["data_root"] == str(tmp_path / "ade20k") and config["ade20k"]["generate_demo"] is False
    missing = run_script("finetune", cwd=tmp_path)
    assert missing.returncode == 1 and "usage: cluster/finetune TASK" in missing.stderr


def test_every_finetune_stage_has_its_rendered_kuberay_manifest():
    """`python -m cluster.manifests --check`: the committed RayJob of each registered fine-tuning task is what the
    template and the registry give (a new task gets its manifest by running the command)."""
    result = subprocess.run([sys.executable, "-m", "cluster.manifests", "--check"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    from cluster.manifests import render_all

    assert {Path(p).name for p in render_all()} >= {"rayjob-finetune-ade20k.yaml", "rayjob-finetune-coco.yaml"}


def test_stage_script_says_the_project_must_be_installed(tmp_path):
    """Without site-packages and PYTHONPATH (``-S -E``) the project cannot be imported: the script names the fix."""
    result = run_script("finetune_ade20k", "--help", python=[sys.executable, "-S", "-E"], cwd=tmp_path)
    assert result.returncode == 1
    assert "must be installed on this (head) node" in result.stderr and "setup_commands" in result.stderr


def test_pipeline_script_runs_the_pipeline_or_says_it_is_missing(tmp_path):
    result = run_script("pipeline", "--help", cwd=tmp_path)
    if (REPO / "cluster" / "pipeline.py").exists():
        assert result.returncode == 0, result.stderr
    else:
        assert result.returncode == 1 and "no cluster.pipeline module" in result.stderr, result.stderr
