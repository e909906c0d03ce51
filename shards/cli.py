"""Command line: ``python -m shards {write,verify,bench} ...``; ``--help`` on each for details."""
from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys

from .classes import CLASS_MAPS


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return number


def _fraction(value: str) -> float:
    number = float(value)
    if not 0.0 < number <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {value}")
    return number


LAYOUT_GROUP = "unireplknet.shard_layouts"
"""Entry points naming a dataset layout's writer, ``write(root, out_url, *, samples_per_shard, workers, seed,
progress, command) -> {split: info}`` (``speechcommands``: the audio task's): ``shards write LAYOUT ROOT OUT``."""


def layout_writers() -> dict:
    """The dataset layouts ``shards write`` knows by name (entry points of :data:`LAYOUT_GROUP`)."""
    from importlib.metadata import entry_points

    return {point.name: point for point in entry_points(group=LAYOUT_GROUP)}


def cmd_write_layout(args: argparse.Namespace, point) -> int:
    """``shards write LAYOUT ROOT OUT``: a dataset layout's splits as shard sets under OUT."""
    from .writer import TargetLockedError

    if args.root_out is None:
        raise SystemExit(f"usage: python -m shards write {args.source} ROOT OUT (the {args.source} folder, then the "
                         "target directory)")
    ignored = [flag for flag, value, default in (("--max-side", args.max_side, None), ("--classes", args.classes, "auto"),
               ("--num-samples", args.num_samples, None), ("--image-size", args.image_size, None), ("--prefix", args.prefix, "shard"),
               ("--shard-bytes", args.shard_bytes, None), ("--jpeg-quality", args.jpeg_quality, 95)) if value != default]
    if ignored:
        raise SystemExit(f"{', '.join(ignored)}: not options of the {args.source} layout (it takes --samples-per-shard, "
                         "--workers and --seed)")
    root, out_url = args.out_url, args.root_out
    try:
        infos = point.load()(root, out_url, samples_per_shard=args.samples_per_shard, workers=args.workers,
                             seed=args.seed, progress=True, command=shlex.join(["python", "-m", "shards", *args.argv]))
    except TargetLockedError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for split, info in infos.items():
        print(f"{split}: wrote {info['total']} samples in {info['num_shards']} shards, {info['num_classes']} classes, "
              f"to {out_url.rstrip('/')}/{split}" + (f"; skipped {len(info['skipped'])} that do not decode (listed "
                                                      "in its info.json)" if info["skipped"] else ""))
        for entry in info["skipped"][:20]:
            print(f"  {entry['source']}: {entry['reason']}")
    return 0


