"""The time-series task through the trainer (issue 22 points 5, 7, 9, 10, 11): the demo forecasts well below the
persistence baseline and the untrained model, early stopping on validation MSE (and a resumed run that stays
stopped), windows with gaps skipped and counted in every split, preflight errors naming the key, the authors'
schedule by hand, and the authors' presets built and stepped at reduced size. The conformance suite
(tests/test_task_conformance.py) adds the launchers, exact resume, preemption, two-rank evaluation, evaluate,
export and bench for this task as for every registered one."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> str:
    from finetune.timeseries.demo_data import write_demo

    out = tmp_path_factory.mktemp("timeseries_demo")
    write_demo(out, seed=0)  # 44 stations, 120 days: 2,015 / 288 / 577 hours
    return str(out)


def run_overrides(root: str, run_dir: Path, **changes) -> list[str]:
    """``timeseries_demo`` on ``root`` at smoke size (what the conformance suite uses)."""
    values = {"run_dir": run_dir, "timeseries.data_root": root, "timeseries.generate_demo": "false",
              "timeseries.d_ff": 32, "loader.num_workers": 0, "train.micro_batch_size": 8,
              "train.global_batch_size": 8, "train.log_every": 1, "checkpoint.every": 1000}
    values.update(changes)
    return [f"{key}={value}" for key, value in values.items()]


def test_demo_forecasts_well_below_persistence_and_the_untrained_model(demo_root, tmp_path):
    """``timeseries_demo`` through the trainer (DeepSpeed ZeRO 1, CPU, one loader worker): 150 steps of 8 windows
    bring the validation MSE (stored units, all 44 stations x 24 hours of the 217 windows) far below both the
    persistence forecast (the last input hour repeated) and the same model untrained; the test split is scored at
    the end with the best validation weights; TensorBoard holds the input plots and forecast-vs-truth plots."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pretrain.config import load_config
    from pretrain.trainer import Trainer

    run = tmp_path / "run"
    config = load_config("timeseries_demo", [f"run_dir={run}", f"timeseries.data_root={demo_root}",
                                             "timeseries.generate_demo=false", "train.eval_every=75"])
    trainer = Trainer(config)
    try:
        before = trainer.evaluate()
        result = trainer.train()
    finally:
        trainer.close()
    after = result.eval
    print(f"time-series demo: validation MSE {before['eval/mse']:.0f} untrained -> {after['eval/mse']:.0f} after "
          f"{result.step} steps (MAE {before['eval/mae']:.1f} -> {after['eval/mae']:.1f}); persistence MSE "
          f"{after['eval/persistence_mse']:.0f} (MAE {after['eval/persistence_mae']:.1f}); test MSE "
          f"{after['test/mse']:.0f} / MAE {after['test/mae']:.1f} beside persistence "
          f"{after['test/persistence_mse']:.0f} / {after['test/persistence_mae']:.1f}")
    assert result.step == 150 and after["eval/samples"] == 217 and after["test/samples"] == 506
    persistence = after["eval/persistence_mse"]
    assert before["eval/persistence_mse"] == persistence  # the baseline does not depend on the weights
    assert after["eval/mse"] < 0.5 * persistence and after["eval/mse"] < 0.5 * before["eval/mse"]
    assert after["test/mse"] < 0.5 * after["test/persistence_mse"]
    assert after["eval/mae"] < after["eval/persistence_mae"]
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    plots = events.Images("eval/predictions")  # the untrained evaluation, then the run's two
    assert [image.step for image in plots] == [0, 75, 150] and plots[0].width > plots[0].height
    assert [image.step for image in events.Images("test/predictions")] == [150]
    assert [image.step for image in events.Images("train/augmented_inputs")] == [0]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test/mse"] == after["test/mse"] and metrics["step"] == 150


def test_early_stopping_ends_the_run_and_a_resumed_run_stays_stopped(demo_root, tmp_path):
    """``train.patience=2`` with a metric that never improves after the first evaluation (``eval/samples``, lower
    is better): best at step 2, no better at 4 and 6, so the run completes at step 6 with the test split scored by
    step 2's weights; started again, it resumes at step 6 and stops there without a step."""
    from pretrain.config import load_config
    from pretrain.trainer import Trainer

    run = tmp_path / "run"
    settings = run_overrides(demo_root, run, **{"train.max_steps": 20, "train.eval_every": 2, "checkpoint.every": 2,
                                                "train.best_metric": "eval/samples", "train.best_mode": "min",
                                                "train.patience": 2})

    def train():
        trainer = Trainer(load_config("timeseries_demo", settings))
        try:
            return trainer.train()
        finally:
            trainer.close()

    result = train()
    assert (result.status, result.step) == ("completed", 6)
    log = (run / "train.log").read_text()
    assert "early stop at step 6: 2 evaluations without a better eval/samples than 217 (step 2)" in log
    assert "the test set is scored with the weights of step 2" in log
    assert log.count("eval at step") == 3 and "test at step 6" in log  # no evaluation repeated at the stop
    assert json.loads((run / "metrics.json").read_text())["test/samples"] == 506
    again = train()
    assert (again.status, again.step) == ("completed", 6)
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_"))[-1] == "step_00000006"
    assert "resumed from" in (run / "train.log").read_text().split(log, 1)[1]


