"""The point-cloud task through the trainer (issue 22 points 3, 9, 10, 11): the demo learns the primitives'
shapes, the authors' loss by hand, and the authors' preset builds and steps at reduced size. The conformance
suite (tests/test_task_conformance.py) adds the launchers, exact resume, preemption, two-rank evaluation,
evaluate, export and bench for this task as for every registered one."""
from __future__ import annotations

import math

import pytest
import torch


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> str:
    from finetune.pointcloud.demo_data import write_demo

    out = tmp_path_factory.mktemp("pointcloud_demo")
    write_demo(out, points=1024, seed=0)
    return str(out / "resampled")


def test_the_authors_label_smoothing_by_hand():
    """``get_loss_acc``: target 0.8 on the true class, 0.2 / 3 on each of the 3 others (4 classes)."""
    from finetune.pointcloud.task import smoothed_cross_entropy

    logits = torch.tensor([[2.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    log_p = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    expected = -(0.8 * log_p[0, 0] + 0.2 / 3 * log_p[0, 1:].sum())
    torch.testing.assert_close(smoothed_cross_entropy(logits, torch.tensor([0]), 0.2), expected, rtol=0, atol=1e-15)
    # no smoothing: plain cross-entropy
    torch.testing.assert_close(smoothed_cross_entropy(logits, torch.tensor([2]), 0.0),
                               torch.nn.functional.cross_entropy(logits, torch.tensor([2])), rtol=0, atol=1e-15)


def test_demo_learns_the_shapes_of_unseen_primitives(demo_root, tmp_path):
    """``pointcloud_demo`` through the trainer (DeepSpeed ZeRO 1, CPU, one loader worker): 150 steps of 16 clouds
    of 128 points lift OA on the 60 test shapes (8 rotations each, chance 1/6) well above the untrained network;
    the voted test (40 rotations) is scored at the end."""
    from pretrain.config import load_config
    from pretrain.trainer import Trainer

    config = load_config("pointcloud_demo", [f"run_dir={tmp_path / 'run'}", f"pointcloud.data_root={demo_root}",
                                             "pointcloud.generate_demo=false", "train.eval_every=0",
                                             "checkpoint.every=1000"])
    trainer = Trainer(config)
    try:
        before = trainer.evaluate()
        result = trainer.train()
    finally:
        trainer.close()
    after = result.eval
    print(f"point-cloud demo: OA {before['eval/oa']:.1f}% untrained -> {after['eval/oa']:.1f}% after {result.step} "
          f"steps, mAcc {before['eval/macc']:.1f}% -> {after['eval/macc']:.1f}%; voted test OA "
          f"{after['test/oa']:.1f}%, mAcc {after['test/macc']:.1f}%")
    assert result.step == 150 and after["eval/samples"] == after["test/samples"] == 60
    assert before["eval/oa"] < 30
    assert after["eval/oa"] >= 35 and after["eval/oa"] - before["eval/oa"] >= 15
    assert after["test/oa"] >= 35 and math.isfinite(after["test/macc"])


def test_the_authors_preset_validates_builds_and_steps_at_reduced_size():
    """``pointcloud_s_modelnet40``: UniRepLKNet-S behind 4 views, 40 classes (LayerNorm over 4 x 768), one
    forward/backward of the authors' loss on 2 clouds of 256 points projected at 56 (CPU)."""
    from finetune.pointcloud import PRESETS
    from finetune.pointcloud.task import PointCloudClassification
    from pretrain.config import validate

    config = validate(PRESETS["pointcloud_s_modelnet40"]())
    assert (config.optim.lr, config.optim.weight_decay, config.train.global_batch_size, config.train.epochs,
            config.train.label_smoothing) == (5e-4, 0.05, 16, 300, 0.2)
    assert (config.pointcloud.points, config.pointcloud.fps_points, config.pointcloud.image_size) == (4096, 4800, 224)
    config.pointcloud.image_size = 56
    task = PointCloudClassification(config)
    model = task.build_model()
    assert model.norm.normalized_shape == (4 * 768,) and model.head.out_features == 40
    clouds = torch.rand(2, 256, 3) * 2 - 1
    loss = task.training_losses(model, (clouds, clouds), torch.tensor([0, 39]))["loss"]
    loss.backward()
    assert torch.isfinite(loss)
