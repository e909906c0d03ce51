"""The single-worker trainer: the demo learns, TensorBoard (event files and the real server), export,
non-finite loss, SIGTERM -> save -> requeue exit -> resume, bench.

Runs are real: DeepSpeed engines on CPU, generated shards, subprocesses of ``python -m pretrain``.
"""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def tiny_overrides(shards: dict, run_dir, **changes) -> list[str]:
    """The demo's tiny network on the session's small shards, one rank, loss logged every step."""
    values = {
        "run_dir": run_dir, "data.source": "shards", "data.train_urls": shards["train"],
        "data.val_urls": shards["val"], "loader.num_workers": 0, "train.global_batch_size": 16,
        "train.micro_batch_size": 16, "train.epochs": 1, "train.log_every": 1, "train.eval_every": 0,
        "checkpoint.every": 1000, "optim.warmup_epochs": 0.25,
    }
    values.update(changes)
    return [f"{key}={value}" for key, value in values.items()]


def read_scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(Path(run_dir) / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def run_cli(args: list[str], timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pretrain", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- a short in-process run


@pytest.fixture(scope="module")
def short_run(pretrain_shards, tmp_path_factory):
    """12 steps in this process (ZeRO-1, EMA on, eval at step 6 and at the end, checkpoint every 5)."""
    from pretrain.config import load_config
    from pretrain.trainer import Trainer

    run_dir = tmp_path_factory.mktemp("short_run")
    config = load_config("demo", tiny_overrides(pretrain_shards, run_dir, **{
        "train.max_steps": 12, "train.eval_every": 6, "checkpoint.every": 5, "checkpoint.keep": 2,
        "train.ema_decay": 0.9}))
    warnings = _Records()
    logging.getLogger("pretrain.trainer").addHandler(warnings)
    trainer = Trainer(config)
    try:
        result = trainer.train()
        live_state = {k: v.detach().clone() for k, v in trainer.engine.module.state_dict().items()}
        ema_state = dict(zip(trainer.ema.names, (s.clone() for s in trainer.ema.shadow)))
        steps_per_epoch = trainer.steps_per_epoch
    finally:
        trainer.close()
        logging.getLogger("pretrain.trainer").removeHandler(warnings)
    return dict(run_dir=run_dir, config=config, result=result, live_state=live_state, ema_state=ema_state,
                steps_per_epoch=steps_per_epoch, warnings=[r.getMessage() for r in warnings.records])


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_short_run_checkpoints_and_keeps_the_last_k(short_run):
    result, run_dir = short_run["result"], short_run["run_dir"]
    assert result.status == "completed" and result.step == 12
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step_00000012"
    assert sorted(p.name for p in checkpoints.iterdir() if p.name.startswith("step_")) == [
        "step_00000010", "step_00000012"]
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["train"]["max_steps"] == 12 and saved["train"]["ema_decay"] == 0.9
    rank_state = torch.load(checkpoints / "step_00000012" / "trainer_rank00000.pt", weights_only=True)
    assert rank_state["step"] == 12 and rank_state["loader"]["batches_done"] == 12


def test_tensorboard_event_files_hold_the_training_curves(short_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, config = short_run["run_dir"], short_run["config"]
    scalars = read_scalars(run_dir)
    for tag in ("train/loss", "train/grad_norm", "lr/decay", "lr/no_decay", "perf/images_per_s_worker",
                "perf/images_per_s_global", "perf/data_wait_fraction", "perf/step_time_s", "data/bad_samples",
                "memory/cpu_rss_gib", "memory/cpu_peak_gib", "eval/top1", "eval/top5", "eval/loss",
                "eval_ema/top1", "eval_ema/top5"):
        assert tag in scalars, f"{tag} missing; have {sorted(scalars)}"
    assert [step for step, _ in scalars["train/loss"]] == list(range(1, 13))
    assert all(math.isfinite(v) and v > 0 for _, v in scalars["train/loss"])
    # the lr the optimizer used, recomputed from the recipe: warmup 0.25 epoch, then cosine to min_lr
    total, warmup = short_run["steps_per_epoch"], round(0.25 * short_run["steps_per_epoch"])
    lr, min_lr = config.optim.lr, config.optim.min_lr
    for step, value in scalars["lr/decay"]:
        t = step  # the lr logged after `step` optimizer steps is the one for step index `step`
        expected = lr * ((t + 1) / warmup if t < warmup else
                         min_lr / lr + (1 - min_lr / lr) * 0.5 * (1 + math.cos(math.pi * (t - warmup) / (total - warmup))))
        assert value == pytest.approx(expected, rel=1e-6)
    assert scalars["lr/decay"] == scalars["lr/no_decay"]
    for (_, worker), (_, total_rate) in zip(scalars["perf/images_per_s_worker"], scalars["perf/images_per_s_global"]):
        assert total_rate == pytest.approx(worker, rel=0.05) and worker > 0
    assert all(0 <= v <= 1 for _, v in scalars["perf/data_wait_fraction"])
    assert [s for s, _ in scalars["eval/top1"]] == [6, 12]
    assert all(0 <= v <= 100 for _, v in scalars["eval/top1"] + scalars["eval_ema/top5"])
    assert all(t1 <= t5 for (_, t1), (_, t5) in zip(scalars["eval/top1"], scalars["eval/top5"]))
    assert scalars["data/bad_samples"][-1][1] == 0
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    grid = events.Images("train/augmented_inputs")
    assert len(grid) == 1 and grid[0].step == 0 and grid[0].width > 32 * 4 and grid[0].height > 32


def test_a_data_bound_run_says_so_once_naming_num_workers(short_run):
    """The warning appears exactly when a logging interval after the first waited >= 20% for data (read
    back from TensorBoard), once; its threshold logic on its own: below, at, after the first interval."""
    from types import SimpleNamespace

    from pretrain.classification.task import ImageClassification
    from pretrain.trainer import DATA_BOUND_FRACTION, Trainer

    waits = [v for _, v in read_scalars(short_run["run_dir"])["perf/data_wait_fraction"]]
    data_bound = [m for m in short_run["warnings"] if "waited for data" in m]
    assert len(data_bound) == (1 if any(w >= DATA_BOUND_FRACTION for w in waits[1:]) else 0)
    config = short_run["config"]

    def warned(wait_fraction: float, intervals: int) -> list[str]:
        fake = SimpleNamespace(_warned_data_bound=False, _intervals_logged=intervals, config=config,
                               task=ImageClassification(config))
        records = _Records()
        logging.getLogger("pretrain.trainer").addHandler(records)
        try:
            Trainer._warn_if_data_bound(fake, wait_fraction, 300.0)
            Trainer._warn_if_data_bound(fake, wait_fraction, 300.0)
        finally:
            logging.getLogger("pretrain.trainer").removeHandler(records)
        return [r.getMessage() for r in records.records]

    assert warned(DATA_BOUND_FRACTION - 0.01, 5) == []
    assert warned(0.9, 1) == []  # the first interval holds worker start-up
    (message,) = warned(0.5, 2)  # once, not twice
    assert "50%" in message and f"loader.num_workers (now {config.loader.num_workers})" in message
    assert "--target 600" in message  # 300 images/s at half the time waiting: the model could take 600


def test_tensorboard_server_serves_the_loss_curve(short_run):
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "tensorboard"), "--logdir", str(short_run["run_dir"] / "tensorboard"),
         "--host", "127.0.0.1", "--port", str(port), "--reload_interval", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/data/plugin/scalars/scalars?run=.&tag=train%2Floss"
        deadline, served = time.time() + 90, None
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    served = json.loads(response.read())
                if len(served) == 12:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.5)
        assert served is not None, "tensorboard never answered"
        from_files = read_scalars(short_run["run_dir"])["train/loss"]
        assert [(step, pytest.approx(value, rel=1e-6)) for _, step, value in served] == from_files
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_export_loads_into_a_fresh_model_with_strict_keys(short_run, tmp_path):
    import unireplknet
    from pretrain.export import export_checkpoint
    from pretrain.classification.task import build_model

    run_dir, config = short_run["run_dir"], short_run["config"]
    plain = tmp_path / "plain.pth"
    export_checkpoint(str(run_dir), str(plain))
    state = torch.load(plain, weights_only=True)
    for name, value in short_run["live_state"].items():
        assert torch.equal(state[name], value), name
    model = build_model(config)
    model.load_state_dict(state, strict=True)

    ema = tmp_path / "ema.pth"
    export_checkpoint(str(run_dir), str(ema), ema=True)
    ema_state = torch.load(ema, weights_only=True)
    for name, value in short_run["ema_state"].items():
        assert torch.allclose(ema_state[name], value.to(ema_state[name].dtype)), name
    assert not torch.equal(ema_state["head.weight"], state["head.weight"])

    official = tmp_path / "official_deploy.pth"
    result = run_cli(["export", str(run_dir), str(official), "--official", "--reparameterize"], timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["reparam_max_rel_diff"] < 1e-8
    official_keys = set(torch.load(official, weights_only=True))
    # what the authors' deploy=True constructor holds: lk_origin for kernel 13, plain dwconv for kernel 3
    assert {"stages.1.0.dwconv.lk_origin.weight", "stages.1.0.dwconv.lk_origin.bias",
            "stages.0.0.dwconv.weight", "stages.0.0.dwconv.bias"} <= official_keys
    assert "stages.1.0.dwconv.weight" not in official_keys
    deployed = unireplknet.UniRepLKNet(depths=(1, 1, 2, 1), dims=(16, 32, 64, 128), num_classes=10,
                                       kernel_sizes=((3,), (13,), (13, 3), (13,)), deploy=True)
    unireplknet.load_official(deployed, str(official))
    model.eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, actual = model(x), deployed.eval()(x)
    assert torch.allclose(actual, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


# ----------------------------------------------------------------------------- failures and signals


def test_non_finite_loss_stops_naming_the_step_and_the_last_good_checkpoint(pretrain_shards, tmp_path):
    from pretrain.config import load_config
    from pretrain.classification.task import ImageClassification
    from pretrain.trainer import NonFiniteLossError, Trainer

    class CorruptFromBatch(ImageClassification):
        """Image classification whose 6th batch onwards arrives as inf (a corrupt decode, a bad sensor)."""

        calls = 0

        def prepare_batch(self, batch, device):
            images, targets = super().prepare_batch(batch, device)
            self.calls += 1
            return (images * math.inf if self.calls >= 6 else images), targets

    config = load_config("demo", tiny_overrides(pretrain_shards, tmp_path / "run", **{"checkpoint.every": 2}))
    trainer = Trainer(config, CorruptFromBatch(config))
    try:
        with pytest.raises(NonFiniteLossError) as error:
            trainer.train()
    finally:
        trainer.close()
    last_good = str(tmp_path / "run" / "checkpoints" / "step_00000004")
    assert error.value.step == 6 and error.value.last_checkpoint == last_good
    assert "step 6" in str(error.value) and last_good in str(error.value)
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step_00000004"


def test_sigterm_saves_exits_for_requeue_and_the_rerun_resumes(pretrain_shards, tmp_path):
    from pretrain.train import REQUEUE_EXIT_CODE

    run_dir = tmp_path / "run"
    args = ["--config", "demo", "--set", *tiny_overrides(pretrain_shards, run_dir, **{"train.epochs": 20})]
    log = run_dir / "train.log"
    process = subprocess.Popen([sys.executable, "-m", "pretrain", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (log.exists() and "step 3/" in log.read_text()):
        assert process.poll() is None, process.stderr.read()
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == REQUEUE_EXIT_CODE == 75, stderr
    stopped_at = int((run_dir / "REQUEUE").read_text())
    assert 3 <= stopped_at < 20 * 32
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{stopped_at:08d}"

    rerun = run_cli([*args, f"train.max_steps={stopped_at + 3}"], timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{stopped_at:08d}'} at step {stopped_at}" in log.read_text()
    assert not (run_dir / "REQUEUE").exists()
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{stopped_at + 3:08d}"
    losses = read_scalars(run_dir)["train/loss"]
    assert [s for s, _ in losses][-3:] == [stopped_at + 1, stopped_at + 2, stopped_at + 3]


# ----------------------------------------------------------------------------- the demo and bench


@pytest.mark.slow
def test_demo_preset_learns_well_above_chance(tmp_path):
    """``python -m pretrain --config demo`` exactly as ``make demo`` would run it (paths moved to tmp)."""
    run_dir = tmp_path / "run"
    started = time.time()
    result = run_cli(["--config", "demo", "--set", f"run_dir={run_dir}", f"data.demo_dir={tmp_path / 'data'}"],
                     timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    scalars = read_scalars(run_dir)
    top1 = scalars["eval/top1"][-1][1]
    losses = [v for _, v in scalars["train/loss"]]
    print(f"demo: val top-1 {top1:.1f}% after {scalars['eval/top1'][-1][0]} steps, {time.time() - started:.0f} s")
    assert top1 >= 60.0, f"val top-1 {top1}% (chance 10%)"
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5


def test_bench_reports_throughput_memory_and_tflops():
    result = run_cli(["bench", "--config", "xl_in22k_384", "--steps", "3", "--warmup", "1", "--set",
                      "model.depths=1,1,2,1", "model.dims=16,32,64,128", "model.kernel_sizes=[[3],[13],[13,3],[13]]",
                      "data.img_size=64", "train.global_batch_size=4", "train.micro_batch_size=4",
                      "model.num_classes=100", "launch.device=cpu"], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["images_per_s"] > 0 and report["step_time_s"] > 0 and report["peak_memory_gib"] > 0
    assert report["input_shape"] == [3, 64, 64] and report["micro_batch_size"] == 4 and report["precision"] == "fp32"
    # TFLOP/s = images/s x training FLOPs per image; the per-image count is checked independently:
    # 3 x forward FLOPs of the same network, counted by torch's FlopCounterMode on a forward pass only
    from torch.utils.flop_counter import FlopCounterMode

    import unireplknet

    model = unireplknet.UniRepLKNet(depths=(1, 1, 2, 1), dims=(16, 32, 64, 128), num_classes=100,
                                    kernel_sizes=((3,), (13,), (13, 3), (13,)))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert report["gflops_per_sample"] == pytest.approx(3 * counter.get_total_flops() / 1e9, rel=0.05)
    assert report["achieved_tflops"] == pytest.approx(report["images_per_s"] * report["gflops_per_sample"] / 1e3,
                                                      rel=1e-6)


def test_plain_adam_adds_weight_decay_to_the_gradient_by_hand():
    """``optim.name=adam``: torch's Adam, weight decay as L2 in the gradient (the authors' audio recipe), not
    AdamW's decoupled decay; one step from zero moments, in float64, by hand."""
    from pretrain.config import OptimConfig
    from pretrain.optim import build_optimizer, optimizer_implementation

    config = OptimConfig(name="adam", lr=0.01, betas=(0.95, 0.999), eps=1e-8, weight_decay=0.1)
    assert optimizer_implementation(config, torch.device("cpu")) == "torch.Adam(foreach)"
    weight = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    optimizer = build_optimizer([dict(params=[weight], param_names=["w"], lr=0.01, weight_decay=0.1)], config,
                                torch.device("cpu"))
    assert type(optimizer) is torch.optim.Adam
    gradient = torch.tensor([0.5, 0.25, -0.05], dtype=torch.float64)
    weight.grad = gradient.clone()
    optimizer.step()
    with_l2 = [0.5 + 0.1 * 1.0, 0.25 + 0.1 * -2.0, -0.05 + 0.1 * 0.5]  # 0.6, 0.05, 0.0
    # first step: m_hat = g, v_hat = g^2 (bias corrections cancel (1 - beta)), so the step is lr * g / (|g| + eps)
    expected = [w - 0.01 * g / (abs(g) + 1e-8) for w, g in zip([1.0, -2.0, 0.5], with_l2)]
    assert torch.allclose(weight.detach(), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)


def test_lamb_runs_under_zero_0_and_apex_stays_optional(pretrain_shards, tmp_path):
    """LAMB (timm's on CPU; DeepSpeed's or apex's on GPU) steps the weights; apex is never required."""
    import importlib.util

    from pretrain.config import load_config
    from pretrain.optim import optimizer_implementation
    from pretrain.trainer import Trainer

    config = load_config("demo", tiny_overrides(pretrain_shards, tmp_path / "run", **{
        "optim.name": "lamb", "train.zero_stage": 0, "train.max_steps": 4}))
    assert optimizer_implementation(config.optim, torch.device("cpu")) == "timm.Lamb"
    assert importlib.util.find_spec("apex") is None or importlib.util.find_spec("apex.optimizers") is not None
    trainer = Trainer(config)
    try:
        before = {k: v.detach().clone() for k, v in trainer.engine.module.named_parameters()}
        result = trainer.train()
        after = dict(trainer.engine.module.named_parameters())
    finally:
        trainer.close()
    assert result.step == 4
    changed = [name for name, value in before.items() if not torch.equal(value, after[name].detach())]
    assert len(changed) == len(before), f"unchanged: {sorted(set(before) - set(changed))}"
    assert "optimizer timm.Lamb" in (tmp_path / "run" / "train.log").read_text()


def test_a_finetune_run_starts_from_an_exported_pretraining_checkpoint(short_run, tmp_path):
    """The 22K -> 1K path in small: export (official keys) -> ``model.init_from`` with another head size."""
    import dataclasses

    from pretrain.export import export_checkpoint
    from pretrain.classification.task import build_model

    exported = tmp_path / "pretrained_official.pth"
    export_checkpoint(str(short_run["run_dir"]), str(exported), official=True)
    config = short_run["config"]
    config = dataclasses.replace(config, model=dataclasses.replace(
        config.model, init_from=str(exported), num_classes=7, head_init_scale=0.001))
    model = build_model(config)
    body = {k: v for k, v in short_run["live_state"].items() if not k.startswith("head.")}
    state = model.state_dict()
    for name, value in body.items():
        assert torch.equal(state[name], value), name
    assert model.head.weight.shape == (7, 128)
    assert model.head.weight.abs().max() < 0.01  # a fresh classifier, scaled by head_init_scale


def test_saves_never_mix_with_files_left_by_an_interrupted_save(pretrain_shards, tmp_path):
    """A step folder holding a stale file of another rank (an older interrupted save) and an
    unfinished staging folder: every save writes a fresh folder and renames it into place whole."""
    from pretrain.checkpoint import consolidated_state_dict, read_manifest
    from pretrain.config import load_config
    from pretrain.trainer import Trainer

    checkpoints = tmp_path / "run" / "checkpoints"
    stale = checkpoints / "step_00000004"
    stale.mkdir(parents=True)
    (stale / "trainer_rank00001.pt").write_bytes(b"stale rank file of a 2-rank run")
    unfinished = checkpoints / ".incomplete-step_00000099"
    unfinished.mkdir()
    (unfinished / "mp_rank_00_model_states.pt").write_bytes(b"half")
    config = load_config("demo", tiny_overrides(pretrain_shards, tmp_path / "run", **{
        "train.max_steps": 6, "checkpoint.every": 2, "checkpoint.keep": 3, "checkpoint.resume": "none"}))
    trainer = Trainer(config)
    try:
        trainer.train()
        live = {k: v.detach().clone() for k, v in trainer.engine.module.state_dict().items()}
    finally:
        trainer.close()
    assert (checkpoints / "latest").read_text() == "step_00000006"
    assert sorted(p.name for p in checkpoints.iterdir() if "step_" in p.name) == [
        "step_00000002", "step_00000004", "step_00000006"]
    assert not (stale / "trainer_rank00001.pt").exists()
    for step in (2, 4, 6):
        manifest = read_manifest(str(checkpoints / f"step_{step:08d}"))
        assert manifest.world_size == 1 and manifest.step == step
        assert sorted(n for n in manifest.files if n.startswith("trainer_rank")) == ["trainer_rank00000.pt"]
    final = consolidated_state_dict(str(checkpoints / "step_00000006"))
    assert all(torch.equal(final[k], v) for k, v in live.items())


def test_a_checkpoint_folder_past_the_current_step_never_pushes_out_complete_checkpoints(pretrain_shards, tmp_path):
    """Resumed from an earlier checkpoint, the run's new saves keep the newest K up to the current step,
    ignoring a complete folder of the abandoned timeline further ahead."""
    import shutil

    from pretrain.config import load_config
    from pretrain.trainer import Trainer

    checkpoints = tmp_path / "run" / "checkpoints"

    def run(**changes):
        config = load_config("demo", tiny_overrides(pretrain_shards, tmp_path / "run", **{
            "checkpoint.every": 2, "checkpoint.keep": 2, **changes}))
        trainer = Trainer(config)
        try:
            trainer.train()
        finally:
            trainer.close()

    run(**{"train.max_steps": 4})
    shutil.copytree(checkpoints / "step_00000004", checkpoints / "step_00000099")  # an abandoned timeline
    run(**{"train.max_steps": 8, "checkpoint.resume": str(checkpoints / "step_00000002")})
    assert (checkpoints / "latest").read_text() == "step_00000008"
    assert sorted(p.name for p in checkpoints.iterdir() if p.name.startswith("step_")) == [
        "step_00000006", "step_00000008", "step_00000099"]


def test_an_evaluation_short_of_samples_fails_naming_the_shortfall_or_warns(pretrain_shards, tmp_path):
    """A val shard cut short: the run stops (the checkpoint is already written) instead of scoring fewer
    samples silently; with loader.eval_incomplete=warn the rerun evaluates what is readable and says so."""
    import shutil

    val = tmp_path / "val"
    shutil.copytree(pretrain_shards["val"], val)
    shard = val / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[:4096 * 3])  # on a block boundary: reads as a valid, shorter tar
    run_dir = tmp_path / "run"
    args = ["--config", "demo", "--set", *tiny_overrides(pretrain_shards, run_dir, **{
        "data.val_urls": str(val), "train.max_steps": 2})]
    failed = run_cli(args, timeout=300)
    assert failed.returncode == 1, failed.stderr[-3000:]
    assert "evaluation at step 2 scored" in failed.stderr and "of the 128 samples of" in failed.stderr
    assert f"the 2 shards {val / 'shard-000000.tar'} ... {shard}" in failed.stderr  # the set, named
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000002"

    warned = run_cli([*args, "loader.eval_incomplete=warn"], timeout=300)
    assert warned.returncode == 0, warned.stderr[-3000:]
    scalars = read_scalars(run_dir)
    scored = scalars["eval/samples"][-1][1]
    assert 64 <= scored < 128
    assert scalars["eval/unreadable_samples"][-1][1] == 128 - scored


def test_a_failing_evaluation_never_costs_the_steps_it_comes_after(pretrain_shards, tmp_path):
    """A damaged val shard with evaluations and saves at the same steps: the step is saved before it is
    evaluated, so the run stops with the checkpoint written, and every rerun gets one interval further
    (it used to stop unsaved and repeat the same steps forever)."""
    import shutil

    from pretrain.config import load_config
    from pretrain.trainer import EvaluationIncompleteError, Trainer

    val = tmp_path / "val"
    shutil.copytree(pretrain_shards["val"], val)
    shard = val / "shard-000000.tar"
    shard.write_bytes(shard.read_bytes()[:len(shard.read_bytes()) // 3])  # cut mid-member
    run_dir = tmp_path / "run"
    config = load_config("demo", tiny_overrides(pretrain_shards, run_dir, **{
        "data.val_urls": str(val), "train.max_steps": 6, "train.eval_every": 2, "checkpoint.every": 2,
        "loader.num_workers": 1}))
    for expected_step in (2, 4):
        trainer = Trainer(config)
        try:
            with pytest.raises(EvaluationIncompleteError, match=f"evaluation at step {expected_step} scored"):
                trainer.train()
        finally:
            trainer.close()
        assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{expected_step:08d}"
    assert "resumed from " + str(run_dir / "checkpoints" / "step_00000002") in (run_dir / "train.log").read_text()
