"""Command line: ``python -m unireplknet {reparam,export-onnx,info,demo,bench} ...``; ``--help`` on each for details."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import timm
import torch

from . import model as _model  # noqa: F401  (registers the timm models)
from .checkpoint import CheckpointMismatchError, export_official, load_official, read_state_dict
from .tools import atomic_save, measure_throughput, model_stats, randomize_statistics, verify_reparameterization

MODEL_NAMES = [f"unireplknet_{v}" for v in _model.VARIANTS]


def _model_name(value: str) -> str:
    if value not in MODEL_NAMES:
        raise argparse.ArgumentTypeError(f"unknown model {value!r}; choose from {', '.join(MODEL_NAMES)}")
    return value


def _load_classifier(path: str, model_name: str):
    """(model, structure) of a UniRepLKNet classifier file, in the training or the inference structure."""
    state_dict = read_state_dict(path)
    stem = state_dict.get("downsample_layers.0.0.weight")
    if stem is None or stem.dim() != 4:
        first = ", ".join(list(state_dict)[:4]) or "none"
        raise CheckpointMismatchError(f"{path} is not a UniRepLKNet checkpoint: no stem convolution "
                                      f"'downsample_layers.0.0.weight' (its first keys: {first})")
    head = state_dict.get("head.weight")
    training = any(k.endswith(("origin_bn.running_var", "pwconv2.2.running_var")) for k in state_dict)
    model = timm.create_model(model_name, num_classes=head.shape[0] if head is not None else 0,
                              in_chans=stem.shape[1], deploy=not training)
    try:
        load_official(model, state_dict)
    except CheckpointMismatchError as error:
        raise CheckpointMismatchError(f"{path} does not fit {model_name}: {error}") from None
    return model, "training" if training else "inference"


def cmd_reparam(args: argparse.Namespace) -> int:
    """Convert a training-structure checkpoint to the inference structure, verify, then write it."""
    try:
        model, structure = _load_classifier(args.input, args.model)
    except (FileNotFoundError, CheckpointMismatchError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if structure == "inference":
        print(f"error: {args.input} is already in the inference structure: nothing to convert", file=sys.stderr)
        return 2
    num_classes, in_chans = model.num_classes, model.in_chans
    print(f"loaded {args.input} into {args.model} (training structure, {num_classes} classes, {in_chans} input channels)")
    start = time.perf_counter()
    deployed, error = verify_reparameterization(model, args.img_size, args.batch_size, dtype=torch.float64)
    print(f"re-parameterized and checked on a random batch of {args.batch_size} at {args.img_size}px in float64: "
          f"max|logit diff| / max|logit| = {error:.3e} ({time.perf_counter() - start:.1f}s)")
    if error > args.tolerance:
        print(f"error: difference {error:.3e} exceeds --tolerance {args.tolerance:.1e}; nothing written", file=sys.stderr)
        return 1
    atomic_save(export_official(deployed.float(), inference_keys=args.keys), args.output)
    print(f"wrote {args.output} ({sum(p.numel() for p in deployed.parameters()):,} parameters, inference structure)")
    return 0


def cmd_export_onnx(args: argparse.Namespace) -> int:
    """Write a classifier as ONNX in the inference structure, with a dynamic batch, and check the file in
    onnxruntime (CPU) against torch; nothing is kept when they differ by more than --tolerance."""
    from .onnx_export import _require, check_onnx, export_onnx

    try:
        _require("onnx", "onnxscript", "onnxruntime")
        model, structure = _load_classifier(args.input, args.model)
    except (FileNotFoundError, CheckpointMismatchError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    model.eval()
    if structure == "training":
        model, error = verify_reparameterization(model, args.img_size, 2, dtype=torch.float64)
        print(f"re-parameterized {args.input}: max|logit diff| / max|logit| = {error:.3e} (float64)")
        if error > 1e-6:
            print(f"error: re-parameterization changed the outputs by {error:.3e}; nothing written", file=sys.stderr)
            return 1
    model = model.float().eval()
    generator = torch.Generator().manual_seed(0)
    shape = (model.in_chans, args.img_size, args.img_size)
    exported = export_onnx(model, torch.randn(1, *shape, generator=generator), args.output)
    error = check_onnx(exported, model, [torch.randn(batch, *shape, generator=generator) for batch in (1, 3)])
    print(f"onnxruntime vs torch at batch 1 and 3, {args.img_size}px: max|diff| / max|logit| = {error:.3e}")
    if error > args.tolerance:
        os.remove(args.output)
        print(f"error: difference {error:.3e} exceeds --tolerance {args.tolerance:.1e}; {args.output} removed",
              file=sys.stderr)
        return 1
    print(f"wrote {args.output} (input 'images' N x {shape[0]} x {args.img_size} x {args.img_size}, any N; "
          "output 'logits'); TensorRT: trtexec --onnx=" + args.output)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """Print parameters, FLOPs and forward memory for one model and input size."""
    def build(deploy: bool):
        return timm.create_model(args.model, num_classes=args.num_classes, in_chans=args.in_chans, deploy=deploy)

    stats = model_stats(build, args.img_size, args.in_chans)
    print(f"model                      {args.model} ({args.num_classes} classes, {args.in_chans}x{args.img_size}x{args.img_size})")
    print(f"parameters (training)      {stats.params:,}")
    print(f"parameters (inference)     {stats.inference_params:,}")
    print(f"forward GMACs / image      {stats.gflops / 2:.2f} (inference structure; the papers' 'FLOPs')")
    print(f"forward GFLOPs / image     {stats.gflops:.2f} (multiply-add = 2 FLOPs)")
    print(f"weights fp32               {stats.param_mib:,.1f} MiB")
    print(f"activations for backward   {stats.activation_mib:,.1f} MiB / image (training structure, fp32, "
          f"no activation checkpointing)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Build a model, re-parameterize it, verify equivalence and time both structures on this machine."""
    torch.manual_seed(args.seed)
    model = timm.create_model(args.model, num_classes=1000)
    randomize_statistics(model, torch.Generator().manual_seed(args.seed))
    print(f"built {args.model}: {sum(p.numel() for p in model.parameters()):,} parameters (training structure)")
    deployed, error = verify_reparameterization(model, args.img_size, batch_size=2, dtype=torch.float64)
    print(f"re-parameterized: {sum(p.numel() for p in deployed.parameters()):,} parameters; "
          f"max|logit diff| / max|logit| in float64 = {error:.2e}")
    batch = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    model.eval()
    deployed.float().eval()
    train_ips = measure_throughput(model, batch)
    infer_ips = measure_throughput(deployed, batch)
    device = "CPU" if not torch.cuda.is_available() else torch.cuda.get_device_name()
    print(f"throughput on {device} ({torch.get_num_threads()} threads), batch {args.batch_size} at {args.img_size}px, fp32:")
    print(f"  training structure (eval)  {train_ips:8.1f} img/s")
    print(f"  inference structure        {infer_ips:8.1f} img/s  ({infer_ips / train_ips:.2f}x)")
    return 0 if error < 1e-8 else 1


