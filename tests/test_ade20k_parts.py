"""ADE20K parts: mmseg-equivalent metrics, the UperNet heads and losses, layer-decay ids, demo data."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from finetune.ade20k.demo_data import CLASSES, write_demo
from finetune.ade20k.heads import FCNHead, UPerHead, build_upernet
from finetune.dense import layer_id_for_dense, lr_scale_for_dense
from finetune.ade20k.metrics import SegmentationEvaluator
from pretrain.distributed import WorldInfo

# ----------------------------------------------------------------------------------------------
# metrics

# 2 classes, 4x4, two ignored pixels (bottom left):
#   label          prediction
#   0 0 0 0        0 0 0 1
#   0 0 1 1        0 1 1 1
#   1 1 1 1        1 1 0 1
#   I I 1 1        0 1 1 1
# 14 labelled pixels. class 0: label 6, hit 4, predicted 4 + 1 (the 0 at row 2) = 5, union 6+5-4 = 7.
# class 1: label 8, hit 7, predicted 7 + 2 (row 0 col 3, row 1 col 1) = 9, union 8+9-7 = 10.
# IoU 4/7, 7/10; Acc 4/6, 7/8; aAcc 11/14.
_LABEL = torch.tensor([[0, 0, 0, 0], [0, 0, 1, 1], [1, 1, 1, 1], [255, 255, 1, 1]])
_PRED = torch.tensor([[0, 0, 0, 1], [0, 1, 1, 1], [1, 1, 0, 1], [0, 1, 1, 1]])


def test_metrics_perfect_prediction_is_100():
    labels = torch.randint(0, 5, (3, 8, 9))
    labels[:, 0, :] = 255
    predictions = labels.clone()
    predictions[:, 0, :] = 3  # whatever is predicted on ignored pixels does not count
    evaluator = SegmentationEvaluator(5)
    evaluator.update(predictions, labels)
    result = evaluator.compute(WorldInfo())
    assert result["mIoU"] == result["mAcc"] == result["aAcc"] == 100.0
    assert result["pixels"] == 3 * 7 * 9


def test_metrics_hand_computed_case():
    evaluator = SegmentationEvaluator(2, class_names=["a", "b"])
    evaluator.update(_PRED[None], _LABEL[None])
    result = evaluator.compute()
    assert result["IoU.a"] == pytest.approx(100 * 4 / 7)
    assert result["IoU.b"] == pytest.approx(100 * 7 / 10)
    assert result["Acc.a"] == pytest.approx(100 * 4 / 6)
    assert result["Acc.b"] == pytest.approx(100 * 7 / 8)
    assert result["mIoU"] == pytest.approx(100 * (4 / 7 + 7 / 10) / 2)
    assert result["mAcc"] == pytest.approx(100 * (4 / 6 + 7 / 8) / 2)
    assert result["aAcc"] == pytest.approx(100 * 11 / 14)
    assert result["pixels"] == 14
    intersect, union, pred, label = evaluator.state
    assert intersect.tolist() == [4, 7] and union.tolist() == [7, 10]
    assert pred.tolist() == [5, 9] and label.tolist() == [6, 8]
    assert evaluator.compute() == result  # compute() reduces a copy: calling it again changes nothing


def test_metrics_absent_class_is_skipped_and_predicted_only_class_counts_in_miou_only():
    # a third class neither labelled nor predicted: no entry, means unchanged
    evaluator = SegmentationEvaluator(3)
    evaluator.update(_PRED, _LABEL)
    result = evaluator.compute()
    assert result["mIoU"] == pytest.approx(100 * (4 / 7 + 7 / 10) / 2)
    assert result["mAcc"] == pytest.approx(100 * (4 / 6 + 7 / 8) / 2)
    assert "IoU.2" not in result and "Acc.2" not in result

    # class 2 predicted on 2 pixels, never labelled: union 2, IoU 0 -> in mIoU; label area 0 -> not in mAcc.
    # class 0: label 4, hit 2, predicted 2, union 4 -> IoU 1/2, Acc 1/2.  class 1: absent.
    evaluator = SegmentationEvaluator(3)
    evaluator.update(torch.tensor([[0, 0, 2, 2]]), torch.tensor([[0, 0, 0, 0]]))
    result = evaluator.compute()
    assert result["IoU.2"] == 0.0 and "Acc.2" not in result
    assert "IoU.1" not in result and "Acc.1" not in result
    assert result["mIoU"] == pytest.approx(25.0)
    assert result["mAcc"] == pytest.approx(50.0)
    assert result["aAcc"] == pytest.approx(50.0)


def test_metrics_update_in_parts_equals_one_update_and_accepts_lists():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 7, (4, 12, 10), generator=generator)
    labels[labels == 6] = 255
    predictions = torch.randint(0, 6, (4, 12, 10), generator=generator)
    whole = SegmentationEvaluator(6)
    whole.update(predictions, labels)
    halves = SegmentationEvaluator(6)
    halves.update(predictions[:2], labels[:2])
    halves.update(predictions[2:], labels[2:])
    assert torch.equal(whole.state, halves.state)
    assert whole.compute() == halves.compute()

    # differently sized images as lists of (H, W) maps
    listed = SegmentationEvaluator(6)
    listed.update([predictions[0], predictions[1, :5, :7]], [labels[0], labels[1, :5, :7]])
    expected = SegmentationEvaluator(6)
    expected.update(predictions[0], labels[0])
    expected.update(predictions[1, :5, :7], labels[1, :5, :7])
    assert torch.equal(listed.state, expected.state)
    listed.reset()
    assert listed.pixels == 0


def test_metrics_refuse_out_of_range_values():
    evaluator = SegmentationEvaluator(3)
    with pytest.raises(ValueError, match="label values"):
        evaluator.update(torch.tensor([[0, 1]]), torch.tensor([[0, 7]]))
    with pytest.raises(ValueError, match="prediction values"):
        evaluator.update(torch.tensor([[0, 3]]), torch.tensor([[0, 1]]))
    with pytest.raises(TypeError):
        evaluator.update(torch.zeros(1, 2), torch.zeros(1, 2, dtype=torch.long))


def test_metrics_match_mmseg_histc_formulation():
    # mmseg's intersect_and_union: per image, histc of the intersection / prediction / label over
    # non-ignored pixels, summed; then nanmean of I/U and I/label, and sum I / sum label.
    generator = torch.Generator().manual_seed(2)
    num_classes = 7
    evaluator = SegmentationEvaluator(num_classes)
    totals = torch.zeros(4, num_classes, dtype=torch.float64)
    for height, width in ((11, 13), (9, 17), (20, 6)):
        label = torch.randint(0, num_classes - 1, (height, width), generator=generator)  # class 6 never labelled
        label[torch.rand(label.shape, generator=generator) < 0.2] = 255
        pred = torch.randint(0, num_classes, (height, width), generator=generator)
        evaluator.update([pred], [label])
        keep = label != 255
        p, t = pred[keep].double(), label[keep].double()
        hist = lambda x: torch.histc(x, bins=num_classes, min=0, max=num_classes - 1)  # noqa: E731
        i, a_p, a_l = hist(p[p == t]), hist(p), hist(t)
        totals += torch.stack([i, a_p + a_l - i, a_p, a_l])
    assert torch.equal(evaluator.state, totals)
    i, u, _, a_l = totals.numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        miou, macc = np.nanmean(i / u) * 100, np.nanmean(i / a_l) * 100
    result = evaluator.compute()
    assert result["mIoU"] == pytest.approx(miou) and result["mAcc"] == pytest.approx(macc)
    assert result["aAcc"] == pytest.approx(100 * i.sum() / a_l.sum())
    assert "Acc.6" not in result and "IoU.6" in result


def test_metrics_miou_matches_torchmetrics_jaccard():
    classification = pytest.importorskip("torchmetrics.classification")
    generator = torch.Generator().manual_seed(1)
    num_classes = 8
    labels = torch.randint(0, num_classes, (6, 20, 24), generator=generator)
    labels[:, :3] = 255
    predictions = torch.where(torch.rand(labels.shape, generator=generator) < 0.6, labels.clamp(max=num_classes - 1),
                              torch.randint(0, num_classes, labels.shape, generator=generator))
    evaluator = SegmentationEvaluator(num_classes)
    evaluator.update(predictions, labels)
    jaccard = classification.MulticlassJaccardIndex(num_classes=num_classes, ignore_index=255, average="macro")
    jaccard.update(predictions, labels)
    assert evaluator.compute()["mIoU"] == pytest.approx(100 * jaccard.compute().item(), abs=1e-4)


# ----------------------------------------------------------------------------------------------
# heads

_NUM_CLASSES = 5
_TINY = dict(depths=(1, 1, 2, 1), dims=(16, 32, 64, 128), kernel_sizes=((3,), (7,), (7, 3), (7,)))


@pytest.fixture(scope="module")
def upernet():
    torch.manual_seed(0)
    return build_upernet("unireplknet_t", _NUM_CLASSES, drop_path_rate=0.1, channels=32, aux_channels=16, dropout=0.1,
                         **_TINY)


def test_upernet_shapes_train_and_eval(upernet):
    images = torch.randn(2, 3, 96, 128)
    upernet.train()  # batch 2: the PPM's 1x1 pooled map needs more than one value per channel for BatchNorm
    outputs = upernet(images)
    assert set(outputs) == {"logits", "aux_logits"}
    assert outputs["logits"].shape == outputs["aux_logits"].shape == (2, _NUM_CLASSES, 96, 128)
    upernet.eval()
    with torch.no_grad():
        outputs = upernet(images[:1])
    assert set(outputs) == {"logits"} and outputs["logits"].shape == (1, _NUM_CLASSES, 96, 128)


def test_upernet_losses_finite_ignore_respected_and_all_ignored_is_zero(upernet):
    upernet.train()
    images = torch.randn(2, 3, 64, 96)
    labels = torch.randint(0, _NUM_CLASSES, (2, 64, 96))
    labels[:, :16] = 255
    outputs = upernet(images)
    losses = upernet.losses(outputs, labels)
    assert set(losses) == {"loss_seg", "loss_aux"}
    assert all(torch.isfinite(v) for v in losses.values())

    # mmseg's default reduction: sum over non-ignored pixels / all pixels; avg_non_ignore: PyTorch's mean
    logits = outputs["logits"].detach()
    per_pixel = F.cross_entropy(logits, labels, ignore_index=255, reduction="none")
    detached = {k: v.detach() for k, v in outputs.items()}
    assert upernet.losses(detached, labels)["loss_seg"] == pytest.approx(per_pixel.sum().item() / labels.numel())
    aux = F.cross_entropy(detached["aux_logits"], labels, ignore_index=255)
    mean_losses = upernet.losses(detached, labels, avg_non_ignore=True)
    assert mean_losses["loss_seg"] == pytest.approx(F.cross_entropy(logits, labels, ignore_index=255).item())
    assert mean_losses["loss_aux"] == pytest.approx(0.4 * aux.item())

    # logits at ignored pixels do not matter
    changed = {k: v.clone() for k, v in detached.items()}
    changed["logits"][:, :, :16] = 100.0 * torch.randn_like(changed["logits"][:, :, :16])
    assert upernet.losses(changed, labels)["loss_seg"] == pytest.approx(losses["loss_seg"].item())

    # logits at stride 4 are upsampled to the label size
    small = {"logits": F.interpolate(logits, scale_factor=0.25, mode="bilinear")}
    assert torch.isfinite(upernet.losses(small, labels)["loss_seg"])

    # all pixels ignored: PyTorch's mean is NaN, ours is exactly 0 with finite (zero) gradients
    ignored = torch.full_like(labels, 255)
    assert torch.isnan(F.cross_entropy(logits, ignored, ignore_index=255))
    for avg_non_ignore in (False, True):
        upernet.zero_grad(set_to_none=True)
        total = sum(upernet.losses(upernet(images), ignored, avg_non_ignore=avg_non_ignore).values())
        assert total.item() == 0.0
        total.backward()
        grads = [p.grad for p in upernet.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)


def test_upernet_every_parameter_gets_a_gradient(upernet):
    upernet.train()
    upernet.zero_grad(set_to_none=True)
    outputs = upernet(torch.randn(2, 3, 64, 64))
    sum(upernet.losses(outputs, torch.randint(0, _NUM_CLASSES, (2, 64, 64))).values()).backward()
    missing = [n for n, p in upernet.named_parameters() if p.grad is None]
    assert not missing


def test_upernet_parameter_names_keep_official_backbone_names(upernet):
    names = [n for n, _ in upernet.named_parameters()]
    backbone = [n for n in names if n.startswith("backbone.")]
    assert backbone == [f"backbone.{n}" for n, _ in upernet.backbone.named_parameters()]
    assert all(n.startswith(("backbone.downsample_layers.", "backbone.stages.", "backbone.norm")) for n in backbone)
    for name in ("backbone.downsample_layers.0.0.weight", "backbone.stages.2.0.dwconv.lk_origin.weight",
                 "backbone.stages.2.1.pwconv2.2.bias", "backbone.norm0.weight", "backbone.norm3.bias"):
        assert name in names, name
    assert {n.split(".")[0] for n in names} == {"backbone", "decode_head", "auxiliary_head"}
    # mmseg's head names (so mmseg UperNet checkpoints map one to one)
    for name in ("decode_head.psp_modules.3.1.conv.weight", "decode_head.bottleneck.bn.weight",
                 "decode_head.lateral_convs.2.conv.weight", "decode_head.fpn_convs.0.conv.weight",
                 "decode_head.fpn_bottleneck.conv.weight", "decode_head.conv_seg.bias",
                 "auxiliary_head.convs.0.conv.weight", "auxiliary_head.conv_seg.weight"):
        assert name in names, name


def test_heads_standalone_shapes():
    features = [torch.randn(2, c, 32 // s, 48 // s) for c, s in ((8, 1), (16, 2), (24, 4), (32, 8))]
    head = UPerHead([8, 16, 24, 32], channels=16, num_classes=3)
    assert head(features).shape == (2, 3, 32, 48)
    assert FCNHead(24, channels=8, num_classes=3)(features[2]).shape == (2, 3, 8, 12)


def test_build_upernet_needs_kernel_sizes_for_custom_depths():
    with pytest.raises(ValueError, match="kernel_sizes"):
        build_upernet("unireplknet_t", 3, 0.0, depths=(1, 1, 2, 1), dims=(16, 32, 64, 128))
    with pytest.raises(ValueError, match="unknown backbone"):
        build_upernet("convnext_t", 3, 0.0)


# ----------------------------------------------------------------------------------------------
# layer-wise lr decay (the authors' constructor: max_layer_id = num_layers N, scale exponent N + 2 - id - 1)

@pytest.mark.parametrize("name, layer_id", [
    ("backbone.downsample_layers.0.0.weight", 0),
    ("backbone.stages.0.0.dwconv.lk_origin.weight", 1),
    ("backbone.stages.0.2.gamma", 1),
    ("backbone.downsample_layers.1.0.weight", 2),
    ("backbone.stages.1.2.pwconv1.weight", 2),
    ("backbone.downsample_layers.2.1.bias", 3),
    ("backbone.stages.2.0.norm.weight", 3),
    ("backbone.stages.2.7.pwconv2.0.weight", 3 + 7 // 3),
    ("backbone.stages.2.26.se.down.weight", 3 + 26 // 3),
    ("backbone.downsample_layers.3.0.weight", 12),
    ("backbone.stages.3.0.dwconv.lk_origin.weight", 12),
    ("backbone.norm3.weight", 13),  # no rule in the authors' function: its final else, like the heads
    ("decode_head.conv_seg.weight", 13),
    ("auxiliary_head.convs.0.conv.weight", 13),
])
def test_layer_id_for_dense(name, layer_id):
    assert layer_id_for_dense(name, num_layers=12) == layer_id


def test_lr_scale_for_dense_heads_at_full_lr():
    assert lr_scale_for_dense(layer_id_for_dense("decode_head.conv_seg.weight", 12), 12, 0.9) == 1.0
    assert lr_scale_for_dense(12, 12, 0.9) == pytest.approx(0.9)  # stage 3
    assert lr_scale_for_dense(0, 12, 0.9) == pytest.approx(0.9 ** 13)  # stem
    assert lr_scale_for_dense(5, 12, 0.9) == pytest.approx(0.9 ** 8)
    # T: num_layers 9, 18 stage-2 blocks -> ids 3..8, all below stage 3's 9; decay 1.0 -> all 1
    assert layer_id_for_dense("backbone.stages.2.17.gamma", 9) == 8
    assert lr_scale_for_dense(0, 9, 1.0) == 1.0
    with pytest.raises(ValueError, match="num_layers"):
        layer_id_for_dense("backbone.stages.2.26.gamma", 9)


# ----------------------------------------------------------------------------------------------
# demo data

def _files(root, kind, split):
    return sorted(p.name for p in (root / kind / split).iterdir())


def test_demo_data_layout_modes_and_sizes(tmp_path):
    info = write_demo(tmp_path, train_images=6, val_images=3, seed=0)
    assert info["classes"] == CLASSES and len(CLASSES) == 6
    assert _files(tmp_path, "images", "training") == [f"ADE_train_{i:08d}.jpg" for i in range(1, 7)]
    assert _files(tmp_path, "annotations", "training") == [f"ADE_train_{i:08d}.png" for i in range(1, 7)]
    assert _files(tmp_path, "images", "validation") == [f"ADE_val_{i:08d}.jpg" for i in range(1, 4)]
    assert _files(tmp_path, "annotations", "validation") == [f"ADE_val_{i:08d}.png" for i in range(1, 4)]
    sizes, values = set(), set()
    for split, prefix in (("training", "train"), ("validation", "val")):
        for path in (tmp_path / "images" / split).iterdir():
            image = Image.open(path)
            label = Image.open(tmp_path / "annotations" / split / path.name.replace(".jpg", ".png"))
            assert image.format == "JPEG" and image.mode == "RGB"
            assert label.format == "PNG" and label.mode == "L"
            assert image.size == label.size
            assert 128 <= image.size[0] <= 192 and 96 <= image.size[1] <= 160
            sizes.add(image.size)
            values |= set(np.unique(np.asarray(label)).tolist())
    assert len(sizes) > 1
    assert values <= set(range(len(CLASSES) + 1)) and {0, 1, 2} <= values
    assert (tmp_path / "objectInfo150.txt").read_text().splitlines()[1].endswith("wall")


def test_demo_data_deterministic_per_seed(tmp_path):
    write_demo(tmp_path / "a", train_images=3, val_images=1, seed=3)
    write_demo(tmp_path / "b", train_images=2, val_images=1, seed=3)  # fewer images: the first ones are equal
    write_demo(tmp_path / "c", train_images=2, val_images=1, seed=4)
    for kind, name in (("images", "ADE_train_00000002.jpg"), ("annotations", "ADE_train_00000002.png"),
                       ("annotations", "ADE_val_00000001.png")):
        split = "validation" if "val" in name else "training"
        a, b, c = ((tmp_path / r / kind / split / name).read_bytes() for r in "abc")
        assert a == b and a != c


def test_demo_data_fixed_size(tmp_path):
    write_demo(tmp_path, train_images=2, val_images=1, min_size=(64, 80), max_size=(64, 80))
    for path in (tmp_path / "images" / "training").iterdir():
        assert Image.open(path).size == (80, 64)


def test_the_test_resize_is_mmsegs_two_opencv_resizes_and_not_pillows():
    """mmseg 0.27: ``Resize((2048, 512), keep_ratio=True)`` then ``ResizeToMultiple(32)``, each ``cv2.resize``
    INTER_LINEAR on the BGR image. Sizes computed by hand from mmcv's ``rescale_size`` (int(side x factor + 0.5),
    factor = min(2048 / long, 512 / short)) and ``imresize_to_multiple`` (ceil to 32)."""
    import cv2
    from PIL import Image

    from finetune.ade20k.data import eval_resized

    rng = np.random.default_rng(0)
    cases = [((375, 500), 1.0, (512, 683), (512, 704)),     # 512/375 = 1.3653: upscale
             ((1200, 1700), 1.0, (512, 725), (512, 736)),   # 512/1200 = 0.4267: downscale
             ((375, 500), 0.75, (384, 512), (384, 512))]    # a multi-scale ratio: already a multiple of 32
    for (height, width), ratio, (h1, w1), (h2, w2) in cases:
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        got = eval_resized(Image.fromarray(image), (2048, 512), ratio)
        bgr = image[..., ::-1].copy()  # as mmseg decodes; to_rgb afterwards
        first = cv2.resize(bgr, (w1, h1), interpolation=cv2.INTER_LINEAR)
        expected = cv2.resize(first, (w2, h2), interpolation=cv2.INTER_LINEAR)[..., ::-1]
        assert got.shape == (h2, w2, 3)
        np.testing.assert_array_equal(got, expected)
        pillow = eval_resized(Image.fromarray(image), (2048, 512), ratio, method="pillow")
        assert pillow.shape == got.shape
        if h1 < height:  # downscaling: Pillow's bilinear filter antialiases (averages more pixels), OpenCV's not
            assert np.abs(pillow.astype(int) - got.astype(int)).mean() > 1
