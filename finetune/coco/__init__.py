"""COCO instance detection and segmentation: evaluation and generated demo data; the Cascade Mask R-CNN model is still to be built."""
