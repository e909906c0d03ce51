"""The authors' released COCO files (mmdet 2.28 names, mmcv container, ``ema_*`` buffers) load into the product's
Cascade Mask R-CNN: through ``--init`` (backbone and heads) and through ``evaluate``/``export-onnx``'s loader.

The mmdet names are written here from the spec's table (``../shared/spec/finetune.md``), not from the product's map.
"""
from __future__ import annotations

import math
import re

import numpy as np
import torch

_TO_MMDET = (  # the spec's map read backwards: product name -> mmdet 2.28 name
    (r"^neck\.inner_blocks\.(\d+)\.0\.", r"neck.lateral_convs.\1.conv."),
    (r"^neck\.layer_blocks\.(\d+)\.0\.", r"neck.fpn_convs.\1.conv."),
    (r"^rpn\.head\.conv\.0\.0\.", "rpn_head.rpn_conv."),
    (r"^rpn\.head\.cls_logits\.", "rpn_head.rpn_cls."),
    (r"^rpn\.head\.bbox_pred\.", "rpn_head.rpn_reg."),
    (r"^box_heads\.(\d+)\.shared_fc\.", r"roi_head.bbox_head.\1.shared_fcs.0."),
    (r"^box_heads\.(\d+)\.(fc_cls|fc_reg)\.", r"roi_head.bbox_head.\1.\2."),
    (r"^mask_heads\.(\d+)\.convs\.(\d+)\.0\.", r"roi_head.mask_head.\1.convs.\2.conv."),
    (r"^mask_heads\.(\d+)\.predictor\.conv5_mask\.", r"roi_head.mask_head.\1.upsample."),
    (r"^mask_heads\.(\d+)\.predictor\.mask_fcn_logits\.", r"roi_head.mask_head.\1.conv_logits."),
)


def mmdet_name(key: str) -> str:
    match = re.match(r"^box_heads\.(\d+)\.shared_convs\.(\d+)\.(.+)$", key)
    if match:  # ConvModule j: conv at 3j, bn at 3j+1 (3j+2 is the ReLU, no tensors)
        stage, index, rest = match.group(1), int(match.group(2)), match.group(3)
        assert index % 3 in (0, 1), key
        return f"roi_head.bbox_head.{stage}.shared_convs.{index // 3}.{'conv' if index % 3 == 0 else 'bn'}.{rest}"
    for pattern, replacement in _TO_MMDET:
        if re.match(pattern, key):
            return re.sub(pattern, replacement, key, count=1)
    assert key.startswith("backbone."), f"the spec's table has no mmdet name for {key}"
    return key


def released_file(model: torch.nn.Module, path) -> dict[str, torch.Tensor]:
    """``model``'s weights as the authors' file holds them: mmdet names, an ``ema_`` copy of each (other
    values), mmcv's container with numpy scalars in ``meta``."""
    state = {mmdet_name(k): v.clone() for k, v in model.state_dict().items()}
    assert not any(k.startswith(("neck.inner", "neck.layer", "rpn.", "box_heads.", "mask_heads.")) for k in state)
    ema = {"ema_" + k.replace(".", "_"): (v + 1 if v.is_floating_point() else v) for k, v in state.items()}
    torch.save({"meta": {"hook_msgs": {"best_score": np.float64(0.5639)}, "epoch": np.int64(36)},
                "state_dict": {**state, **ema}, "optimizer": {"state": {}, "param_groups": []}}, path)
    return model.state_dict()


@torch.no_grad()
def trained(model: torch.nn.Module) -> None:
    """Weights and statistics no fresh model has (a fresh model with the same seed would pass unloaded)."""
    for tensor in [*model.parameters(), *(b for name, b in model.named_buffers() if name.endswith("running_mean"))]:
        tensor.add_(torch.randn_like(tensor))


