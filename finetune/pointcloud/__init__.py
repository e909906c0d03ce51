"""ModelNet point-cloud classification (issue 22), in progress: the data layer (both ModelNet layouts, surface
sampling with a cache, the authors' normalization, farthest-point sampling in plain torch) and the demo set.
The P2P projection model, the trainer task and its registration come next; nothing registers this task yet."""
