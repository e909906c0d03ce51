"""ADE20K fine-tuning through the one trainer: learning, exact resume, preemption, 2-rank evaluation, data
checks, schedules, layer decay, backbone init, the XL preset. Real DeepSpeed runs on generated data."""
from __future__ import annotations

import json
import logging
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from finetune_checks import assert_predict_draws_over, assert_predict_names_the_images_it_cannot_read, evaluate_on_ranks
from test_pretrain_train import read_scalars

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ade_data(tmp_path_factory) -> str:
    """The generated ADE20K-layout set: 48 training and 9 validation images (9: uneven over 2 ranks)."""
    from finetune.ade20k.demo_data import write_demo

    root = tmp_path_factory.mktemp("ade20k") / "ADEChallengeData2016"
    write_demo(root, train_images=48, val_images=9, seed=0)
    return str(root)


def ade_overrides(data_root: str, run_dir, **changes) -> list[str]:
    """``ade20k_demo`` at 64 px on ``data_root``: 8 steps of 4 images, one loader worker."""
    values = {"run_dir": run_dir, "ade20k.data_root": data_root, "ade20k.generate_demo": "false",
              "ade20k.crop_size": 64, "ade20k.resize_scale": "160,64", "ade20k.eval_scale": "160,64",
              "loader.num_workers": 1, "train.micro_batch_size": 4, "train.global_batch_size": 4, "train.steps": 8,
              "train.log_every": 1, "train.eval_every": 0, "checkpoint.every": 1000, "optim.warmup_steps": 2}
    values.update(changes)
    return [f"{key}={value}" for key, value in values.items()]


def make_trainer(overrides: list[str]):
    from pretrain.config import load_config
    from pretrain.trainer import Trainer

    return Trainer(load_config("ade20k_demo", overrides))


# ----------------------------------------------------------------------------- learning


@pytest.fixture(scope="module")
def learned(ade_data, demo_backbone, tmp_path_factory):
    """The demo preset (128 px crops, UperNet 64 channels) from the pretrained demo backbone: evaluated before
    fine-tuning, then 90 steps of fine-tuning, evaluated again."""
    run_dir = tmp_path_factory.mktemp("ade_learn") / "run"
    trainer = make_trainer([f"run_dir={run_dir}", f"ade20k.data_root={ade_data}", "ade20k.generate_demo=false",
                            f"model.init_from={demo_backbone}", "train.steps=90", "train.eval_every=0",
                            "train.log_every=15", "loader.num_workers=2"])
    try:
        before = trainer.evaluate()
        result = trainer.train()
    finally:
        trainer.close()
    return before, result, run_dir


def test_fine_tuning_raises_miou_well_above_the_untrained_model(learned):
    before, result, _ = learned
    print(f"ADE20K demo: mIoU {before['eval/mIoU']:.1f} before fine-tuning, {result.eval['eval/mIoU']:.1f} after "
          f"(mAcc {before['eval/mAcc']:.1f} -> {result.eval['eval/mAcc']:.1f}, "
          f"aAcc {before['eval/aAcc']:.1f} -> {result.eval['eval/aAcc']:.1f})")
    assert result.status == "completed" and result.step == 90
    assert result.eval["eval/mIoU"] >= 30.0
    assert result.eval["eval/mIoU"] >= before["eval/mIoU"] + 20.0
    assert result.eval["eval/pixels"] == before["eval/pixels"] > 0


def test_loss_terms_and_metrics_reach_tensorboard_and_metrics_json(learned):
    _, result, run_dir = learned
    scalars = read_scalars(run_dir)
    for tag in ("train/loss", "train/loss_seg", "train/loss_aux", "eval/mIoU", "eval/mAcc", "eval/aAcc",
                "eval/IoU.disk", "lr/layer00_decay", "data/bad_samples"):
        assert tag in scalars, tag
    seg, aux, total = (dict(scalars[f"train/{t}"]) for t in ("loss_seg", "loss_aux", "loss"))
    for step in total:
        assert math.isclose(seg[step] + aux[step], total[step], rel_tol=1e-4), step
    assert total[90] < total[15]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    shown = events.Images("eval/predictions")
    assert [e.step for e in shown] == [0, 90] and (shown[-1].height, shown[-1].width) > (128, 256)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["step"] == 90 and metrics["eval/mIoU"] == pytest.approx(result.eval["eval/mIoU"])


