"""COCO fine-tuning through the one trainer: learning (COCOeval before and after), exact resume, 2-rank
evaluation, the model's cascade mechanics, data checks, the XL preset. Real DeepSpeed runs on generated data."""
from __future__ import annotations

import json
import logging
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from finetune_checks import assert_predict_draws_over, evaluate_on_ranks, weights
from test_pretrain_train import read_scalars

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def coco_data(tmp_path_factory) -> str:
    """The generated COCO-layout set: 64 training and 9 validation images (9: uneven over 2 ranks)."""
    from finetune.coco.demo_data import write_demo

    root = tmp_path_factory.mktemp("coco") / "coco"
    write_demo(root, train_images=64, val_images=9, seed=0)
    return str(root)


def coco_overrides(data_root: str, run_dir, **changes) -> list[str]:
    """``coco_demo`` on ``data_root`` at ~100 px: 6 steps of 2 images, one loader worker."""
    values = {"run_dir": run_dir, "coco.data_root": data_root, "coco.generate_demo": "false",
              "coco.train_scales": "96,112", "coco.max_size": 192, "coco.crop_resize_scales": "100",
              "coco.crop_size_range": "80,100", "coco.eval_scale": "192,112", "coco.rpn_proposals_train": 100,
              "coco.rpn_proposals_test": 100, "coco.roi_batch": 64, "loader.num_workers": 1,
              "train.micro_batch_size": 2, "train.global_batch_size": 2, "train.steps": 6, "train.log_every": 1,
              "train.eval_every": 0, "checkpoint.every": 1000, "optim.warmup_steps": 2}
    values.update(changes)
    return [f"{key}={value}" for key, value in values.items()]


def make_trainer(overrides: list[str]):
    from pretrain.config import load_config
    from pretrain.trainer import Trainer

    return Trainer(load_config("coco_demo", overrides))


# ----------------------------------------------------------------------------- learning


@pytest.fixture(scope="module")
def learned(demo_backbone, tmp_path_factory):
    """The demo preset from the pretrained demo backbone on its generated set (120 training images, 30 val), at
    a smaller size than the demo's (short side 96-128, 64 sampled RoIs per image, 32-channel box convs: half the
    time): evaluated before fine-tuning, then 150 steps of 4 images, evaluated again."""
    root = tmp_path_factory.mktemp("coco_learn")
    run_dir = root / "run"
    trainer = make_trainer([f"run_dir={run_dir}", f"coco.data_root={root / 'data'}", f"model.init_from={demo_backbone}",
                            "coco.train_scales=96,112,128", "coco.max_size=192", "coco.eval_scale=192,112",
                            "coco.roi_batch=64", "coco.box_channels=32", "train.steps=150", "train.eval_every=0",
                            "train.log_every=25", "loader.num_workers=2"])
    try:
        before = trainer.evaluate()
        result = trainer.train()
    finally:
        trainer.close()
    return before, result, run_dir


def test_fine_tuning_raises_box_and_mask_ap_well_above_the_untrained_model(learned):
    before, result, _ = learned
    after = result.eval
    print(f"COCO demo: bbox AP {before['eval/bbox_AP']:.1f} -> {after['eval/bbox_AP']:.1f}, segm AP "
          f"{before['eval/segm_AP']:.1f} -> {after['eval/segm_AP']:.1f} (AP50 {before['eval/bbox_AP50']:.1f} -> "
          f"{after['eval/bbox_AP50']:.1f})")
    assert result.status == "completed"
    assert after["eval/samples"] == before["eval/samples"] == 30
    assert after["eval/bbox_AP"] >= 5.0 and after["eval/segm_AP"] >= 10.0
    assert after["eval/bbox_AP"] >= before["eval/bbox_AP"] + 5.0
    assert after["eval/segm_AP"] >= before["eval/segm_AP"] + 8.0
    assert after["eval/bbox_AP50"] >= before["eval/bbox_AP50"] + 15.0