def cmd_write(args: argparse.Namespace) -> int:
    """Write SOURCE as shards under OUT_URL, then print a summary."""
    from .sources import open_source
    from .writer import TargetLockedError, write_dataset

    layouts = layout_writers()
    if args.source in layouts:
        return cmd_write_layout(args, layouts[args.source])
    if args.root_out is not None:
        raise SystemExit(f"{args.source!r} is not a dataset layout name ({', '.join(sorted(layouts)) or 'none installed'}); "
                         "an image source takes SOURCE OUT_URL")

    demo = args.source == "demo" or args.source.startswith("demo:")
    generated = demo or args.source == "photos"
    if not generated and args.num_samples is not None:
        raise SystemExit("--num-samples applies to the demo and photos sources only")
    if not demo and args.image_size is not None:
        raise SystemExit("--image-size applies to the demo source only")
    source = open_source(args.source, num_samples=args.num_samples, seed=args.seed,
                         image_size=args.image_size or 32) if generated else args.source
    try:
        info = write_dataset(
            source,
            args.out_url,
            samples_per_shard=args.samples_per_shard,
            shard_bytes=args.shard_bytes,
            max_side=args.max_side,
            workers=args.workers,
            seed=args.seed,
            prefix=args.prefix,
            classes=args.classes,
            jpeg_quality=args.jpeg_quality,
            command=shlex.join(["python", "-m", "shards", *args.argv]),
        )
    except TargetLockedError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {info['total']} samples in {info['num_shards']} shards, {info['num_classes']} classes, to {args.out_url}")
    if info["skipped"]:
        print(f"skipped {len(info['skipped'])} source files that do not decode (listed in info.json):")
        for entry in info["skipped"][:20]:
            print(f"  {entry['source']}: {entry['reason']}")
        if len(info["skipped"]) > 20:
            print(f"  ... and {len(info['skipped']) - 20} more")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Verify shards against info.json; exit 1 on any problem."""
    from .verify import verify_dataset

    report = verify_dataset(args.url, sample_fraction=args.sample, workers=args.workers, seed=args.seed)
    print(f"{report.url}: {report.shards} shards, {report.samples} samples, {report.decoded} images decoded")
    for entry in report.problems:
        where = entry["shard"] + (f" key {entry['key']}" if entry["key"] else "")
        print(f"  BAD {where}: {entry['problem']}")
    print("OK" if report.ok else f"FAILED: {len(report.problems)} problems")
    return 0 if report.ok else 1


def cmd_bench(args: argparse.Namespace) -> int:
    """Print decode+augment throughput per worker and in total, or (--compare) beside other readers."""
    from .bench import bench, compare, format_comparison
    from .image import AugmentConfig

    if args.compare:
        readers = ("project", *[r.strip() for r in args.compare.split(",") if r.strip() and r.strip() != "project"])
        report = compare(args.url, readers=readers, img_size=args.img_size, batch_size=args.batch_size,
                         num_workers=args.workers, batches=args.batches, rounds=args.rounds, mixup=args.mixup)
        print(format_comparison(report))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)
        return 0

    augment = AugmentConfig(auto_augment=None, reprob=0.0, color_jitter=None) if args.no_augment else AugmentConfig()
    result = bench(
        args.url, img_size=args.img_size, batch_size=args.batch_size, num_workers=args.workers, batches=args.batches, augment=augment
    )
    what = "decode+resize" if args.no_augment else "decode+augment (rand-m9-mstd0.5-inc1, random erasing)"
    print(f"{what} at {result.img_size}px, batch {result.batch_size}:")
    print(f"  per worker: {result.per_worker:8.1f} images/s")
    print(f"  total:      {result.total:8.1f} images/s with {result.num_workers} workers")
    if args.target:
        print(f"  to feed {args.target:.0f} images/s per rank use num_workers >= {result.workers_for(args.target)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m shards`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="python -m shards",
        description="Write image datasets (ImageNet-22K, image trees, the demo set) as WebDataset shards, verify them, time the loader.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    write = commands.add_parser(
        "write",
        help="write a source as shards",
        description=(
            "Write SOURCE as {prefix}-000000.tar ... plus info.json and classes.txt under OUT_URL. "
            "SOURCE is an image tree (root/<class>/<image>), the ImageNet-22K fall11 layout (a directory "
            "or one outer tar of nXXXXXXXX.tar files), or demo / demo:val. `write LAYOUT ROOT OUT` writes a "
            "dataset layout's splits instead (speechcommands: OUT/{training,validation,testing}; kinetics, the "
            "train.csv/val.csv list layout: OUT/{train,val}; clips and videos kept byte for byte). Re-running the same command keeps complete shards and rewrites the rest."
        ),
    )
    write.add_argument("source", metavar="SOURCE", help="local/fsspec directory, outer .tar, demo / demo:val (generated "
                       "digits), or photos (crops of scikit-image's photographs, for benchmarks)")
    write.add_argument("out_url", metavar="OUT_URL", help="target directory: a path or fsspec URL (s3://, gs://, file://); "
                       "after a LAYOUT name: the layout's ROOT folder")
    write.add_argument("root_out", metavar="OUT", nargs="?", help="after LAYOUT ROOT: the target directory")
    write.add_argument("--samples-per-shard", type=_positive_int, default=1000, metavar="N", help="samples per shard (default 1000)")
    write.add_argument("--shard-bytes", type=_positive_int, metavar="B", help="also cut a shard before it exceeds this many source bytes")
    write.add_argument("--max-side", type=_positive_int, help="downscale images whose longer side exceeds PX pixels", metavar="PX")
    write.add_argument("--workers", type=_positive_int, default=os.cpu_count() or 1, metavar="N", help="writer processes (default: all CPUs)")
    write.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the sample shuffle across shards (default 0)")
    write.add_argument("--prefix", default="shard", help="shard name prefix (default 'shard')")
    write.add_argument(
        "--classes", default="auto", metavar="MAP",
        help=f"class map: {', '.join(CLASS_MAPS)} or a URL of a class list (default auto: ImageNet-22K ids for fall11 layouts, else folder names)",
    )
    write.add_argument("--jpeg-quality", type=_positive_int, default=95, metavar="Q", help="quality of re-encoded JPEGs (default 95)")
    write.add_argument("--num-samples", type=_positive_int, metavar="N", help="demo and photos: number of generated "
                       "samples (default 2000 demo train, 500 demo val, 1500 photos)")
    write.add_argument("--image-size", type=_positive_int, metavar="PX", help="demo only: image side in pixels (default 32)")
    write.set_defaults(run=cmd_write)

    verify = commands.add_parser(
        "verify", help="check shards against info.json",
        description="Open every shard, decode every image (or a --sample fraction), compare counts with info.json; exit 1 on any problem.",
    )
    verify.add_argument("url", metavar="URL", help="dataset directory (holding info.json) or an info.json URL")
    verify.add_argument("--sample", type=_fraction, default=1.0, metavar="FRACTION", help="fraction of images to decode, chosen by key (default 1)")
    verify.add_argument("--workers", type=_positive_int, default=os.cpu_count() or 1, metavar="N", help="processes (default: all CPUs)")
    verify.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the --sample selection")
    verify.set_defaults(run=cmd_verify)

    bench = commands.add_parser(
        "bench", help="time decode + augment",
        description="Time the train pipeline (read, decode, augment, batch) in one process and with --workers workers, to size num_workers.",
    )
    bench.add_argument("url", metavar="URL", help="dataset directory, shard pattern or list (as for build_train_loader)")
    bench.add_argument("--img-size", type=_positive_int, default=224, metavar="PX", help="train resolution (default 224)")
    bench.add_argument("--batch-size", type=_positive_int, default=32, metavar="N", help="batch size (default 32)")
    bench.add_argument("--workers", type=_positive_int, default=2, metavar="N", help="DataLoader workers for the total figure (default 2)")
    bench.add_argument("--batches", type=_positive_int, default=30, metavar="N", help="batches timed (default 30)")
    bench.add_argument("--no-augment", action="store_true", help="decode and random-resized-crop only (no RandAugment, no erasing)")
    bench.add_argument("--target", type=float, metavar="IMG_PER_S", help="images/s one rank consumes; prints the num_workers that feed it")
    bench.add_argument("--compare", metavar="READERS", help="also time these readers on the same shards and "
                       "augmentation, in images per CPU-second (fresh process per trial, rounds interleaved, "
                       "medians): timm (timm's WebDataset reader), webdataset (a plain webdataset pipeline); "
                       "--workers is then the worker count of every reader")
    bench.add_argument("--mixup", action="store_true", help="--compare: timm's Mixup/CutMix (0.8/1.0, label smoothing "
                       "0.1) on every reader's batches, in the training process")
    bench.add_argument("--rounds", type=_positive_int, default=3, metavar="N", help="--compare: rounds (default 3)")
    bench.add_argument("--json", metavar="FILE", help="--compare: also write the report (with every trial) as JSON")
    bench.set_defaults(run=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return args.run(args)
