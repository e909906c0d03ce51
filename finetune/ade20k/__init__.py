"""ADE20K semantic segmentation: UperNet on a UniRepLKNet backbone, mmseg-equivalent metrics, demo data."""