def test_loss_terms_and_coco_metrics_reach_tensorboard_and_metrics_json(learned):
    _, result, run_dir = learned
    scalars = read_scalars(run_dir)
    terms = ["loss_rpn_cls", "loss_rpn_bbox"] + [f"loss_{kind}_s{stage}" for stage in range(3)
                                                 for kind in ("cls", "bbox", "mask")]
    for tag in ["train/loss", *(f"train/{t}" for t in terms), "eval/bbox_AP", "eval/segm_AP", "eval/bbox_AP50",
                "lr/layer00_decay", "data/bad_samples"]:
        assert tag in scalars, tag
    total = dict(scalars["train/loss"])
    parts = [dict(scalars[f"train/{t}"]) for t in terms]
    for step in total:
        assert math.isclose(sum(p[step] for p in parts), total[step], rel_tol=1e-4), step
    steps = sorted(total)
    assert total[steps[-1]] < total[steps[0]]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert [e.step for e in events.Images("eval/predictions")] == [0, result.step]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["eval/segm_AP"] == pytest.approx(result.eval["eval/segm_AP"])


def test_predict_draws_boxes_and_masks_over_each_image(learned, tmp_path):
    _, _, run_dir = learned
    data = Path(json.loads((run_dir / "config.json").read_text())["coco"]["data_root"])
    images = sorted(str(p) for p in (data / "val2017").iterdir())[:2]
    assert_predict_draws_over(run_dir, images, tmp_path / "out", "--min-score", "0.05")


# ----------------------------------------------------------------------------- resume


def test_ema_on_the_detector_is_evaluated_and_the_run_exports_its_whole_model(coco_data, tmp_path):
    from finetune.coco.task import build_detector_from_config
    from pretrain.checkpoint import find_checkpoint, read_saved_config
    from pretrain.config import config_from_dict
    from pretrain.export import export_checkpoint

    run_dir = tmp_path / "run"
    trainer = make_trainer(coco_overrides(coco_data, run_dir, **{"train.steps": 3, "train.ema_decay": 0.5}))
    try:
        result = trainer.train()
        live = weights(trainer)
    finally:
        trainer.close()
    assert {"eval/bbox_AP", "eval_ema/bbox_AP", "eval_ema/segm_AP"} <= set(result.eval)
    assert result.eval["eval_ema/samples"] == result.eval["eval/samples"] == 9
    summary = export_checkpoint(str(run_dir), str(tmp_path / "ema.pth"), ema=True)
    state = torch.load(tmp_path / "ema.pth", weights_only=True)
    assert summary["keys"] == len(state) and any(k.startswith("box_heads.2.") for k in state)
    assert any(not torch.equal(state[k], live[k]) for k in state if state[k].is_floating_point())
    config = config_from_dict(read_saved_config(find_checkpoint(str(run_dir / "checkpoints"))))
    config.model.init_from = ""
    build_detector_from_config(config).load_state_dict(state, strict=True)
    with pytest.raises(ValueError, match="task=coco"):
        export_checkpoint(str(run_dir), str(tmp_path / "official.pth"), official=True)


def test_torchrun_launcher_trains_two_ranks_with_zero_2_and_evaluates_every_image_once(coco_data, tmp_path):
    run_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "finetune", "coco", "--config", "coco_demo", "--set",
                             *coco_overrides(coco_data, run_dir, **{"train.steps": 3, "train.global_batch_size": 4,
                                                                    "train.zero_stage": 2, "launch.launcher": "torchrun",
                                                                    "launch.num_workers": 2})],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["step"] == 3 and metrics["eval/samples"] == 9
    assert "on cpu x2" in (run_dir / "train.log").read_text()


# ----------------------------------------------------------------------------- evaluation over ranks

def test_two_rank_evaluation_with_uneven_work_equals_one_rank(coco_data, tmp_path):
    """9 validation images: 5 on rank 0, 4 on rank 1, with different numbers of detections (so of mask-head
    passes) per rank; COCOeval over the gathered results equals the 1-rank evaluation."""
    outputs = evaluate_on_ranks("coco_demo", lambda ranks: coco_overrides(coco_data, tmp_path / f"run_{ranks}", **{
        "train.global_batch_size": 4, "coco.score_threshold": 0.0}), tmp_path)
    assert outputs[1]["eval/samples"] == 9
    assert outputs[1] == pytest.approx(outputs[2], nan_ok=True)


