"""Fine-tuning dense prediction heads on the UniRepLKNet backbone, trained by ``pretrain``'s one trainer.

``finetune.ade20k``: UperNet semantic segmentation (ADE20K layout, mmseg's pipeline and metrics).
COCO Cascade Mask R-CNN is not available yet.
"""
