"""Cascade Mask R-CNN (and Mask R-CNN) on a UniRepLKNet backbone, as the authors train it on COCO (mmdet 2.x).

Built from torchvision's detection parts where they fit: ``FeaturePyramidNetwork`` + ``LastLevelMaxPool``
(P2-P6), ``AnchorGenerator`` / ``RPNHead`` / ``RegionProposalNetwork``, ``BoxCoder``, ``Matcher``,
``BalancedPositiveNegativeSampler``, ``MaskRCNNHeads`` / ``MaskRCNNPredictor``, ``ops.roi_align``,
``ops.batched_nms`` and ``ops.generalized_box_iou_loss``. Written here (torchvision
has a single stage only): the cascade, the authors' 4conv1fc BN box head with class-specific regression and
GIoU on decoded boxes, and RoI pooling with ``aligned=True`` (mmcv's RoIAlign; torchvision's
``MultiScaleRoIAlign`` uses ``aligned=False``).

mmdet conventions kept: the background class is the *last* classifier output (index K); the mask head of a
stage trains on that stage's positive RoIs; the next stage samples from the refined boxes of this stage's
sampled RoIs (ground truth removed, then added again); at test time the stages' classification *logits*
are averaged before the softmax (mmdet ``CascadeRoIHead.simple_test``), boxes come from the last stage,
and all stages' mask heads run on the final boxes with their sigmoids averaged (``merge_aug_masks``).
The RPN loss is smooth-L1 (beta 1/9) on deltas, as the authors' (mmdet) configs have it.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, BoxCoder, Matcher
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.ops import FeaturePyramidNetwork, batched_nms, box_iou, clip_boxes_to_image, roi_align
from torchvision.ops import generalized_box_iou_loss
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

__all__ = ["CascadeMaskRCNN", "MMDET_MIN_BOX_SIZE", "MmdetAnchorGenerator", "MmdetBoxCoder", "MmdetRPNMatcher",
           "MmdetRegionProposalNetwork", "STAGE_STDS", "build_detector", "paste_masks"]

STAGE_STDS: tuple[tuple[float, float, float, float], ...] = (
    (0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067))
"""The authors' box-coder target stds per cascade stage (means 0); ``BoxCoder`` takes weights = 1 / std."""

STRIDES = (4, 8, 16, 32)
"""Strides of P2-P5 (the RoI levels); P6 (stride 64) only feeds the RPN."""