def _config(init_from: str = "", *more: str):
    from pretrain.config import load_config
    from pretrain.registry import registered_tasks

    return load_config("coco_demo", [f"model.init_from={init_from}", "train.seed=3",
                                     *registered_tasks()["coco"].smoke_overrides, *more])


def test_an_authors_coco_file_starts_a_fine_tune_with_backbone_and_heads(tmp_path):
    from finetune.coco.task import build_detector_from_config

    source = build_detector_from_config(_config())
    trained(source)
    expected = released_file(source, tmp_path / "casc_mask_rcnn_released.pth")
    model = build_detector_from_config(_config(str(tmp_path / "casc_mask_rcnn_released.pth")))
    loaded = model.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected), "an ema_ copy or a wrong key loaded"


def test_the_evaluation_loader_reads_an_authors_coco_file_through_the_tasks_key_map(tmp_path):
    from pretrain.registry import get_task
    from pretrain.task import build_task
    from pretrain.weights import load_model_weights, read_model_weights

    source = build_task(_config()).build_model()
    trained(source)
    expected = released_file(source, tmp_path / "released.pth")
    model = build_task(_config()).build_model()
    structure = load_model_weights(model, read_model_weights(str(tmp_path / "released.pth")),
                                   get_task("coco").released_key_map)
    assert structure == "training"
    assert all(torch.equal(model.state_dict()[k], expected[k]) for k in expected)


# ----------------------------------------------------------------------------- test-time parity with mmdet 2.28


def test_box_deltas_decode_as_mmdets_delta2bbox_clamped_on_both_sides():
    """mmdet ``delta2bbox`` (means 0, stds s): d = delta x s; dw, dh clamped to +-log(1000/16); gx = px + pw dx,
    gw = pw exp(dw); box = (gx - gw/2, gy - gh/2, gx + gw/2, gy + gh/2). Values computed by hand."""
    from finetune.coco.model import STAGE_STDS, MmdetBoxCoder

    proposal = torch.tensor([[0.0, 0.0, 100.0, 50.0]], dtype=torch.float64)  # px 50, py 25, pw 100, ph 50
    rpn = MmdetBoxCoder((1.0, 1.0, 1.0, 1.0))
    # dw = dh = -10 -> -log(62.5): gw = 100 / 62.5 = 1.6, gh = 0.8 (torchvision alone: 100 e^-10 = 0.0045)
    box = rpn.decode_single(torch.tensor([[0.0, 0.0, -10.0, -10.0]], dtype=torch.float64), proposal)
    torch.testing.assert_close(box, torch.tensor([[49.2, 24.6, 50.8, 25.4]], dtype=torch.float64), rtol=0,
                               atol=1e-12)
    # dw = 10 -> +log(62.5): gw = 6250, gh = 50 (clamped from above, as torchvision does too)
    box = rpn.decode_single(torch.tensor([[0.0, 0.0, 10.0, 0.0]], dtype=torch.float64), proposal)
    torch.testing.assert_close(box, torch.tensor([[-3075.0, 0.0, 3175.0, 50.0]], dtype=torch.float64), rtol=0,
                               atol=1e-9)
    # the first cascade stage (stds 0.1, 0.1, 0.2, 0.2), nothing clamped: dx = 0.01, dw = -0.6, dh = 0.04
    stage = MmdetBoxCoder(tuple(1.0 / s for s in STAGE_STDS[0]))
    box = stage.decode_single(torch.tensor([[0.1, 0.0, -3.0, 0.2]], dtype=torch.float64), proposal)
    gw, gh = 100 * math.exp(-0.6), 50 * math.exp(0.04)
    expected = torch.tensor([[51 - gw / 2, 25 - gh / 2, 51 + gw / 2, 25 + gh / 2]], dtype=torch.float64)
    torch.testing.assert_close(box, expected, rtol=0, atol=1e-12)
    # training decodes with gradients (the cascade's GIoU loss): the clamp is out of place, a clamped delta gets
    # none (as mmdet's clamp), and d gx / d delta_x = pw x std = 100 x 0.1 = 10
    deltas = torch.tensor([[0.1, 0.0, -30.0, 0.2]], dtype=torch.float64, requires_grad=True)
    stage.decode_single(deltas, proposal)[0, 0].backward()
    torch.testing.assert_close(deltas.grad, torch.tensor([[10.0, 0.0, 0.0, 0.0]], dtype=torch.float64), rtol=0,
                               atol=1e-12)