# ----------------------------------------------------------------------------- the model


def tiny_detector(**options):
    from finetune.coco.model import build_detector

    torch.manual_seed(0)
    defaults = dict(drop_path_rate=0.0, depths=(1, 1, 2, 1), dims=(16, 32, 64, 128),
                    kernel_sizes=((3,), (13,), (13, 3), (13,)), fpn_channels=32, anchor_scale=2.0, box_channels=32,
                    box_fc=64, mask_channels=32, roi_batch=64, rpn_proposals_train=100, rpn_proposals_test=100)
    defaults.update(options)
    return build_detector("unireplknet_a", 3, **defaults)


def test_roi_levels_follow_the_canonical_224_rule_and_pool_aligned():
    """Level = floor(4 + log2(sqrt(area) / 224)) clamped to P2-P5 (mmdet: finest_scale 56), and each RoI is
    pooled with roi_align(aligned=True) on its own level, by hand."""
    from torchvision.ops import roi_align

    from finetune.coco.model import RoIAlignPyramid

    pool = RoIAlignPyramid(7)
    features = [torch.randn(1, 2, 64 // s, 64 // s) for s in (1, 2, 4, 8)]  # strides 4..32 of a 256-px image
    boxes = torch.tensor([[0.0, 0.0, 50.0, 50.0], [0.0, 0.0, 120.0, 120.0], [10.0, 10.0, 250.0, 250.0],
                          [0.0, 0.0, 255.0, 255.0], [5.0, 5.0, 10.0, 10.0]])
    # sqrt(area): 50 -> level 2 (P2), 120 -> 3, 240 -> 4, 255 -> 4, 5 -> 2
    expected_levels = [0, 1, 2, 2, 0]
    pooled = pool(features, [boxes])
    for i, level in enumerate(expected_levels):
        stride = (4, 8, 16, 32)[level]
        rois = torch.cat([torch.zeros(1, 1), boxes[i:i + 1]], dim=1)
        by_hand = roi_align(features[level], rois, 7, spatial_scale=1 / stride, sampling_ratio=0, aligned=True)
        assert torch.allclose(pooled[i], by_hand[0]), i


def test_cascade_training_returns_every_weighted_term_and_reaches_every_parameter():
    model = tiny_detector()
    model.train()
    masks = torch.zeros(2, 96, 128, dtype=torch.uint8)
    masks[0, 10:40, 10:50] = 1
    masks[1, 50:90, 60:120] = 1
    target = {"boxes": torch.tensor([[10.0, 10.0, 50.0, 40.0], [60.0, 50.0, 120.0, 90.0]]),
              "labels": torch.tensor([0, 2]), "masks": masks, "image_size": (96, 128)}
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
             "masks": torch.zeros(0, 96, 128, dtype=torch.uint8), "image_size": (96, 128)}
    losses = model(torch.randn(2, 3, 96, 128), [target, empty])
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_bbox"} | {f"loss_{k}_s{s}" for s in range(3)
                                                              for k in ("cls", "bbox", "mask")}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    weighted = tiny_detector(stage_weights=(1.0, 0.0, 0.0))
    weighted.train()
    torch.manual_seed(1)
    zeroed = weighted(torch.randn(2, 3, 96, 128), [target, empty])
    assert all(zeroed[f"loss_{k}_s{s}"].item() == 0.0 for s in (1, 2) for k in ("cls", "bbox", "mask"))


def test_inference_boxes_masks_and_limits_in_original_pixels():
    model = tiny_detector(score_threshold=0.0, max_detections=7).eval()
    meta = {"image_size": (96, 128), "orig_size": (192, 256), "scale": (0.5, 0.5)}
    with torch.no_grad():
        (result,) = model(torch.randn(1, 3, 96, 128), [meta])
    n = len(result["boxes"])
    assert 0 < n <= 7 and result["masks"].shape == (n, 192, 256)
    assert result["boxes"][:, 2].max() <= 256 and result["boxes"][:, 3].max() <= 192
    assert (result["scores"][:-1] >= result["scores"][1:]).all()
    assert result["masks"].min() >= 0 and result["masks"].max() <= 1


