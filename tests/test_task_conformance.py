"""Every registered task passes the same checks, as timm's ``test_models.py`` runs one suite over every model.

Parametrized over the registry (image classification, ADE20K, COCO, the tasks of later issues) and the
out-of-tree toy task ``bars`` (``tests/plugins/toy_task.py``, found through ``UNIREPLKNET_TASKS``): each
task's demo preset, shrunk by its ``smoke_overrides``, must
- validate and print only its own sections in a dry run (``python -m pretrain`` and ``python -m finetune``),
- train a few steps and evaluate every sample of its evaluation set,
- resume exactly after SIGTERM sent twice to the process group (exit 75) and then after SIGKILL, ending with
  the weights of an uninterrupted run,
- evaluate on 2 ranks exactly as on 1,
- evaluate its weights without training as its run did,
- export weights that load into the task's model, and ONNX that runs as torch does (or say why not).
A new task gets these tests by registering.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
PLUGINS = REPO / "tests" / "plugins"
TOY_TASK = "bars"  # tests/plugins/toy_task.py, registered in this process only while this module's tests run

from pretrain import registry  # noqa: E402
from pretrain.registry import registered_tasks  # noqa: E402

TASKS = sorted({*registered_tasks(), TOY_TASK})


@pytest.fixture(scope="module", autouse=True)
def toy_task_registered():
    """Register the out-of-tree task for this module and take it out again afterwards: registered at collection,
    it would be in every other module's in-process view of the registry (stage lists, pipelines) but not in
    their subprocesses, which are not given ``UNIREPLKNET_TASKS=toy_task``."""
    known = TOY_TASK in registry.registered_tasks()
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(PLUGINS))
        import toy_task

        registry.register_task(toy_task.TASK)
        yield
    if not known:
        with registry._lock:
            registry._TASKS.pop(TOY_TASK, None)
STEPS = 4
CORE_SECTIONS = {"run_dir", "task", "model", "optim", "train", "checkpoint", "launch", "loader"}


def own_sections(spec) -> set[str]:
    """The sections the task's config class adds to the core's."""
    return {f.name for f in dataclasses.fields(spec.config_class)} - CORE_SECTIONS


def plugin_env() -> dict[str, str]:
    """The environment of a subprocess that must find the toy task too."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["UNIREPLKNET_TASKS"] = ",".join(filter(None, [env.get("UNIREPLKNET_TASKS"), "toy_task"]))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), str(PLUGINS), env.get("PYTHONPATH")]))
    return env


@pytest.fixture(scope="session")
def data_dirs(tmp_path_factory) -> Path:
    """Where every task's generated demo data goes (written once per session, shared by every check)."""
    return tmp_path_factory.mktemp("task_data")


def overrides(name: str, data_dirs: Path, run_dir: Path, **changes) -> list[str]:
    """The task's demo preset shrunk for the checks: its smoke overrides, its data paths under ``data_dirs``,
    ``STEPS`` steps, a checkpoint every 2, one loader worker, no backbone file."""
    from pretrain.config import config_to_dict

    spec = registered_tasks()[name]
    preset = config_to_dict(spec.presets[spec.demo_preset]())
    values: dict[str, object] = {}
    for key in spec.path_keys:  # the preset's relative data folders, moved out of the checkout
        section, field = key.split(".")
        if preset[section][field]:
            values[key] = data_dirs / name / key
    values.update({"run_dir": run_dir, "model.init_from": "", "loader.num_workers": 1, "train.max_steps": STEPS,
                   "train.log_every": 1, "train.eval_every": 0, "checkpoint.every": 2, "checkpoint.keep": 3})
    values.update(changes)
    return [*spec.smoke_overrides, *(f"{key}={value}" for key, value in values.items())]


def command(name: str, data_dirs: Path, run_dir: Path, **changes) -> list[str]:
    spec = registered_tasks()[name]
    return [sys.executable, "-m", "pretrain", "--config", spec.demo_preset, "--set",
            *overrides(name, data_dirs, run_dir, **changes)]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from pretrain.checkpoint import consolidated_state_dict, find_checkpoint

    folder = find_checkpoint(str(run_dir / "checkpoints"))
    assert folder is not None and folder.endswith(f"step_{STEPS:08d}"), folder
    return consolidated_state_dict(folder)