class FloatRPNHead(RPNHead):
    """``RPNHead`` whose outputs are float32: under bf16/fp16 autocast, torchvision's box coder would
    otherwise decode proposals in half precision (8 mantissa bits: pixels off by several)."""

    def forward(self, x: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        logits, deltas = super().forward(x)
        return [t.float() for t in logits], [t.float() for t in deltas]


class MmdetBoxCoder(BoxCoder):
    """torchvision's ``BoxCoder`` with mmdet 2.x ``delta2bbox``'s clamp: dw and dh limited on *both* sides to
    ``log(1000 / 16)`` (torchvision limits them from above only, so a strongly negative dw decodes to a box of
    almost no width where mmdet keeps 1/62.5 of the proposal's)."""

    def decode_single(self, rel_codes: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        _, _, ww, wh = self.weights
        limit = self.bbox_xform_clip
        codes = rel_codes.reshape(len(rel_codes), -1, 4)  # out of place: training decodes with gradients
        low = torch.tensor([-limit * ww, -limit * wh], dtype=codes.dtype, device=codes.device)
        codes = torch.cat([codes[..., :2], torch.maximum(codes[..., 2:], low)], dim=-1)
        return super().decode_single(codes.reshape(rel_codes.shape), boxes)


def paste_masks(masks: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int], chunk: int = 16) -> torch.Tensor:
    """mmdet 2.28's ``_do_paste_mask`` as the authors' GPUs ran it (``skip_empty=False``): each (M x M) mask
    probability map sampled at every pixel centre of the (H, W) image through its sub-pixel box with
    ``grid_sample(align_corners=False)`` (zeros outside the mask); the infinite coordinates of a box of no width
    or height are set to 0 (the mask's middle), as mmdet does.
    torchvision's ``paste_masks_in_image`` instead pads the mask, widens the box and rounds it to integers.
    Returns (N, H, W) probabilities (thresholded at 0.5 by the evaluation, mmdet's ``mask_thr_binary``)."""
    height, width = size
    out = masks.new_zeros((len(masks), height, width), dtype=torch.float32)
    ys = torch.arange(height, device=masks.device, dtype=torch.float32) + 0.5
    xs = torch.arange(width, device=masks.device, dtype=torch.float32) + 0.5
    for start in range(0, len(masks), chunk):
        part, box = masks[start:start + chunk].float(), boxes[start:start + chunk].float()
        x0, y0, x1, y1 = box[:, 0:1], box[:, 1:2], box[:, 2:3], box[:, 3:4]
        gx, gy = (xs - x0) / (x1 - x0) * 2 - 1, (ys - y0) / (y1 - y0) * 2 - 1  # (n, W), (n, H)
        gx, gy = gx.masked_fill(torch.isinf(gx), 0.0), gy.masked_fill(torch.isinf(gy), 0.0)  # as mmdet does
        grid = torch.stack([gx[:, None, :].expand(-1, height, -1), gy[:, :, None].expand(-1, -1, width)], dim=3)
        out[start:start + chunk] = F.grid_sample(part[:, None], grid, align_corners=False)[:, 0]
    return out


class MmdetAnchorGenerator(AnchorGenerator):
    """torchvision's anchor grid with mmdet 2.x's base anchors: w = size / sqrt(ratio), h = size x sqrt(ratio),
    centred on 0, *not* rounded to integers (torchvision rounds: a stride-4 ratio-0.5 anchor is +-23 x +-11
    there, +-22.63 x +-11.31 in mmdet and here)."""

    def generate_anchors(self, scales, aspect_ratios, dtype: torch.dtype = torch.float32,
                         device: torch.device = torch.device("cpu")) -> torch.Tensor:
        sizes = torch.as_tensor(scales, dtype=dtype, device=device)
        ratios = torch.as_tensor(aspect_ratios, dtype=dtype, device=device)
        heights = (torch.sqrt(ratios)[:, None] * sizes[None, :]).reshape(-1)  # ratio-major, as mmdet
        widths = ((1 / torch.sqrt(ratios))[:, None] * sizes[None, :]).reshape(-1)
        return torch.stack([-widths, -heights, widths, heights], dim=1) / 2


class MmdetRPNMatcher(Matcher):
    """mmdet 2.28's RPN ``MaxIoUAssigner`` (pos 0.7, neg 0.3, ``min_pos_iou=0.3``, ``gt_max_assign_all``) in
    torchvision's ``Matcher`` codes: an anchor is that ground truth's for IoU >= 0.7, background below 0.3,
    ignored between; then every anchor tied for a ground truth's best IoU becomes that ground truth's (later ones
    win), but only where that best is at least ``min_pos_iou`` (torchvision takes any best, even an IoU near 0,
    and assigns it to the anchor's own argmax)."""

    def __init__(self, high: float = 0.7, low: float = 0.3, min_pos_iou: float = 0.3):
        super().__init__(high, low, allow_low_quality_matches=False)
        self.min_pos_iou = min_pos_iou

    def __call__(self, quality: torch.Tensor) -> torch.Tensor:
        matches = super().__call__(quality)
        best = quality.max(dim=1).values[:, None]  # per ground truth
        ties = (quality == best) & (best >= self.min_pos_iou)  # (G, A)
        order = torch.arange(1, len(quality) + 1, device=quality.device)[:, None]
        owner = (ties * order).max(dim=0).values - 1  # the last ground truth an anchor ties for, -1: none
        return torch.where(owner >= 0, owner, matches)


class MmdetRegionProposalNetwork(RegionProposalNetwork):
    """torchvision's RPN with mmdet's training targets: :class:`MmdetRPNMatcher`, and ``allowed_border=0``:
    anchors not wholly inside the (resized, unpadded) image are neither matched nor sampled (mmdet's
    ``anchor_inside_flags``: x1, y1 >= 0, x2 < width, y2 < height)."""

    def forward(self, images: ImageList, features, targets=None):
        self._image_sizes = images.image_sizes
        return super().forward(images, features, targets)

    def assign_targets_to_anchors(self, anchors: list[torch.Tensor], targets: list[dict]):
        labels, matched_boxes = [], []
        for anchors_here, target, (height, width) in zip(anchors, targets, self._image_sizes):
            inside = ((anchors_here[:, 0] >= 0) & (anchors_here[:, 1] >= 0) & (anchors_here[:, 2] < width)
                      & (anchors_here[:, 3] < height))
            gt = target["boxes"]
            if gt.numel() == 0:
                label = torch.zeros(len(anchors_here), dtype=torch.float32, device=anchors_here.device)
                matched = torch.zeros_like(anchors_here)
            else:
                quality = box_iou(gt, anchors_here)
                quality[:, ~inside] = -1.0  # never matched, never a ground truth's best
                index = self.proposal_matcher(quality)
                matched = gt[index.clamp(min=0)]
                label = (index >= 0).to(torch.float32)
                label[index == Matcher.BETWEEN_THRESHOLDS] = -1.0
            label[~inside] = -1.0
            labels.append(label)
            matched_boxes.append(matched)
        return labels, matched_boxes


MMDET_MIN_BOX_SIZE = 2.0 ** -149
"""mmdet 2.28's RPN keeps proposals with width and height ``> min_bbox_size`` (0 in the authors' configs);
torchvision keeps ``>= rpn.min_size`` (1e-3 by default): the smallest positive float32 makes the two the same."""


class RoIAlignPyramid(nn.Module):
    """RoIAlign (``aligned=True``, ``sampling_ratio=0``) of each box on its FPN level: level
    ``floor(4 + log2(sqrt(area) / 224))`` clamped to P2-P5 (mmdet's ``finest_scale=56`` rule, the same)."""

    def __init__(self, output_size: int, strides: Sequence[int] = STRIDES):
        super().__init__()
        self.output_size, self.strides = output_size, tuple(strides)

    def forward(self, features: Sequence[torch.Tensor], boxes: Sequence[torch.Tensor]) -> torch.Tensor:
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)])
        first = int(math.log2(self.strides[0]))
        scale = ((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2])).clamp(min=0).sqrt()
        levels = torch.floor(4 + torch.log2(scale / 224 + 1e-6)).clamp(first, first + len(self.strides) - 1) - first
        out = features[0].new_zeros((rois.shape[0], features[0].shape[1], self.output_size, self.output_size))
        for level, (feature, stride) in enumerate(zip(features, self.strides)):
            index = torch.nonzero(levels == level).squeeze(1)
            if index.numel():
                # in float32 as torchvision's autocast rule does: box coordinates in bf16 would be pixels off
                pooled = roi_align(feature.float(), rois[index].float(), self.output_size, spatial_scale=1.0 / stride,
                                   sampling_ratio=0, aligned=True)
                out[index] = pooled.to(out.dtype)
        return out