def test_rpn_keeps_every_proposal_with_positive_sides_as_mmdets_min_bbox_size_0():
    """mmdet 2.28 ``RPNHead._bbox_post_process`` with ``min_bbox_size=0`` keeps w > 0 and h > 0: a proposal
    5e-4 wide stays (torchvision's default 1e-3 drops it), a zero-wide one goes."""
    from finetune.coco.task import build_detector_from_config

    rpn = build_detector_from_config(_config()).rpn.eval()
    proposals = torch.tensor([[[10.0, 10.0, 10.0005, 30.0], [20.0, 20.0, 20.0, 40.0], [50.0, 50.0, 80.0, 80.0]]])
    objectness = torch.tensor([[5.0, 4.0, 3.0]])
    boxes, scores = rpn.filter_proposals(proposals, objectness, [(100, 100)], [3])
    kept = {tuple(round(v, 4) for v in box.tolist()) for box in boxes[0]}
    assert kept == {(10.0, 10.0, 10.0005, 30.0), (50.0, 50.0, 80.0, 80.0)}


def test_masks_are_pasted_as_mmdets_grid_sample_on_the_sub_pixel_box():
    """mmdet ``_do_paste_mask`` (GPU, ``skip_empty=False``): pixel centres x + 0.5 mapped to (x - x0) / (x1 - x0)
    x 2 - 1, ``grid_sample(align_corners=False)``, zeros outside. By hand for a 2 x 2 mask on the box (0, 0, 4, 4):
    the centres 0.5 .. 3.5 land at mask coordinates -0.25, 0.25, 0.75, 1.25, so each axis weighs the mask's two
    cells (0.75, 0), (0.75, 0.25), (0.25, 0.75), (0, 0.75)."""
    from finetune.coco.model import paste_masks

    weights = torch.tensor([[0.75, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 0.75]], dtype=torch.float64)
    mask = torch.tensor([[0.9, 0.2], [0.4, 0.6]], dtype=torch.float64)
    expected = weights @ mask @ weights.T  # out[y, x] = sum_ij w[y, i] m[i, j] w[x, j]
    pasted = paste_masks(mask[None].float(), torch.tensor([[0.0, 0.0, 4.0, 4.0]]), (4, 4))
    torch.testing.assert_close(pasted[0].double(), expected, rtol=0, atol=1e-6)
    # a sub-pixel box in a larger image: >= 0.5 exactly at the pixel centres inside it; a box of no width has its
    # infinite x set to 0 by mmdet: every column samples the mask's middle (a stripe over its rows)
    pasted = paste_masks(torch.ones(2, 28, 28), torch.tensor([[2.3, 1.7, 5.9, 6.2], [3.0, 3.0, 3.0, 8.0]]), (10, 12))
    inside = pasted[0] >= 0.5
    rows, cols = inside.nonzero()[:, 0], inside.nonzero()[:, 1]
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (2, 5, 2, 5)  # centres 2.5..5.5 in y, 2.5..5.5 in x
    stripe = (pasted[1] >= 0.5).nonzero()
    assert set(stripe[:, 0].tolist()) == {3, 4, 5, 6, 7} and set(stripe[:, 1].tolist()) == set(range(12))