def test_a_segmentation_run_exports_its_whole_model(learned, tmp_path):
    from finetune.ade20k.task import build_segmentor
    from pretrain.checkpoint import read_saved_config, find_checkpoint
    from pretrain.config import config_from_dict
    from pretrain.export import export_checkpoint

    _, _, run_dir = learned
    summary = export_checkpoint(str(run_dir), str(tmp_path / "upernet.pth"))
    state = torch.load(tmp_path / "upernet.pth", weights_only=True)
    assert summary["keys"] == len(state) and any(k.startswith("decode_head.") for k in state)
    config = config_from_dict(read_saved_config(find_checkpoint(str(run_dir / "checkpoints"))))
    config.model.init_from = ""
    build_segmentor(config).load_state_dict(state, strict=True)
    with pytest.raises(ValueError, match="task=ade20k"):
        export_checkpoint(str(run_dir), str(tmp_path / "official.pth"), official=True)


def test_predict_draws_the_segmentation_over_each_image(learned, ade_data, tmp_path):
    _, _, run_dir = learned
    images = sorted(str(p) for p in (Path(ade_data) / "images" / "validation").iterdir())[:2]
    assert_predict_draws_over(run_dir, images, tmp_path / "out")


def test_predict_draws_the_readable_images_and_names_the_others(learned, ade_data, tmp_path):
    _, _, run_dir = learned
    images = sorted(str(p) for p in (Path(ade_data) / "images" / "validation").iterdir())[:2]
    assert_predict_names_the_images_it_cannot_read(run_dir, images, tmp_path / "out")


# ----------------------------------------------------------------------------- resume and preemption


def test_two_rank_evaluation_with_uneven_work_equals_one_rank(ade_data, tmp_path):
    """9 validation images: 5 on rank 0, 4 on rank 1; sliding windows make the forward counts differ too."""
    outputs = evaluate_on_ranks("ade20k_demo", lambda ranks: ade_overrides(ade_data, tmp_path / f"run_{ranks}", **{
        "ade20k.eval_mode": "slide", "ade20k.eval_stride": 48, "ade20k.eval_flip": "true",
        "loader.num_workers": 1, "train.global_batch_size": 8}), tmp_path)
    assert outputs[1]["eval/pixels"] > 0
    assert outputs[1] == outputs[2]