def test_early_stopping_needs_a_metric_and_an_evaluation_cadence():
    from pretrain.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"^train\.patience: expected train\.best_metric"):
        load_config("timeseries_demo", ["train.patience=3", "train.best_metric="])
    with pytest.raises(ConfigError, match=r"^train\.patience: expected >= 0"):
        load_config("timeseries_demo", ["train.patience=-1"])
    config = load_config("timeseries_demo", ["train.patience=3", "train.eval_every=0", "train.eval_every_epochs=1"])
    assert config.train.patience == 3


def _with_gaps(root: str, out: Path) -> dict[str, int]:
    """A copy of ``root`` with one NaN per split (train row 500, val row 100, test row 10); returns each split's
    windows touching it."""
    import shutil

    shutil.copytree(root, out)
    bad = {}
    for split, row in (("train", 500), ("val", 100), ("test", 10)):
        path = out / f"temp_global_hourly_{split}.npy"
        values = np.load(path)
        values[row, 7, 0] = np.nan
        np.save(path, values)
        count = len(values) - 72 + 1
        bad[split] = len([i for i in range(count) if i <= row < i + 72])
    return bad


def test_windows_with_gaps_are_skipped_and_counted_in_every_split(demo_root, tmp_path):
    """Training replaces each window holding a NaN by the next whole one and counts it (``data/bad_samples``);
    validation and test score the others and say how many they could not (``loader.eval_incomplete=warn``), or
    stop (``error``)."""
    from finetune.timeseries.data import read_split
    from finetune.timeseries.loaders import TrainLoader, WindowSet
    from pretrain.config import load_config
    from pretrain.trainer import EvaluationIncompleteError, Trainer

    root = tmp_path / "gaps"
    bad = _with_gaps(demo_root, root)
    assert bad == {"train": 72, "val": 72, "test": 11}
    windows = WindowSet(read_split(str(root), "temp", "train"), 48, 24, 24, "train")
    assert int((~windows.finite).sum()) == 72 and windows[429] is None and windows[428] is not None
    loader = TrainLoader(windows, str(root), batch_size=8, rank=0, world_size=1, num_workers=2, seed=0)
    drawn = [i for batch in loader._all_batches() for i in batch]
    # a bad window i is replaced by the first whole one after it: 501 - i attempts skipped (bad ones are 429..500)
    expected = sum(501 - i for i in drawn if 429 <= i <= 500)
    seen = 0
    for inputs, targets in loader:
        assert torch.isfinite(inputs.x).all() and torch.isfinite(targets).all()
        seen += len(targets)
    assert seen == len(drawn) and loader.bad_samples == expected > 0

    settings = {"train.max_steps": 2, "train.eval_every": 0}
    trainer = Trainer(load_config("timeseries_demo", run_overrides(str(root), tmp_path / "warn", **settings,
                                                                   **{"loader.eval_incomplete": "warn"})))
    try:
        result = trainer.train()
    finally:
        trainer.close()
    assert result.eval["eval/samples"] == 217 - 72 and result.eval["test/samples"] == 506 - 11
    assert np.isfinite(result.eval["eval/mse"]) and np.isfinite(result.eval["test/mse"])
    log = (tmp_path / "warn" / "train.log").read_text()
    assert "scored 145 of the 217 samples" in log and "scored 495 of the 506 samples" in log
    trainer = Trainer(load_config("timeseries_demo", run_overrides(str(root), tmp_path / "error", **settings)))
    try:
        with pytest.raises(EvaluationIncompleteError, match="scored 145 of the 217 samples"):
            trainer.train()
    finally:
        trainer.close()


