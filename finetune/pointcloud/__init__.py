"""ModelNet point-cloud classification (issue 22), in progress: the data layer (both ModelNet layouts, surface
sampling with a cache, the authors' normalization, farthest-point sampling in plain torch), the demo set, the
authors' training augmentation, validation and voting rotations and metrics (OA, mAcc), and their P2P model
(views, kNN point encoder, point-to-pixel projection, cross-view fusion, colour head, UniRepLKNet,
view-concatenating head). The trainer task (loaders, evaluator, presets) and its registration come next; nothing
registers this task yet."""