def test_bf16_autocast_keeps_proposals_and_boxes_in_float32():
    """Under bf16 autocast (the GPU default) the heads may run in bf16, but proposals, RoI coordinates, decoded
    boxes and losses stay float32: bf16 keeps 8 mantissa bits, so a 1000-px coordinate would be 4 px off."""
    model = tiny_detector(score_threshold=0.0).eval()
    meta = {"image_size": (96, 128)}
    images = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        (reference,) = model(images, [meta])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            (mixed,) = model(images, [meta])
    assert mixed["boxes"].dtype == torch.float32 and mixed["scores"].dtype == torch.float32
    assert len(mixed["boxes"]) > 0 and len(reference["boxes"]) > 0
    model.train()
    masks = torch.zeros(1, 96, 128, dtype=torch.uint8)
    masks[0, 10:60, 20:90] = 1
    target = {"boxes": torch.tensor([[20.0, 10.0, 90.0, 60.0]]), "labels": torch.tensor([1]), "masks": masks,
              "image_size": (96, 128)}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(images, [target])
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()


def test_bench_runs_one_dense_training_step_and_reports_its_figures():
    """`python -m finetune bench` is the one bench (`python -m pretrain bench`): the task's synthetic batch through the
    trainer's real step (DeepSpeed), at the preset's largest training size."""
    result = subprocess.run([sys.executable, "-m", "finetune", "bench", "--config", "coco_demo", "--steps", "1",
                             "--warmup", "0", "--set", "launch.device=cpu"], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout)
    assert figures["task"] == "coco" and figures["micro_batch_size"] == 4 and figures["input_shape"] == [3, 160, 224]
    assert figures["images_per_s"] > 0 and figures["step_time_s"] > 0 and figures["gflops_per_sample"] > 0


def test_mask_rcnn_is_the_first_cascade_stage_alone(coco_data, tmp_path):
    from pretrain.config import ConfigError, load_config

    config = load_config("coco_demo", coco_overrides(coco_data, tmp_path, **{
        "coco.detector": "mask_rcnn", "coco.stage_ious": "0.5", "coco.stage_weights": "1.0"}))
    from finetune.coco.task import build_detector_from_config

    assert build_detector_from_config(config).num_stages == 1
    with pytest.raises(ConfigError, match=r"coco\.stage_ious: expected 1 value"):
        load_config("coco_demo", coco_overrides(coco_data, tmp_path, **{"coco.detector": "mask_rcnn"}))


# ----------------------------------------------------------------------------- data and config checks