def test_anchors_are_mmdets_unrounded_base_anchors_on_the_stride_grid():
    """mmdet ``AnchorGenerator`` (octave scale 8, ratios 0.5/1/2, centre offset 0): w = 8 s / sqrt(r),
    h = 8 s sqrt(r), shifted by the stride. By hand at stride 4: 32 / sqrt(0.5) = 45.2548 wide, 22.6274 high."""
    from finetune.coco.task import build_detector_from_config

    generator = build_detector_from_config(_config("", "coco.anchor_scale=8")).rpn.anchor_generator
    base = generator.cell_anchors[0].double()  # stride 4, size 32
    half_w, half_h = 16 * math.sqrt(2), 16 / math.sqrt(2)
    expected = torch.tensor([[-half_w, -half_h, half_w, half_h], [-16, -16, 16, 16], [-half_h, -half_w, half_h, half_w]],
                            dtype=torch.float64)
    torch.testing.assert_close(base, expected, rtol=0, atol=1e-5)  # float32 anchors
    from torchvision.models.detection.image_list import ImageList

    features = [torch.zeros(1, 1, 2, 3)]  # one level, stride 4 for a 8 x 12 image: 6 positions x 3 ratios
    generator.cell_anchors = generator.cell_anchors[:1]
    generator.sizes, generator.aspect_ratios = generator.sizes[:1], generator.aspect_ratios[:1]
    anchors = generator(ImageList(torch.zeros(1, 3, 8, 12), [(8, 12)]), features)[0].double()
    assert anchors.shape == (18, 4)
    # position 4 of the 2 x 3 grid, row-major: y = 1, x = 1, shifted by (4, 4); its second anchor is ratio 1
    torch.testing.assert_close(anchors[4 * 3 + 1], torch.tensor([4.0 - 16, 4 - 16, 4 + 16, 4 + 16],
                                                                dtype=torch.float64), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- training-side parity


def test_rpn_targets_follow_mmdets_max_iou_assigner_with_min_pos_iou():
    """mmdet ``MaxIoUAssigner(pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3)`` by hand, in torchvision's codes
    (gt index, -1 background, -2 ignored): anchor 0 is gt 0's (0.75); anchor 1 is gt 1's (0.6 < 0.7, but gt 1's
    best); anchor 2 stays background although it is gt 2's best (0.25 < min_pos_iou; torchvision would make it
    positive); anchor 4 is ignored (0.35)."""
    from finetune.coco.model import MmdetRPNMatcher

    quality = torch.tensor([[0.75, 0.5, 0.2, 0.0, 0.35],
                            [0.1, 0.6, 0.25, 0.1, 0.2],
                            [0.0, 0.0, 0.25, 0.0, 0.0]])
    assert MmdetRPNMatcher(0.7, 0.3, min_pos_iou=0.3)(quality).tolist() == [0, 1, -1, -1, -2]


def test_rpn_ignores_anchors_crossing_the_image_border_as_mmdets_allowed_border_0():
    """mmdet ``anchor_inside_flags`` (x1, y1 >= 0, x2 < w, y2 < h) before assigning: the anchor that overlaps
    the ground truth best (0.95) crosses the border and is ignored, so the best *inside* anchor (IoU 1040/2160 =
    0.48) becomes the positive; an anchor ending at x2 = w is outside."""
    from finetune.coco.task import build_detector_from_config

    rpn = build_detector_from_config(_config()).rpn
    rpn._image_sizes = [(100, 100)]
    anchors = [torch.tensor([[10.0, 10.0, 50.0, 50.0], [-5.0, 10.0, 35.0, 50.0], [60.0, 60.0, 100.0, 100.0]])]
    gt = torch.tensor([[-4.0, 10.0, 36.0, 50.0]])
    labels, matched = rpn.assign_targets_to_anchors(anchors, [{"boxes": gt}])
    assert labels[0].tolist() == [1.0, -1.0, -1.0]
    assert torch.equal(matched[0][0], gt[0])
    labels, _ = rpn.assign_targets_to_anchors(anchors, [{"boxes": torch.zeros(0, 4)}])
    assert labels[0].tolist() == [0.0, -1.0, -1.0]  # no object: inside anchors are background, the rest ignored
