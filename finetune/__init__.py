"""Fine-tuning dense prediction heads on the UniRepLKNet backbone, trained by ``pretrain``'s one trainer.

``finetune.ade20k``: UperNet semantic segmentation (ADE20K layout, mmseg's pipeline and metrics).
``finetune.coco``: COCOeval bbox/segm (faster-coco-eval) and a generated COCO-layout demo set; the
Cascade Mask R-CNN model and task are not built yet.
"""