def test_missing_annotation_file_fails_before_training_naming_the_path(coco_data, tmp_path):
    import shutil

    broken = tmp_path / "coco"
    shutil.copytree(coco_data, broken)
    (broken / "annotations" / "instances_train2017.json").unlink()
    result = subprocess.run([sys.executable, "-m", "finetune", "coco", "--config", "coco_demo", "--data", str(broken),
                             "--run-dir", str(tmp_path / "run")], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "instances_train2017.json" in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_an_evaluation_short_of_an_unreadable_image_and_a_broken_annotation_is_reported_incomplete(
        coco_data, tmp_path, caplog):
    """A truncated val image and a two-point polygon in another val image's ground truth: 7 of the 9 images are
    scored; loader.eval_incomplete=error stops naming the annotation file, warn logs it (and the broken annotation)
    and reports what was scored."""
    import shutil

    from pretrain.trainer import EvaluationIncompleteError

    root = tmp_path / "damaged"
    shutil.copytree(coco_data, root)
    annotation_file = root / "annotations" / "instances_val2017.json"
    data = json.loads(annotation_file.read_text())
    images = sorted(data["images"], key=lambda i: i["id"])
    victim = next(a for a in data["annotations"] if a["image_id"] != images[2]["id"] and not a["iscrowd"])
    victim["segmentation"] = [[10.0, 10.0, 30.0, 12.0]]
    annotation_file.write_text(json.dumps(data))
    image = root / "val2017" / images[2]["file_name"]
    image.write_bytes(image.read_bytes()[:image.stat().st_size // 3])
    trainer = make_trainer(coco_overrides(str(root), tmp_path / "run", **{"loader.num_workers": 2}))
    try:
        shortfall = f"scored 7 of the 9 samples of {annotation_file}: 2 could not be read"
        with pytest.raises(EvaluationIncompleteError, match=re.escape(shortfall)):
            trainer.evaluate()
        trainer.config.loader.eval_incomplete = "warn"
        with caplog.at_level(logging.WARNING):
            results = trainer.evaluate()
    finally:
        trainer.close()
    assert results["eval/samples"] == 7 and math.isfinite(results["eval/bbox_AP"])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(shortfall in w for w in warnings)
    assert any(f"{annotation_file}: 1 of 9 images are not scored" in w and f"id {victim['id']}" in w for w in warnings)


def test_dense_task_refuses_zero_3_and_class_count_mismatch(coco_data, tmp_path):
    from pretrain.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"train\.zero_stage: expected 0, 1 or 2 with task=coco"):
        load_config("coco_demo", coco_overrides(coco_data, tmp_path, **{"train.zero_stage": 3}))
    with pytest.raises(ValueError, match="4 categories, but coco.num_classes=80"):
        make_trainer(coco_overrides(coco_data, tmp_path / "run", **{"coco.num_classes": 80}))


def test_coco_3x_preset_schedule_drops_at_epochs_27_and_33_after_500_warmup_iterations():
    """The preset through mmcv's step policy with linear warmup, by hand: 1e-4 x (1 - (1 - 0.001)(1 - t/500))
    during warmup, then 1e-4, x0.1 from epoch 27, x0.01 from epoch 33."""
    from pretrain.config import load_config
    from pretrain.optim import lr_factor

    config = load_config("coco_xl_cascade_3x", ["model.init_from="])
    per_epoch = 1000
    factor = lr_factor(config.optim, 36 * per_epoch, per_epoch)
    assert config.optim.lr == 1e-4
    assert factor(0) == pytest.approx(0.001)
    assert factor(250) == pytest.approx(1 - 0.999 * 0.5)
    assert factor(600) == factor(27 * per_epoch - 1) == pytest.approx(1.0)
    assert factor(27 * per_epoch) == pytest.approx(0.1)
    assert factor(33 * per_epoch) == pytest.approx(0.01)


def test_xl_preset_builds_and_runs_one_forward_backward_at_a_reduced_size():
    from finetune.coco.task import CocoInstanceSegmentation
    from pretrain.config import load_config

    config = load_config("coco_xl_cascade_3x", ["model.init_from=", "coco.rpn_proposals_train=64",
                                                "coco.roi_batch=32"])
    assert config.train.global_batch_size == 16 and config.train.epochs == 36
    assert config.model.grad_checkpointing and config.train.zero_stage == 2 and config.train.ema_decay == 0.9999
    assert (config.coco.fpn_channels, config.coco.box_fc, config.coco.stage_ious) == (256, 1024, (0.5, 0.6, 0.7))
    model = CocoInstanceSegmentation(config).build_model()
    assert model.backbone.feature_info.channels() == [256, 512, 1024, 2048]
    masks = torch.zeros(1, 128, 128, dtype=torch.uint8)
    masks[0, 20:90, 30:100] = 1
    target = {"boxes": torch.tensor([[30.0, 20.0, 100.0, 90.0]]), "labels": torch.tensor([5]), "masks": masks,
              "image_size": (128, 128)}
    model.train()
    losses = model(torch.randn(1, 3, 128, 128), [target])
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values()) and len(losses) == 11
    assert model.backbone.stages[3][0].pwconv1[1].weight.grad is not None