def test_segmentation_inference_averages_scales_and_flips_at_the_label_size():
    from finetune.ade20k.task import segmentation_logits

    class Constant(torch.nn.Module):
        def forward(self, images):
            n, _, h, w = images.shape
            left = torch.zeros(n, 2, h, w)
            left[:, 0, :, : w // 2] = 5.0
            return {"logits": left}

    images = [torch.zeros(1, 3, 32, 48), torch.zeros(1, 3, 64, 96)]
    probs = segmentation_logits(Constant(), images, (20, 30), num_classes=2)
    assert probs.shape == (1, 2, 20, 30)
    assert torch.allclose(probs.sum(dim=1), torch.ones(1, 20, 30))
    assert probs[0, 0, :, :10].min() > 0.9 and probs[0, 0, :, 20:].max() < 0.6
    flipped = segmentation_logits(Constant(), images, (20, 30), num_classes=2, flip=True)
    assert torch.allclose(flipped, flipped.flip(-1), atol=1e-6)  # the flip average is symmetric
    slid = segmentation_logits(Constant(), [torch.zeros(1, 3, 64, 96)], (64, 96), num_classes=2, mode="slide",
                               crop=32, stride=24)
    assert slid.shape == (1, 2, 64, 96)


# ----------------------------------------------------------------------------- data and config checks


def test_missing_annotation_folder_fails_before_training_naming_the_path(ade_data, tmp_path):
    import shutil

    root = tmp_path / "broken"
    shutil.copytree(ade_data, root)
    shutil.rmtree(root / "annotations" / "training")
    from finetune.ade20k.data import list_split

    with pytest.raises(FileNotFoundError, match=r"annotations/training"):
        list_split(str(root), "training")
    result = subprocess.run([sys.executable, "-m", "finetune", "ade20k", "--config", "ade20k_demo", "--set",
                             *ade_overrides(str(root), tmp_path / "run")], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2 and "annotations/training" in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_truncated_training_image_is_skipped_and_counted_with_workers(ade_data, tmp_path):
    import shutil

    from finetune.ade20k.data import TrainLoader, list_split
    from pretrain.config import load_config

    root = tmp_path / "damaged"
    shutil.copytree(ade_data, root)
    victim = sorted((root / "images" / "training").iterdir())[5]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) * 2 // 5 + 17])  # cut inside the entropy-coded data
    config = load_config("ade20k_demo", ade_overrides(str(root), tmp_path / "run")).ade20k
    loader = TrainLoader(list_split(str(root), "training"), config, batch_size=4, rank=0, world_size=1,
                         num_workers=2, seed=0)
    batches = list(loader)
    assert len(batches) == len(loader) == 12
    assert all(images.shape == (4, 3, 64, 64) and torch.isfinite(images).all() for images, _ in batches)
    assert loader.bad_samples == 1


def test_an_evaluation_short_of_damaged_validation_pairs_is_reported_incomplete(ade_data, tmp_path, caplog):
    """An unreadable image, a label of another size and one with a value past the classes: 6 of the 9 validation
    images are scored; loader.eval_incomplete=error stops naming the validation folder, warn logs it and reports."""
    import shutil

    from PIL import Image

    from pretrain.trainer import EvaluationIncompleteError

    root = tmp_path / "damaged"
    shutil.copytree(ade_data, root)
    images = sorted((root / "images" / "validation").iterdir())
    labels = sorted((root / "annotations" / "validation").iterdir())
    data = images[1].read_bytes()
    images[1].write_bytes(data[:len(data) // 3])
    Image.open(labels[4]).resize((48, 40), Image.NEAREST).save(labels[4])
    label = np.array(Image.open(labels[7]))
    label[:3, :3] = 200
    Image.fromarray(label).save(labels[7])
    trainer = make_trainer(ade_overrides(str(root), tmp_path / "run", **{"loader.num_workers": 2}))
    try:
        shortfall = f"scored 6 of the 9 samples of {root}/images/validation: 3 could not be read"
        with pytest.raises(EvaluationIncompleteError, match=re.escape(shortfall)):
            trainer.evaluate()
        trainer.config.loader.eval_incomplete = "warn"
        with caplog.at_level(logging.WARNING, logger="pretrain.trainer"):
            results = trainer.evaluate()
    finally:
        trainer.close()
    assert results["eval/samples"] == 6 and results["eval/pixels"] > 0 and math.isfinite(results["eval/mIoU"])
    assert any(shortfall in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_dense_tasks_refuse_zero_3_with_the_reason(ade_data, tmp_path):
    from pretrain.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"train\.zero_stage: .*ZeRO-3"):
        load_config("ade20k_demo", ade_overrides(ade_data, tmp_path, **{"train.zero_stage": 3}))
    with pytest.raises(ConfigError, match=r"ade20k\.data_root"):
        load_config("ade20k_demo", ["ade20k.data_root="])


def test_mmseg_resize_and_label_rules_by_hand():
    import numpy as np

    from finetune.ade20k.data import eval_resize_shape, random_crop, reduce_zero_label

    labels = np.array([[0, 1, 2], [150, 255, 3]], dtype=np.uint8)
    assert reduce_zero_label(labels).tolist() == [[255, 0, 1], [149, 255, 2]]
    # mmcv rescale_size: a 683x512 (h x w) image into (2048, 512): factor min(2048/683, 512/512) = 1.0
    assert eval_resize_shape(683, 512, (2048, 512)) == (704, 512)
    # 400 x 1000 into (2048, 512): min(2048/1000, 512/400) = 1.28 -> 512 x 1280, already multiples of 32
    assert eval_resize_shape(400, 1000, (2048, 512)) == (512, 1280)
    rng = np.random.default_rng(0)
    image, label = np.zeros((100, 100, 3)), np.zeros((100, 100), dtype=np.uint8)
    label[:, :70] = 1  # any 50x50 crop containing both classes has class 1 below 0.75 only near the edge
    crop_image, crop_label = random_crop(image, label, 50, 0.75, rng)
    assert crop_image.shape[:2] == crop_label.shape == (50, 50)


# ----------------------------------------------------------------------------- optimizer rules


def test_multistep_and_poly_schedules_follow_mmcv_by_hand():
    from pretrain.config import OptimConfig
    from pretrain.optim import lr_factor

    coco = OptimConfig(lr=1e-4, schedule="multistep", milestones=(27, 33), warmup_steps=500, warmup_ratio=0.001)
    factor = lr_factor(coco, total_steps=36 * 1000, steps_per_epoch=1000)
    assert factor(0) == pytest.approx(0.001)
    assert factor(250) == pytest.approx(1 - 0.5 * 0.999)  # mmcv: 1 - (1 - 250/500) * (1 - 0.001)
    assert factor(500) == factor(26_999) == 1.0
    assert factor(27_000) == pytest.approx(0.1) and factor(33_000) == pytest.approx(0.01)
    ade = OptimConfig(lr=1e-4, min_lr=0.0, schedule="poly", power=1.0, warmup_steps=1500, warmup_ratio=1e-6)
    factor = lr_factor(ade, total_steps=160_000, steps_per_epoch=1000)
    assert factor(0) == pytest.approx(1e-6)
    assert factor(750) == pytest.approx((1 - 750 / 160_000) * (1 - 0.5 * (1 - 1e-6)))
    assert factor(80_000) == pytest.approx(0.5) and factor(160_000) == 0.0


def test_dense_layer_decay_groups_follow_the_authors_rule(ade_data, tmp_path):
    from finetune.ade20k.task import Ade20kSegmentation
    from pretrain.config import load_config

    config = load_config("ade20k_demo", ade_overrides(ade_data, tmp_path))
    task = Ade20kSegmentation(config)
    model = task.build_model()
    groups = {name: g for g in task.build_param_groups(model, config.optim) for name in g["param_names"]}
    decay, layers = config.optim.layer_decay, config.ade20k.layer_decay_layers  # 0.9, 6
    expected = {"backbone.downsample_layers.0.0.weight": layers + 1, "backbone.stages.0.0.gamma": layers,
                "backbone.downsample_layers.2.0.weight": layers - 2, "backbone.stages.3.0.pwconv1.1.weight": 1,
                "decode_head.conv_seg.weight": 0, "auxiliary_head.conv_seg.weight": 0}
    for name, exponent in expected.items():
        assert groups[name]["lr_scale"] == pytest.approx(decay ** exponent), name
    assert groups["decode_head.conv_seg.bias"]["weight_decay"] == 0.0
    assert groups["decode_head.conv_seg.weight"]["weight_decay"] == config.optim.weight_decay


# ----------------------------------------------------------------------------- backbone init, presets


def test_backbone_init_from_an_export_drops_the_head_and_refuses_missing_keys(tmp_path):
    import unireplknet
    from finetune.ade20k.task import init_backbone
    from finetune.ade20k.heads import build_upernet

    dims, depths, kernels = (16, 32, 64, 128), (1, 1, 2, 1), ((3,), (13,), (13, 3), (13,))
    classifier = unireplknet.UniRepLKNet(depths=depths, dims=dims, kernel_sizes=kernels, num_classes=10)
    state = unireplknet.export_official(classifier)
    torch.save(state, tmp_path / "backbone.pth")
    model = build_upernet("unireplknet_a", 6, 0.0, depths=depths, dims=dims, kernel_sizes=kernels, channels=32,
                          aux_channels=16)
    norm_before = model.backbone.norm0.weight.detach().clone()
    report = init_backbone(model.backbone, str(tmp_path / "backbone.pth"))
    assert "head.weight" in report["dropped"] and "norm0.weight" in report["kept_initial"]
    assert torch.equal(model.backbone.norm0.weight, norm_before)
    source = dict(classifier.named_parameters())
    for name, param in model.backbone.named_parameters():
        if name in source:
            assert torch.equal(param, source[name]), name
    del state["stages.2.1.pwconv1.1.weight"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(unireplknet.CheckpointMismatchError, match=r"stages\.2\.1\.pwconv1\.1\.weight"):
        init_backbone(model.backbone, str(tmp_path / "partial.pth"))


def test_init_from_a_whole_model_file_in_the_authors_container_loads_backbone_and_heads(tmp_path, caplog):
    """``--init`` with an authors'-format ADE20K file (mmcv container, numpy ``meta``, ``backbone.*``,
    ``decode_head.*``, ``auxiliary_head.*``) starts from all of it, and says so; a re-parameterized file is
    refused (training needs the training structure)."""
    import logging

    import numpy as np

    from finetune.ade20k.task import build_segmentor
    from pretrain.config import load_config
    from pretrain.registry import registered_tasks

    smoke = list(registered_tasks()["ade20k"].smoke_overrides)
    source = build_segmentor(load_config("ade20k_demo", ["model.init_from=", "train.seed=5", *smoke]))
    for buffer in (b for name, b in source.named_buffers() if name.endswith("running_mean")):
        buffer.normal_()  # trained statistics, not the initial zeros
    released = tmp_path / "upernet.pth"
    torch.save({"meta": {"hook_msgs": {"best_score": np.float64(0.3)}}, "state_dict": source.state_dict(),
                "optimizer": {"state": {}, "param_groups": []}}, released)
    with caplog.at_level(logging.INFO, logger="finetune.backbone"):
        model = build_segmentor(load_config("ade20k_demo", [f"model.init_from={released}", *smoke]))
    loaded, expected = model.state_dict(), source.state_dict()
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in expected)
    assert f"whole model from {released}: auxiliary_head" in caplog.text and "decode_head" in caplog.text

    source.backbone.reparameterize()
    torch.save({"state_dict": source.state_dict()}, tmp_path / "deploy.pth")
    with pytest.raises(ValueError, match="inference structure"):
        build_segmentor(load_config("ade20k_demo", [f"model.init_from={tmp_path / 'deploy.pth'}", *smoke]))


def test_xl_preset_builds_and_runs_one_forward_backward_at_a_reduced_size():
    from finetune.ade20k.task import Ade20kSegmentation
    from pretrain.config import load_config

    config = load_config("ade20k_xl_upernet_640_160k", ["model.init_from="])
    assert config.train.global_batch_size == 16 and config.train.steps == 160_000
    assert config.ade20k.crop_size == 640 and config.model.grad_checkpointing
    task = Ade20kSegmentation(config)
    model = task.build_model()
    assert model.backbone.feature_info.channels() == [256, 512, 1024, 2048]
    images, labels = torch.randn(2, 3, 64, 64), torch.randint(0, 150, (2, 64, 64))
    losses = task.training_losses(model, images, labels)
    sum(losses.values()).backward()
    assert set(losses) == {"loss_seg", "loss_aux"} and all(torch.isfinite(v) for v in losses.values())
    assert model.backbone.stages[3][0].pwconv1[1].weight.grad is not None


def test_presets_start_from_the_files_the_authors_configs_name():
    """The authors' UperNet configs start S-22K, B and L from the 22K->1K 384 files and T, S-1K from the 1K ones
    (spec: released files; the names as released, with their top-1 in them)."""
    from pretrain.config import load_config

    expected = {"ade20k_t_upernet_512_160k": "unireplknet_t_in1k_224_acc83.21.pth",
                "ade20k_s_upernet_512_160k": "unireplknet_s_in1k_224_acc83.91.pth",
                "ade20k_s_upernet_640_160k": "unireplknet_s_in22k_to_in1k_384_acc86.44.pth",
                "ade20k_b_upernet_640_160k": "unireplknet_b_in22k_to_in1k_384_acc87.40.pth",
                "ade20k_l_upernet_640_160k": "unireplknet_l_in22k_to_in1k_384_acc87.88.pth",
                "ade20k_xl_upernet_640_160k": "unireplknet_xl_in22k_to_in1k_384_acc87.96.pth"}
    assert {name: load_config(name, []).model.init_from for name in expected} == expected


def test_the_paper_scale_dense_presets_sync_batchnorm_on_gpus_only(ade_data, tmp_path):
    """The authors' dense configs use SyncBN (``use_sync_bn=True`` and SyncBN heads, 2 images per GPU):
    ``model.sync_batchnorm=auto`` converts on CUDA with more than one rank and leaves one CPU rank as it is;
    ``true`` on CPU is refused (gloo has no SyncBatchNorm kernels)."""
    import torch.nn as nn

    from pretrain.config import load_config

    for name in ("ade20k_t_upernet_512_160k", "ade20k_l_upernet_640_160k", "coco_s_cascade_3x", "coco_xl_cascade_3x"):
        assert load_config(name, []).model.sync_batchnorm == "auto", name
    trainer = make_trainer(ade_overrides(str(ade_data), tmp_path / "auto", **{"model.sync_batchnorm": "auto"}))
    try:
        norms = [type(m) for m in trainer.engine.module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert norms and nn.SyncBatchNorm not in norms
    finally:
        trainer.close()
    from pretrain import engine

    try:
        with pytest.raises(ValueError, match="sync_batchnorm needs CUDA"):
            make_trainer(ade_overrides(str(ade_data), tmp_path / "true", **{"model.sync_batchnorm": "true"}))
    finally:
        engine.shutdown_distributed()  # the refused trainer had joined its one-rank process group
