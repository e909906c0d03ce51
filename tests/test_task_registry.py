"""Tasks are plugins: the trainer core imports no task, tasks are found through the registry (entry points or
``UNIREPLKNET_TASKS``), and a task defined outside the repository (``tests/plugins/toy_task.py``, task ``bars``)
runs through every command the built-in tasks run through, without a line of the repository naming it."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PLUGINS = REPO / "tests" / "plugins"


def plugin_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "UNIREPLKNET_RUN_ROOT")}
    env["UNIREPLKNET_TASKS"] = ",".join(filter(None, [env.get("UNIREPLKNET_TASKS"), "toy_task"]))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), str(PLUGINS), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def run(module: str, *args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env or plugin_env())


# ------------------------------------------------------------------------------------------ the core names no task


def imported_modules(path: Path) -> set[str]:
    """Every module a Python file imports, absolute, at any depth of the file (functions included)."""
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                found.add(".".join([*base, node.module] if node.module else base))
            else:
                found.add(node.module)
    return found


def test_the_trainer_core_imports_no_task_package():
    """No module of ``pretrain/`` outside its own task (image classification, ``pretrain/classification``) imports
    ``finetune`` or a task subpackage; and the classification task imports nothing of the fine-tuning tasks."""
    offenders = []
    for path in sorted((REPO / "pretrain").rglob("*.py")):
        in_task = path.is_relative_to(REPO / "pretrain" / "classification")
        for module in imported_modules(path):
            if module == "finetune" or module.startswith("finetune."):
                offenders.append(f"{path.relative_to(REPO)} imports {module}")
            elif not in_task and module.startswith("pretrain.classification"):
                offenders.append(f"{path.relative_to(REPO)} imports the classification task ({module})")
    assert not offenders, "\n".join(offenders)


def test_the_import_walker_sees_relative_and_nested_imports(tmp_path):
    """The check above must be able to fail: a nested relative import is found."""
    folder = REPO / "pretrain"
    probe = folder / "_probe_for_the_import_test.py"
    probe.write_text("def f():\n    from .classification import task\n    import finetune.coco\n")
    try:
        assert imported_modules(probe) >= {"pretrain.classification", "finetune.coco"}
    finally:
        probe.unlink()


TASK_WORDS = ("ade20k", "coco", "classification")


def code_strings(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every identifier and string constant of a Python file except docstrings."""
    tree = ast.parse(path.read_text(), str(path))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            found.append((node.lineno, node.value))
        elif isinstance(node, ast.Name):
            found.append((node.lineno, node.id))
        elif isinstance(node, ast.Attribute):
            found.append((node.lineno, node.attr))
    return found


def test_cluster_and_slurm_name_no_task():
    """Adding a task adds no branch to ``cluster/`` or ``slurm/``: their code (strings and names, docstrings and
    comments aside) names no task; only the users' own per-task entry files do (``finetune_ade20k``,
    ``finetune_coco``, their sbatch twins, the rendered manifests)."""
    mentions = []
    for path in sorted((REPO / "cluster").rglob("*.py")):
        for line, text in code_strings(path):
            if any(word in text.lower() for word in TASK_WORDS):
                mentions.append(f"{path.relative_to(REPO)}:{line}: {text[:80]!r}")
    per_task = {"finetune_ade20k.sh", "finetune_coco.sh"}
    for path in sorted((REPO / "slurm").glob("*.sh")):
        if path.name in per_task:
            continue
        for line, text in enumerate(path.read_text().splitlines(), 1):
            code = text.split("#", 1)[0] if not text.lstrip().startswith("#!") else ""
            if any(word in code.lower() for word in TASK_WORDS):
                mentions.append(f"{path.relative_to(REPO)}:{line}: {text.strip()[:80]!r}")
    assert not mentions, "\n".join(mentions)


def test_an_unknown_task_is_refused_naming_the_registered_ones(tmp_path):
    from pretrain.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match=r"task: no task 'no_such_task' is registered; registered: .*ade20k.*classification"):
        config_from_dict({"task": "no_such_task", "run_dir": str(tmp_path)})


def test_saved_configs_hold_only_the_runs_sections_and_old_keys_still_parse(tmp_path):
    from pretrain.config import config_to_dict, load_config

    config = load_config("coco_demo", ["data.num_workers=3", "optim.layer_decay_layers=7"])  # the old keys
    saved = config_to_dict(config)
    assert "data" not in saved and "ade20k" not in saved
    assert saved["loader"]["num_workers"] == 3 and saved["coco"]["layer_decay_layers"] == 7
    with pytest.raises(Exception, match="task: fixed by the preset"):
        load_config("coco_demo", ["task=ade20k"])


# ------------------------------------------------------------------------------- an out-of-tree task, end to end