class ConvFCBoxHead(nn.Module):
    """mmdet ``ConvFCBBoxHead`` as the authors configure it: 4 shared 3x3 convs (BN, ReLU), one fc, then a
    ``K + 1``-way classifier (background last) and class-specific regression (``4 K``)."""

    def __init__(self, in_channels: int, num_classes: int, conv_channels: int = 256, fc_channels: int = 1024,
                 num_convs: int = 4, roi_size: int = 7):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(num_convs):
            layers += [nn.Conv2d(in_channels if i == 0 else conv_channels, conv_channels, 3, padding=1, bias=False),
                       nn.BatchNorm2d(conv_channels), nn.ReLU(inplace=True)]
        self.shared_convs = nn.Sequential(*layers)
        self.shared_fc = nn.Linear(conv_channels * roi_size * roi_size, fc_channels)
        self.fc_cls = nn.Linear(fc_channels, num_classes + 1)
        self.fc_reg = nn.Linear(fc_channels, 4 * num_classes)
        for m in self.shared_convs.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        nn.init.xavier_uniform_(self.shared_fc.weight)
        nn.init.zeros_(self.shared_fc.bias)
        nn.init.normal_(self.fc_cls.weight, std=0.01)
        nn.init.normal_(self.fc_reg.weight, std=0.001)
        nn.init.zeros_(self.fc_cls.bias)
        nn.init.zeros_(self.fc_reg.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.relu(self.shared_fc(self.shared_convs(x).flatten(1)))
        return self.fc_cls(x).float(), self.fc_reg(x).float()


class MaskHead(nn.Module):
    """mmdet ``FCNMaskHead``: 4 3x3 convs, a 2x deconv, a class-specific 1x1 (28x28 logits for 14x14 RoIs)."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256):
        super().__init__()
        self.convs = MaskRCNNHeads(in_channels, [channels] * 4, 1)
        self.predictor = MaskRCNNPredictor(channels, channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictor(self.convs(x)).float()


def _class_deltas(deltas: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The (R, 4) deltas of each RoI's class from class-specific (R, 4 K) regression."""
    return deltas.view(deltas.shape[0], -1, 4)[torch.arange(deltas.shape[0], device=deltas.device), labels]


def _mask_targets(gt_masks: torch.Tensor, boxes: torch.Tensor, matched: torch.Tensor, size: int) -> torch.Tensor:
    """Each positive RoI's ground-truth mask cropped to the RoI and resized to ``size`` (mmdet ``mask_target``:
    RoIAlign with ``aligned=True``, then >= 0.5)."""
    rois = torch.cat([matched[:, None].to(boxes.dtype), boxes], dim=1)
    return (roi_align(gt_masks[:, None].float(), rois, size, 1.0, sampling_ratio=0, aligned=True)[:, 0] >= 0.5).float()


class CascadeMaskRCNN(nn.Module):
    """Backbone -> FPN (P2-P6) -> RPN -> ``len(stage_ious)`` cascade stages of box and mask heads.

    ``forward(images, targets)``: ``images`` (B, 3, H, W) zero-padded; ``targets`` one dict per image with
    ``image_size`` (h, w) of its unpadded content, and in training ``boxes`` (N, 4) x1y1x2y2, ``labels`` (N,)
    in 0..K-1, ``masks`` (N, h', w') covering at least the content. Training returns the named losses (RPN,
    and per stage ``loss_{cls,bbox,mask}_s{i}`` already weighted by the stage's weight); evaluation returns
    per image ``boxes`` / ``scores`` / ``labels`` / ``masks`` (probabilities at ``orig_size``), in the
    original image's pixels when the target gives ``orig_size`` and ``scale`` (resized / original, (y, x)).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, *, fpn_channels: int = 256, anchor_scale: float = 8.0,
                 anchor_ratios: Sequence[float] = (0.5, 1.0, 2.0), rpn_batch: int = 256,
                 rpn_proposals_train: int = 2000, rpn_proposals_test: int = 1000, roi_batch: int = 512,
                 stage_ious: Sequence[float] = (0.5, 0.6, 0.7), stage_weights: Sequence[float] = (1.0, 0.5, 0.25),
                 box_channels: int = 256, box_fc: int = 1024, mask_channels: int = 256, giou_weight: float = 10.0,
                 score_threshold: float = 0.05, nms_iou: float = 0.5, max_detections: int = 100, with_mask: bool = True):
        super().__init__()
        if len(stage_ious) != len(stage_weights) or not 1 <= len(stage_ious) <= len(STAGE_STDS):
            raise ValueError(f"need 1-{len(STAGE_STDS)} stages with one weight each, got ious {list(stage_ious)} "
                             f"and weights {list(stage_weights)}")
        self.backbone = backbone
        self.num_classes = num_classes
        self.neck = FeaturePyramidNetwork(list(backbone.feature_info.channels()), fpn_channels,
                                          extra_blocks=LastLevelMaxPool())
        strides = STRIDES + (64,)
        anchors = MmdetAnchorGenerator(tuple((anchor_scale * s,) for s in strides),
                                       (tuple(anchor_ratios),) * len(strides))
        self.rpn = MmdetRegionProposalNetwork(
            anchors, FloatRPNHead(fpn_channels, len(anchor_ratios)), fg_iou_thresh=0.7, bg_iou_thresh=0.3,
            batch_size_per_image=rpn_batch, positive_fraction=0.5,
            pre_nms_top_n={"training": rpn_proposals_train, "testing": rpn_proposals_test},
            post_nms_top_n={"training": rpn_proposals_train, "testing": rpn_proposals_test}, nms_thresh=0.7)
        self.rpn.box_coder = MmdetBoxCoder((1.0, 1.0, 1.0, 1.0))  # mmdet's two-sided clamp (decode only differs)
        self.rpn.proposal_matcher = MmdetRPNMatcher(0.7, 0.3, min_pos_iou=0.3)
        self.rpn.min_size = MMDET_MIN_BOX_SIZE
        self.box_roi = RoIAlignPyramid(7)
        self.mask_roi = RoIAlignPyramid(14)
        self.box_heads = nn.ModuleList(ConvFCBoxHead(fpn_channels, num_classes, box_channels, box_fc)
                                       for _ in stage_ious)
        self.mask_heads = nn.ModuleList(MaskHead(fpn_channels, num_classes, mask_channels)
                                        for _ in stage_ious) if with_mask else None
        self.box_coders = [MmdetBoxCoder(tuple(1.0 / s for s in std)) for std in STAGE_STDS[:len(stage_ious)]]
        self.matchers = [Matcher(iou, iou, allow_low_quality_matches=False) for iou in stage_ious]
        self.sampler = BalancedPositiveNegativeSampler(roi_batch, 0.25)
        self.stage_weights = tuple(stage_weights)
        self.giou_weight = giou_weight
        self.score_threshold, self.nms_iou, self.max_detections = score_threshold, nms_iou, max_detections

    @property
    def num_stages(self) -> int:
        return len(self.box_heads)

    def no_weight_decay(self) -> set[str]:
        inner = getattr(self.backbone, "no_weight_decay", None)
        return {f"backbone.{name}" for name in inner()} if inner else set()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)

    def features(self, images: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        return self.neck(OrderedDict((str(i), f) for i, f in enumerate(self.backbone(images))))

    def forward(self, images: torch.Tensor, targets: list[dict]):
        sizes = [tuple(int(v) for v in t["image_size"]) for t in targets]
        features = self.features(images)
        proposals, rpn_losses = self.rpn(ImageList(images, sizes), features, targets if self.training else None)
        levels = [features[str(i)] for i in range(len(STRIDES))]
        if self.training:
            losses = {"loss_rpn_cls": rpn_losses["loss_objectness"], "loss_rpn_bbox": rpn_losses["loss_rpn_box_reg"]}
            losses.update(self._cascade_losses(levels, [p.detach() for p in proposals], targets, sizes))
            return losses
        return self._detect(levels, proposals, targets, sizes)

    # ------------------------------------------------------------------ training

    def _sample(self, stage: int, proposals: list[torch.Tensor], targets: list[dict]):
        """Per image: ground truth added, matched at the stage's IoU, ``roi_batch`` sampled (1/4 positive)."""
        rois, labels, matched, is_gt = [], [], [], []
        for boxes, target in zip(proposals, targets):
            gt = target["boxes"].to(boxes.dtype)
            candidates = torch.cat([boxes, gt])
            gt_flag = torch.cat([torch.zeros(len(boxes), dtype=torch.bool, device=boxes.device),
                                 torch.ones(len(gt), dtype=torch.bool, device=boxes.device)])
            if len(gt):
                index = self.matchers[stage](box_iou(gt, candidates))
                label = torch.where(index >= 0, target["labels"][index.clamp(min=0)], self.num_classes)
            else:
                index = torch.full((len(candidates),), -1, dtype=torch.int64, device=boxes.device)
                label = torch.full_like(index, self.num_classes)
            rois.append(candidates)
            labels.append(label)
            matched.append(index)
            is_gt.append(gt_flag)
        positive, negative = self.sampler([(label != self.num_classes).to(torch.int64) for label in labels])
        keep = [torch.nonzero(p | n).squeeze(1) for p, n in zip(positive, negative)]
        return ([r[k] for r, k in zip(rois, keep)], [lab[k] for lab, k in zip(labels, keep)],
                [m[k] for m, k in zip(matched, keep)], [g[k] for g, k in zip(is_gt, keep)])

    def _cascade_losses(self, levels, proposals, targets, sizes) -> dict[str, torch.Tensor]:
        losses: dict[str, torch.Tensor] = {}
        for stage in range(self.num_stages):
            rois, labels, matched, is_gt = self._sample(stage, proposals, targets)
            cls_logits, deltas = self.box_heads[stage](self.box_roi(levels, rois))
            label = torch.cat(labels)
            weight = self.stage_weights[stage]
            losses[f"loss_cls_s{stage}"] = weight * F.cross_entropy(cls_logits, label)
            positive = torch.nonzero(label < self.num_classes).squeeze(1)
            all_rois = torch.cat(rois)
            coder = self.box_coders[stage]
            gt_boxes = torch.cat([t["boxes"][m.clamp(min=0)] if len(t["boxes"]) else torch.zeros_like(r)
                                  for t, m, r in zip(targets, matched, rois)])
            decoded = coder.decode_single(_class_deltas(deltas[positive], label[positive]), all_rois[positive])
            giou = generalized_box_iou_loss(decoded, gt_boxes[positive].to(decoded.dtype), reduction="sum")
            losses[f"loss_bbox_s{stage}"] = weight * self.giou_weight * giou / max(label.numel(), 1)
            if self.mask_heads is not None:
                losses[f"loss_mask_s{stage}"] = weight * self._mask_loss(stage, levels, rois, labels, matched, targets)
            if stage + 1 < self.num_stages:
                proposals = self._refine(stage, rois, labels, matched, is_gt, cls_logits, deltas, sizes)
        return losses

    def _mask_loss(self, stage, levels, rois, labels, matched, targets) -> torch.Tensor:
        positive = [torch.nonzero(lab < self.num_classes).squeeze(1) for lab in labels]
        boxes = [r[p] for r, p in zip(rois, positive)]
        count = sum(len(b) for b in boxes)
        if count == 0:  # keeps every mask parameter in the graph (DDP / ZeRO expect gradients for all)
            return sum(p.sum() for p in self.mask_heads[stage].parameters()) * 0.0
        logits = self.mask_heads[stage](self.mask_roi(levels, boxes))
        size = logits.shape[-1]
        mask_targets = torch.cat([_mask_targets(t["masks"], b, m[p], size) if len(b) else logits.new_zeros((0, size, size))
                                  for t, b, m, p in zip(targets, boxes, matched, positive)])
        label = torch.cat([lab[p] for lab, p in zip(labels, positive)])
        chosen = logits[torch.arange(count, device=logits.device), label]
        return F.binary_cross_entropy_with_logits(chosen, mask_targets)

    @torch.no_grad()
    def _refine(self, stage, rois, labels, matched, is_gt, cls_logits, deltas, sizes) -> list[torch.Tensor]:
        """The next stage's proposals: this stage's sampled non-ground-truth RoIs regressed by their assigned
        class (the predicted one for background RoIs), clipped to the image (mmdet ``refine_bboxes``)."""
        label = torch.cat(labels)
        label = torch.where(label == self.num_classes, cls_logits[:, :-1].argmax(dim=1), label)
        refined = self.box_coders[stage].decode_single(_class_deltas(deltas, label), torch.cat(rois))
        out, start = [], 0
        for r, gt_flag, size in zip(rois, is_gt, sizes):
            boxes = clip_boxes_to_image(refined[start:start + len(r)], size)
            out.append(boxes[~gt_flag])
            start += len(r)
        return out

    # ------------------------------------------------------------------ inference

    @torch.no_grad()
    def _detect(self, levels, proposals, targets, sizes) -> list[dict]:
        counts = [len(p) for p in proposals]
        rois = proposals
        stage_logits = []
        for stage in range(self.num_stages):
            cls_logits, deltas = self.box_heads[stage](self.box_roi(levels, rois))
            stage_logits.append(cls_logits)
            if stage + 1 < self.num_stages:
                label = cls_logits[:, :-1].argmax(dim=1)
                refined = self.box_coders[stage].decode_single(_class_deltas(deltas, label), torch.cat(rois))
                rois = [clip_boxes_to_image(b, s) for b, s in zip(refined.split(counts), sizes)]
        scores = (sum(stage_logits) / len(stage_logits)).softmax(dim=1)[:, :-1]
        last = torch.cat(rois)
        boxes = self.box_coders[-1].decode_single(deltas.reshape(-1, 4), last.repeat_interleave(self.num_classes, 0))
        boxes = boxes.view(-1, self.num_classes, 4)
        # mmdet: clipped in the resized image, scaled back to the original, then NMS there (no clip after)
        factors = [boxes.new_tensor([t.get("scale", (1.0, 1.0))[1], t.get("scale", (1.0, 1.0))[0]] * 2)
                   for t in targets]
        results = [self._image_detections(image_scores, clip_boxes_to_image(image_boxes, size) / factor)
                   for image_scores, image_boxes, size, factor in zip(scores.split(counts), boxes.split(counts),
                                                                     sizes, factors)]
        probs = self._mask_probs(levels, results, factors) if self.mask_heads is not None else None
        for i, (result, target) in enumerate(zip(results, targets)):
            if probs is not None:
                height, width = (int(v) for v in target.get("orig_size", target["image_size"]))
                result["masks"] = paste_masks(probs[i], result["boxes"], (height, width))
        return results

    def _image_detections(self, scores: torch.Tensor, boxes: torch.Tensor) -> dict:
        labels = torch.arange(self.num_classes, device=scores.device).expand_as(scores)
        keep = scores > self.score_threshold
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        kept = batched_nms(boxes, scores, labels, self.nms_iou)[:self.max_detections]
        return {"boxes": boxes[kept], "scores": scores[kept], "labels": labels[kept]}

    def _mask_probs(self, levels, results: list[dict], factors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per image (N, 28, 28): the stages' mask sigmoids on the final boxes (scaled to the resized image by
        ``factors``, as mmdet does), averaged, of each box's class."""
        boxes = [r["boxes"] * factor for r, factor in zip(results, factors)]
        total = sum(len(b) for b in boxes)
        if not total:  # no detection anywhere: the mask heads do not run (ranks may differ: ZeRO <= 2 only)
            return [b.new_zeros((0, 28, 28)) for b in boxes]
        features = self.mask_roi(levels, boxes)
        probs = sum(head(features).sigmoid() for head in self.mask_heads) / self.num_stages
        label = torch.cat([r["labels"] for r in results])
        return list(probs[torch.arange(total, device=probs.device), label].split([len(b) for b in boxes]))


def build_detector(backbone_name: str, num_classes: int, *, drop_path_rate: float, depths=None, dims=None,
                   kernel_sizes=None, grad_checkpointing: bool = False, **options) -> CascadeMaskRCNN:
    """A Cascade Mask R-CNN (``options`` as :class:`CascadeMaskRCNN`) on a features_only UniRepLKNet,
    randomly initialized (load the backbone with ``finetune.backbone.init_backbone``)."""
    from ..backbone import build_dense_backbone

    backbone = build_dense_backbone(backbone_name, drop_path_rate=drop_path_rate, depths=depths, dims=dims,
                                    kernel_sizes=kernel_sizes, grad_checkpointing=grad_checkpointing)
    return CascadeMaskRCNN(backbone, num_classes, **options)
