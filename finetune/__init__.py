"""Fine-tuning tasks on the UniRepLKNet backbone, each trained by ``pretrain``'s one trainer and registered with it.

Each task lives whole in its folder (config section, presets, data, heads, metrics, demo data, predictions):

``finetune.ade20k``: UperNet semantic segmentation (the ADEChallengeData2016 layout, mmseg's pipeline and metrics).
``finetune.coco``: Cascade Mask R-CNN instance segmentation (the COCO 2017 layout, mmdet's recipe, COCOeval).

What the dense tasks share (config base, layer-wise decay, normalization, the task base) is ``finetune.dense``;
the backbone they build and initialize is ``finetune.backbone``. ``python -m finetune`` lists every registered
task (``pretrain.registry``), including tasks of other packages.
"""