def assert_same_weights(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    different = [name for name in expected if not torch.equal(actual[name], expected[name])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


_REFERENCE: dict[str, tuple[Path, dict]] = {}


@pytest.fixture
def reference(request, data_dirs, tmp_path_factory):
    """An uninterrupted ``STEPS``-step run of the task in this process (once per task): (run dir, final eval)."""
    name = request.node.callspec.params["name"]
    if name not in _REFERENCE:
        from pretrain.config import load_config
        from pretrain.trainer import Trainer

        run_dir = tmp_path_factory.mktemp(f"reference_{name}")
        trainer = Trainer(load_config(registered_tasks()[name].demo_preset, overrides(name, data_dirs, run_dir)))
        try:
            result = trainer.train()
        finally:
            trainer.close()
        assert result.status == "completed" and result.step == STEPS
        _REFERENCE[name] = (run_dir, result.eval)
    return _REFERENCE[name]


def wait_for(predicate, process: subprocess.Popen, what: str, timeout: float = 300, poll: float = 0.2) -> None:
    """Until ``predicate()``; ``poll``: seconds between looks (a signal meant to land mid-run needs a short one:
    the smallest tasks' smoke steps take 60 ms on a fast CPU)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if process.poll() is not None:
            output = process.stdout.read() if process.stdout else ""
            pytest.fail(f"the run ended (exit {process.returncode}) before {what}:\n{output[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(poll)


# ----------------------------------------------------------------------------------------------- the checks


@pytest.mark.parametrize("name", TASKS)
def test_dry_run_validates_and_prints_only_the_tasks_sections(name, data_dirs, tmp_path):
    spec = registered_tasks()[name]
    runs = [command(name, data_dirs, tmp_path / "run") + ["--dry-run"]]
    if spec.downstream:
        runs.append([sys.executable, "-m", "finetune", name, "--config", spec.demo_preset, "--dry-run", "--set",
                     *overrides(name, data_dirs, tmp_path / "run")])
    for args in runs:
        result = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300, env=plugin_env())
        assert result.returncode == 0, result.stderr[-3000:]
        config = json.loads(result.stdout)
        assert config["task"] == name
        own = set(config) - CORE_SECTIONS
        assert own and own == own_sections(spec)
    assert not (tmp_path / "run").exists(), "a dry run writes nothing"


@pytest.mark.parametrize("name", TASKS)
def test_trains_and_evaluates_every_sample(name, reference):
    run_dir, results = reference
    spec = registered_tasks()[name]
    assert results["eval/samples"] > 0
    assert all(metric in results for metric in spec.metrics if metric.startswith("eval/"))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["step"] == STEPS and metrics["eval/samples"] == results["eval/samples"]
    saved = json.loads((run_dir / "config.json").read_text())
    assert set(saved) - CORE_SECTIONS == own_sections(spec)


@pytest.mark.slow
@pytest.mark.parametrize("name", TASKS)
def test_sigterm_twice_then_sigkill_then_rerun_ends_with_the_uninterrupted_weights(name, reference, data_dirs,
                                                                                 tmp_path):
    """One run directory preempted both ways clusters do it: SIGTERM sent twice to the process group (exit 75
    after a checkpoint, off the schedule when it stops at step 1), then the rerun SIGKILLed as soon as it has
    resumed (no chance to save), then a last rerun ends with the uninterrupted run's weights, bit for bit.
    A loader worker in every run, as in the reference (a stream's batches depend on the worker count)."""
    from pretrain.checkpoint import find_checkpoint
    from pretrain.train import REQUEUE_EXIT_CODE

    run_dir = tmp_path / "run"
    args = command(name, data_dirs, run_dir)
    log = run_dir / "train.log"

    def start() -> subprocess.Popen:
        return subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True, env=plugin_env())

    def last_checkpoint() -> str:
        return Path(find_checkpoint(str(run_dir / "checkpoints"))).name

    stopped = start()
    wait_for(lambda: log.exists() and "step 1/" in log.read_text(), stopped, "step 1 in the log", poll=0.01)
    os.killpg(stopped.pid, signal.SIGTERM)
    time.sleep(0.3)
    os.killpg(stopped.pid, signal.SIGTERM)
    output, _ = stopped.communicate(timeout=300)
    assert stopped.returncode == REQUEUE_EXIT_CODE, output[-3000:]
    saved = last_checkpoint()
    assert saved < f"step_{STEPS:08d}", saved

    killed = start()
    resumed = f"resumed from {run_dir / 'checkpoints' / saved}"
    wait_for(lambda: resumed in log.read_text(), killed, "the rerun's resume", poll=0.01)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.communicate(timeout=60)
    complete = last_checkpoint()
    assert complete < f"step_{STEPS:08d}", f"the rerun finished ({complete}) before it was killed"

    rerun = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600, env=plugin_env())
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert log.read_text().count("resumed from") == 2
    assert f"resumed from {run_dir / 'checkpoints' / complete}" in log.read_text().split(resumed, 1)[1]
    assert_same_weights(final_weights(run_dir), final_weights(reference[0]))


@pytest.mark.slow
@pytest.mark.parametrize("name", TASKS)
def test_two_rank_evaluation_equals_one_rank(name, reference, data_dirs, tmp_path):
    from finetune_checks import evaluate_on_ranks

    from pretrain.config import load_config

    spec = registered_tasks()[name]
    micro = load_config(spec.demo_preset, overrides(name, data_dirs, tmp_path)).train.micro_batch_size
    split = {"train.global_batch_size": 2 * micro}  # a batch that splits over 2 ranks (evaluation uses micro-batches)
    outputs = evaluate_on_ranks(spec.demo_preset,
                                lambda ranks: overrides(name, data_dirs, tmp_path / f"run_{ranks}", **split),
                                tmp_path, env=plugin_env())
    assert outputs[1]["eval/samples"] == reference[1]["eval/samples"]
    assert outputs[2].keys() == outputs[1].keys()
    # counts add up exactly; float64 sums (squared errors) are added in another order over 2 ranks: each partial sum
    # rounds by at most 2^-53 relative, so n terms differ by at most ~n * 1.1e-16 (1e-12 covers 9,000 terms)
    assert outputs[2] == pytest.approx(outputs[1], rel=1e-12, abs=0)


@pytest.mark.parametrize("name", TASKS)
def test_evaluate_scores_the_runs_weights_as_the_run_did_and_writes_nothing_there(name, reference, data_dirs,
                                                                                    tmp_path):
    """``evaluate`` of the reference run (``python -m pretrain evaluate``'s worker, in this process): the metrics
    of the run's own final evaluation (and test set), bit for bit, in the evaluation's own directory."""
    from pretrain.config import load_config
    from pretrain.evaluate import evaluation_config, run_evaluation

    run_dir, expected = reference
    before = sorted((str(p), p.stat().st_mtime_ns) for p in run_dir.rglob("*"))
    spec = registered_tasks()[name]
    config = evaluation_config(load_config(spec.demo_preset, overrides(name, data_dirs, tmp_path / "unused")),
                               str(run_dir), out=str(tmp_path / "evaluation"))
    result = run_evaluation(config)
    assert result.status == "completed" and result.step == STEPS
    assert result.eval == expected
    metrics = json.loads((tmp_path / "evaluation" / "metrics.json").read_text())
    assert metrics == {"step": STEPS, **expected}
    assert sorted((str(p), p.stat().st_mtime_ns) for p in run_dir.rglob("*")) == before


@pytest.mark.parametrize("name", TASKS)
def test_export_loads_into_the_tasks_model(name, reference, tmp_path):
    from pretrain.checkpoint import find_checkpoint, read_saved_config
    from pretrain.config import config_from_dict
    from pretrain.export import export_checkpoint
    from pretrain.task import build_task

    run_dir = reference[0]
    summary = export_checkpoint(str(run_dir), str(tmp_path / "model.pth"))
    state = torch.load(tmp_path / "model.pth", weights_only=True)
    assert summary["keys"] == len(state)
    config = config_from_dict(read_saved_config(find_checkpoint(str(run_dir / "checkpoints"))))
    build_task(config).build_model().load_state_dict(state, strict=True)
    assert_same_weights({k: v for k, v in state.items()}, final_weights(run_dir))


@pytest.mark.parametrize("name", TASKS)
def test_export_reparameterized_is_verified_at_the_tasks_input_shape(name, reference, tmp_path):
    """The inference structure of the task's UniRepLKNet, checked in float64 on its own input shape."""
    from pretrain.export import REPARAM_TOLERANCE, export_checkpoint

    summary = export_checkpoint(str(reference[0]), str(tmp_path / "deploy.pth"), reparameterize=True)
    assert summary["reparameterized"] and summary["reparam_max_rel_diff"] <= REPARAM_TOLERANCE
    state = torch.load(tmp_path / "deploy.pth", weights_only=True)
    assert any(key.endswith("lk_origin.weight") for key in state) and not any(".origin_bn." in key for key in state)


@pytest.mark.parametrize("name", TASKS)
def test_export_onnx_runs_in_onnxruntime_as_in_torch_or_says_why_not(name, reference, tmp_path):
    """``python -m finetune export-onnx RUN_DIR``'s function: the re-parameterized model as ONNX, any batch size
    (dense tasks: any height and width too), onnxruntime's outputs within 1e-4 of torch's; a task whose model
    does not export says why and writes nothing."""
    pytest.importorskip("onnxruntime")
    from finetune.export_onnx import ONNX_TOLERANCE, export_task_onnx

    spec, out = registered_tasks()[name], tmp_path / "model.onnx"
    if spec.onnx_unsupported:
        with pytest.raises(ValueError, match=f"task {name} has no ONNX export: "):
            export_task_onnx(str(reference[0]), str(out))
        assert not out.exists()
        return
    summary = export_task_onnx(str(reference[0]), str(out))
    assert out.is_file() and summary["task"] == name and summary["max_rel_diff"] <= ONNX_TOLERANCE
    assert summary["dynamic_dims"] == ([0, 2, 3] if spec.onnx_dynamic_size else [0])


@pytest.mark.parametrize("name", TASKS)
def test_bench_times_the_tasks_synthetic_batch(name, data_dirs, tmp_path):
    from pretrain.bench import bench
    from pretrain.config import load_config

    spec = registered_tasks()[name]
    config = load_config(spec.demo_preset, overrides(name, data_dirs, tmp_path / "run", **{"launch.device": "cpu"}))
    figures = bench(config, steps=1, warmup=0)
    unit = spec.build(config).throughput_unit
    assert figures["task"] == name and figures[f"{unit}_per_s"] > 0 and figures["step_time_s"] > 0
    assert figures["gflops_per_sample"] > 0
    assert not (tmp_path / "run").exists(), "the bench trains in a scratch folder"