def cmd_bench(args: argparse.Namespace) -> int:
    """Time several models in one process on the same device and print a table (ratios to the first)."""
    from .bench import BenchConfig, format_table, run_bench, write_json

    config = BenchConfig(
        mode=args.mode, img_size=args.img_size, batch_size=args.batch_size, dtype=args.dtype, deploy=args.deploy,
        channels_last=args.channels_last, compile=args.compile or args.compile_mode is not None,
        compile_mode=args.compile_mode or "default", warmup=args.warmup, steps=args.steps,
        repeats=args.repeats, device=args.device or BenchConfig.device)
    results = run_bench([name.strip() for name in args.models.split(",") if name.strip()], config)
    print(format_table(results, config))
    if args.json:
        write_json(results, config, args.json)
        print(f"wrote {args.json}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m unireplknet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("reparam", help="convert a training-structure checkpoint to the inference structure",
                       description=cmd_reparam.__doc__ + " The output uses the official key layout.")
    p.add_argument("input", help="training-structure checkpoint (.pth, bare or {'model': ...})")
    p.add_argument("output", help="where to write the inference-structure state dict")
    p.add_argument("--model", type=_model_name, required=True, help="architecture, e.g. unireplknet_xl")
    p.add_argument("--img-size", type=int, default=64, help="input size of the verification batch (default 64)")
    p.add_argument("--batch-size", type=int, default=2, help="verification batch size (default 2)")
    p.add_argument("--tolerance", type=float, default=1e-6,
                   help="largest accepted max|logit diff|/max|logit| in float64 (default 1e-6)")
    p.add_argument("--keys", choices=("deploy", "flat"), default="deploy",
                   help="large-kernel (kernel >= 7) key names: 'deploy' (dwconv.lk_origin.weight/bias, what the "
                        "authors' deploy=True constructor loads; default) or 'flat' (dwconv.weight/bias)")
    p.set_defaults(func=cmd_reparam)

    p = sub.add_parser("export-onnx", help="a classifier as ONNX (inference structure), checked with onnxruntime",
                       description=cmd_export_onnx.__doc__ + " The input may be in the training or the inference "
                       "structure (the authors' released files, `reparam` and `pretrain export` outputs).")
    p.add_argument("input", help="classifier checkpoint (.pth)")
    p.add_argument("output", help="the .onnx file to write")
    p.add_argument("--model", type=_model_name, required=True, help="architecture, e.g. unireplknet_xl")
    p.add_argument("--img-size", type=int, default=224, help="the example's size (default 224; 384 for the "
                   "22K->1K 384 files); the check runs at it")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="largest accepted max|onnx - torch| / max|torch| in float32 (default 1e-4)")
    p.set_defaults(func=cmd_export_onnx)

    p = sub.add_parser("info", help="parameters, FLOPs and forward memory of a model",
                       description=cmd_info.__doc__ + " Measured on the meta device: nothing is allocated.")
    p.add_argument("--model", type=_model_name, required=True)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--in-chans", type=int, default=3)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("demo", help="build, re-parameterize, verify and time a model on this machine",
                       description=cmd_demo.__doc__)
    p.add_argument("--model", type=_model_name, default="unireplknet_a")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "bench", help="time models side by side (img/s, ms/step, peak memory)",
        description=cmd_bench.__doc__ + " A UniRepLKNet name may end in ':reference' (torch conv2d for every "
        "branch: the authors' plain PyTorch path), ':fast' (this package's kernels, the default) or ':fused' "
        "(fast kernels plus the fused multi-branch training block). Other names are timm models, e.g. "
        "convnext_tiny.")
    p.add_argument("--models", default="unireplknet_t:reference,unireplknet_t,convnext_tiny",
                   help="comma-separated model names (default: %(default)s)")
    p.add_argument("--mode", choices=("train", "infer"), default="infer")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="bf16",
                   help="autocast precision (default bf16; fp32 disables autocast)")
    p.add_argument("--deploy", action="store_true", help="re-parameterized UniRepLKNet (inference structure)")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    p.add_argument("--compile", action="store_true", help="torch.compile each model")
    p.add_argument("--compile-mode", choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
                   help="torch.compile mode (implies --compile); reduce-overhead replays CUDA graphs")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per repeat (default 20)")
    p.add_argument("--repeats", type=int, default=3, help="repeats; the median is reported (default 3)")
    p.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda if available)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
