"""Shards: ImageNet-22K (or any image tree) as WebDataset tar shards, and the loaders that stream them.

Write, check, time::

    python -m shards write /data/fall11 s3://bucket/in22k --workers 64 --max-side 512
    python -m shards write /data/imagenet/train /data/in1k-train          # image tree
    python -m shards write demo /tmp/demo/train && python -m shards write demo:val /tmp/demo/val
    python -m shards verify s3://bucket/in22k --sample 0.01
    python -m shards bench /tmp/demo/train --img-size 224 --workers 2

Each dataset directory holds ``shard-000000.tar ...`` (per sample ``jpg``, ``cls``, ``json`` with
class, source path and original size), ``info.json`` (per-shard counts, total, classes, skipped
sources, the command) and ``classes.txt``. ImageNet-22K labels follow timm's sorted fall11 WordNet
ids (21841), the order of the 22K head; other trees use sorted folder names. The sample order is
shuffled across shards with ``--seed``; re-running a write keeps complete shards.

Read::

    from shards import AugmentConfig, MixupConfig, build_eval_loader, build_train_loader

    loader = build_train_loader("s3://bucket/in22k", batch_size=128, img_size=224, rank=rank,
                                world_size=world, num_workers=8, mixup=MixupConfig())
    for epoch in range(start_epoch, epochs):
        loader.set_epoch(epoch)
        for images, targets in loader:   # len(loader) batches, the same on every rank
            ...
            checkpoint["data"] = loader.state_dict()   # exact mid-epoch resume

Resume guarantee: a loader restored with ``load_state_dict`` under the same shards, seed, world
size, rank, num_workers, batch size, samples per epoch and shuffle buffer yields bit-identical
remaining batches (same keys, same tensors, same mixup) as an uninterrupted one; other settings
are refused with ``ValueError``. ``loader.bad_samples`` counts skipped bad data for logging.

Any other payload (audio, video, series) streams the same way through a sample pipeline::

    pipeline = SamplePipeline(decode=decode_clip, into=augment_into_slot, sample_shape=(1, 16000))
    loader = TrainLoader(ShardSources.resolve("s3://bucket/speech"), pipeline, batch_size=256, rank=rank,
                         world_size=world, num_workers=8)
"""
from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .info import ShardReadError, read_info
    from .image import AugmentConfig, MixupConfig
    from .loader import EvalLoader, TrainLoader, build_eval_loader, build_train_loader
    from .stream import SamplePipeline, ShardSources
    from .verify import VerifyReport, verify_dataset
    from .writer import write_dataset, write_demo

# Loader names pull in torch and timm; the writer's worker processes only need the writer.
_EXPORTS = {
    "ShardReadError": "info",
    "read_info": "info",
    "AugmentConfig": "image",
    "EvalLoader": "loader",
    "MixupConfig": "image",
    "TrainLoader": "loader",
    "build_eval_loader": "loader",
    "build_train_loader": "loader",
    "SamplePipeline": "stream",
    "ShardSources": "stream",
    "VerifyReport": "verify",
    "verify_dataset": "verify",
    "write_dataset": "writer",
    "write_demo": "writer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'shards' has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