def test_preflight_names_the_key_before_any_worker_starts(demo_root, tmp_path):
    from finetune.timeseries.task import preflight
    from pretrain.config import ConfigError, load_config

    def check(*overrides: str, root: str = demo_root):
        preflight(load_config("timeseries_demo", [f"timeseries.data_root={root}", "timeseries.generate_demo=false",
                                                  *overrides]))

    check()
    with pytest.raises(ConfigError, match=r"^timeseries\.node_tree: expected factors of the 4 nodes .*\(7, 50\)"):
        check("timeseries.node_tree=[7,50]")
    with pytest.raises(ConfigError, match=r"^timeseries\.stations_per_node: expected a divisor of the 44 stations"):
        check("timeseries.stations_per_node=5")
    with pytest.raises(ConfigError, match=r"^timeseries\.data_root: .*wind_global_hourly_train\.npy: missing"):
        check("timeseries.variable=wind")
    short = tmp_path / "short"
    short.mkdir()
    for name in os.listdir(demo_root):
        data = np.load(Path(demo_root) / name) if name.endswith(".npy") else None
        if data is not None:
            np.save(short / name, data[:60] if name.endswith("_val.npy") else data)
    with pytest.raises(ConfigError, match=r"temp_global_hourly_val\.npy: 60 hours, fewer than one window"):
        check(root=str(short))
    np.save(short / "temp_global_hourly_val.npy", np.load(Path(demo_root) / "temp_global_hourly_val.npy"))
    values = np.load(short / "temp_global_hourly_test.npy")
    np.save(short / "temp_global_hourly_test.npy", np.repeat(values, 2, axis=2))
    with pytest.raises(ConfigError, match=r"test\.npy: shape \(577, 44, 2\), expected \(hours, 44, 1\)"):
        check(root=str(short))


def test_the_authors_schedule_halves_the_rate_after_each_epoch_from_the_second():
    """``adjust_learning_rate`` type1 after epoch e sets lr = 1e-4 * 0.5 ** (e - 1): epochs 1 and 2 at 1e-4, then
    halved each epoch (here 10 steps per epoch)."""
    from pretrain.config import load_config
    from pretrain.optim import lr_factor

    config = load_config("timeseries_s_global_temp", [])
    factor = lr_factor(config.optim, total_steps=100, steps_per_epoch=10)
    per_epoch = [config.optim.lr * factor(10 * (epoch - 1) + 5) for epoch in range(1, 11)]
    expected = [1e-4 * 0.5 ** max(epoch - 2, 0) for epoch in range(1, 11)]
    assert per_epoch == pytest.approx(expected, rel=1e-12)
    assert (config.optim.name, config.optim.weight_decay, config.train.global_batch_size, config.train.epochs,
            config.train.patience, config.train.eval_every_epochs, config.train.best_mode, config.train.seed) == (
        "adam", 0.0, 1, 10, 3, 1, "min", 2021)


@pytest.mark.parametrize("preset", ["timeseries_s_global_temp", "timeseries_s_global_wind"])
def test_the_authors_presets_build_and_step_at_reduced_size(preset, tmp_path):
    """UniRepLKNet-S with the time-series kernels (stage 4 at 11) on 192 x 192 maps, d_model 768, 16 heads, the
    decoder's fusion over 48 x 48 channels; one forward/backward of the MSE on one window of 22 stations (2 nodes,
    tree 2) instead of 3,850 (350 nodes, tree 7 x 50)."""
    from finetune.timeseries.demo_data import write_demo
    from finetune.timeseries.presets import TIMESERIES_S_KERNELS
    from finetune.timeseries.task import Forecasting
    from pretrain.config import load_config

    variable = preset.rsplit("_", 1)[1]
    write_demo(tmp_path, variable, stations=22, days=8)
    config = load_config(preset, [f"timeseries.data_root={tmp_path}", "timeseries.node_tree=[2]"])
    assert config.model.kernel_sizes == TIMESERIES_S_KERNELS and config.model.kernel_sizes[3] == (11, 11, 11)
    assert (config.timeseries.d_model, config.timeseries.heads, config.timeseries.node_tree) == (768, 16, (2,))
    task = Forecasting(config)
    model = task.build_model()
    assert model.decoder.layers[0].cross_correlation.cross.fusion.blocks[0].conv1.in_channels == 48 * 48
    parameters = sum(p.numel() for p in model.parameters())
    print(f"{preset}: {parameters / 1e6:.1f} M parameters")
    inputs, targets = task.synthetic_batch(torch.device("cpu"), torch.Generator().manual_seed(0))
    loss = task.training_losses(model, inputs, targets)["loss"]
    loss.backward()
    assert torch.isfinite(loss) and model.encoder.stages[3][0].dwconv.lk_origin.weight.grad is not None


def test_make_demo_data_command_writes_the_layout(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "finetune", "make-demo-data", "timeseries", str(out),
                             "--train-images", "22", "--val-images", "10"], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert np.load(out / "stations_sorted.npy").shape == (22, 3)
    lengths = [len(np.load(out / f"temp_global_hourly_{s}.npy")) for s in ("train", "val", "test")]
    assert sum(lengths) == 240 and [len(np.load(out / f"data_time_{s}.npy")) for s in ("train", "val", "test")] == \
        lengths
