"""ModelNet point-cloud classification (issue 22), in progress: the data layer (both ModelNet layouts, surface
sampling with a cache, the authors' normalization, farthest-point sampling in plain torch), the point-to-pixel
projection's cells and scatter, and the demo set. The rest of the P2P model, the trainer task and its
registration come next; nothing registers this task yet."""