@pytest.fixture(scope="module")
def bars_run(tmp_path_factory):
    """``python -m finetune make-demo-data bars`` then ``python -m finetune bars --data`` on it (24 steps)."""
    root = tmp_path_factory.mktemp("bars")
    made = run("finetune", "make-demo-data", "bars", str(root / "data"), "--train-images", "128", "--val-images", "48")
    assert made.returncode == 0, made.stderr[-2000:]
    assert (root / "data" / "train.npz").is_file()
    trained = run("finetune", "bars", "--data", str(root / "data"), "--run-dir", str(root / "run"), "--set",
                  "loader.num_workers=1", "train.steps=40", "train.eval_every=0")
    assert trained.returncode == 0, trained.stderr[-3000:]
    return root


def test_an_out_of_tree_task_is_listed_by_every_front_end():
    presets = run("finetune", "presets")
    assert presets.returncode == 0 and "bars_demo" in presets.stdout and "coco_demo" in presets.stdout
    assert "bars_demo" in run("pretrain", "presets").stdout
    helped = run("finetune", "--help")
    assert "bars" in helped.stdout
    stage = run("cluster.stage", "--help")
    assert "finetune_bars" in stage.stdout and "UNIREPLKNET_BARS_ROOT" in stage.stdout
    without = run("finetune", "presets", env={k: v for k, v in plugin_env().items() if k != "UNIREPLKNET_TASKS"})
    assert without.returncode == 0 and "bars_demo" not in without.stdout


def test_an_out_of_tree_task_trains_learns_and_predicts(bars_run, tmp_path):
    metrics = json.loads((bars_run / "run" / "metrics.json").read_text())
    assert metrics["eval/samples"] == 48
    assert metrics["eval/accuracy"] >= 75.0, metrics  # two balanced classes: chance is 50 %
    from PIL import Image

    picture = tmp_path / "bar.png"
    Image.new("RGB", (32, 32), (20, 20, 20)).save(picture)
    drawn = run("finetune", "predict", str(bars_run / "run"), str(picture), "--out", str(tmp_path / "out"))
    assert drawn.returncode == 0, drawn.stderr[-2000:]
    assert Path(drawn.stdout.split()[0]).is_file()


def test_an_out_of_tree_task_exports_and_benches(bars_run, tmp_path):
    exported = run("pretrain", "export", str(bars_run / "run"), str(tmp_path / "bars.pth"))
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert json.loads(exported.stdout)["keys"] > 0
    benched = run("pretrain", "bench", "--config", "bars_demo", "--steps", "1", "--warmup", "0", "--set",
                  "launch.device=cpu", f"bars.data_root={tmp_path / 'data'}")
    assert benched.returncode == 0, benched.stderr[-2000:]
    assert json.loads(benched.stdout)["task"] == "bars"


def test_an_out_of_tree_task_is_a_cluster_stage(tmp_path):
    env = plugin_env(UNIREPLKNET_RUN_ROOT=str(tmp_path / "runs"), UNIREPLKNET_NUM_WORKERS="1",
                     UNIREPLKNET_BARS_ROOT=str(tmp_path / "bars"))
    result = run("cluster.stage", "finetune_bars", "--dry-run", env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    config = json.loads(result.stdout)
    assert (config["task"], config["bars"]["data_root"], config["bars"]["generate_demo"]) == (
        "bars", str(tmp_path / "bars"), False)
    assert config["model"]["init_from"] == str(tmp_path / "runs" / "export" / "export" / "backbone.pth")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("name", sorted(__import__("pretrain.registry", fromlist=["x"]).registered_tasks()))
def test_launchers_make_every_path_key_of_every_task_absolute(name, tmp_path, monkeypatch):
    """Workers may start in another directory (Ray, other nodes): each task's ``path_keys`` (and the core's) are
    made absolute against the launching directory; URLs and empty values stay as they are."""
    from pretrain.config import config_to_dict, load_config
    from pretrain.launch import _absolute
    from pretrain.registry import get_task

    spec = get_task(name)
    monkeypatch.chdir(tmp_path)
    keys = ("run_dir", "model.init_from", *spec.path_keys)
    config = load_config(spec.demo_preset, [f"{key}=relative/{key}" for key in keys] + ["checkpoint.resume=some/step"])
    flat = config_to_dict(_absolute(config))
    for key in keys:
        section, _, field = key.rpartition(".")
        value = flat[section][field] if section else flat[field]
        assert value == str(tmp_path / "relative" / key), key
    assert flat["checkpoint"]["resume"] == str(tmp_path / "some" / "step")
    urls = load_config(spec.demo_preset, [f"{key}=s3://bucket/{key}" for key in spec.path_keys])
    flat = config_to_dict(_absolute(urls))
    for key in spec.path_keys:
        section, _, field = key.rpartition(".")
        assert flat[section][field] == f"s3://bucket/{key}"
