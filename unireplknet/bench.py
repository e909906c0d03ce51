"""Side-by-side speed of several models in one process on one device.

``python -m unireplknet bench --models unireplknet_t:reference,unireplknet_t,convnext_tiny --mode train``

A model name is any timm name. A UniRepLKNet name may carry an implementation suffix:
``:reference`` builds it with torch's ``conv2d`` for every branch (the authors' plain PyTorch
path, the baseline of the speed targets); without a suffix (or ``:fast``) the depthwise convs use
this package's selection (:func:`unireplknet.model.make_depthwise_conv`); ``:fused`` adds the
fused training structure of the Dilated Reparam Block (``fused_branches=True``).
"""
from __future__ import annotations

import contextlib
import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass

import timm
import torch
import torch.nn as nn

from .model import depthwise_conv_implementation

__all__ = ["BenchConfig", "BenchResult", "build_bench_model", "bench_model", "run_bench", "format_table"]

_logger = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class BenchConfig:
    """What to time: mode, input, precision and the optional speed switches."""

    mode: str = "infer"
    img_size: int = 224
    batch_size: int = 128
    dtype: str = "bf16"
    deploy: bool = False
    channels_last: bool = False
    compile: bool = False
    compile_mode: str = "default"
    """``torch.compile`` mode; ``reduce-overhead`` replays CUDA graphs (inference at small batch)."""
    warmup: int = 5
    steps: int = 20
    repeats: int = 3
    device: str = "cuda" if torch.cuda.is_available() else "cpu"

    def __post_init__(self) -> None:
        if self.mode not in ("train", "infer"):
            raise ValueError(f"mode must be 'train' or 'infer', got {self.mode!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.compile_mode not in _COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {_COMPILE_MODES}, got {self.compile_mode!r}")
        if min(self.img_size, self.batch_size, self.steps, self.repeats) < 1:
            raise ValueError("img_size, batch_size, steps and repeats must be positive")


@dataclass
class BenchResult:
    """One model's figures."""

    model: str
    images_per_second: float
    ms_per_step: float
    peak_memory_gib: float | None
    params: int
    ratio_to_first: float = 1.0


def build_bench_model(name: str, config: BenchConfig) -> nn.Module:
    """Build ``name`` (with an optional ``:reference`` / ``:fast`` / ``:fused`` suffix) as the bench will run it."""
    base, _, impl = name.partition(":")
    impl = impl or "fast"
    if impl not in ("fast", "fused", "reference"):
        raise ValueError(f"{name}: implementation suffix must be ':fast', ':fused' or ':reference'")
    kwargs = {"deploy": True} if config.deploy and base.startswith("unireplknet") else {}
    if impl == "fused" and not kwargs:
        kwargs["fused_branches"] = True
    context = depthwise_conv_implementation("torch") if impl == "reference" else contextlib.nullcontext()
    with context:
        model = timm.create_model(base, num_classes=1000, **kwargs)
    if config.deploy and base.startswith("unireplknet") and not kwargs:
        model.reparameterize()
    model = model.to(config.device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.train(config.mode == "train")


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_model(name: str, config: BenchConfig) -> BenchResult:
    """Time one model: warm-up, then the median over ``repeats`` of ``steps`` synchronized steps."""
    device = config.device
    model = build_bench_model(name, config)
    params = sum(p.numel() for p in model.parameters())
    dtype = _DTYPES[config.dtype]
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    images = torch.randn(config.batch_size, 3, config.img_size, config.img_size, device=device)
    images = images.contiguous(memory_format=memory_format)
    targets = torch.randint(0, 1000, (config.batch_size,), device=device)
    autocast = torch.autocast(device_type=device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32)
    forward = torch.compile(model, mode=config.compile_mode) if config.compile else model

    if config.mode == "train":
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
        loss_fn = nn.CrossEntropyLoss()

        def step() -> None:
            with autocast:
                loss = loss_fn(forward(images), targets)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    else:
        @torch.inference_mode()
        def step() -> None:
            with autocast:
                forward(images)

    for _ in range(config.warmup):
        step()
    _synchronize(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    seconds = []
    for _ in range(config.repeats):
        _synchronize(device)
        start = time.perf_counter()
        for _ in range(config.steps):
            step()
        _synchronize(device)
        seconds.append((time.perf_counter() - start) / config.steps)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    step_time = statistics.median(seconds)
    del model, forward
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return BenchResult(name, config.batch_size / step_time, step_time * 1000, peak, params)


def run_bench(names: list[str], config: BenchConfig) -> list[BenchResult]:
    """Bench every model in this process on the same device; ratios are to the first model."""
    results = []
    for name in names:
        _logger.info("benchmarking %s (%s, batch %d at %d, %s)", name, config.mode, config.batch_size,
                     config.img_size, config.dtype)
        results.append(bench_model(name, config))
    for result in results:
        result.ratio_to_first = result.images_per_second / results[0].images_per_second
    return results


def environment() -> dict:
    """Versions and device, recorded with every result."""
    info = {"torch": torch.__version__, "timm": timm.__version__, "device": "cpu",
            "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info.update(device=torch.cuda.get_device_name(), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
    return info


def format_table(results: list[BenchResult], config: BenchConfig) -> str:
    """A Markdown table of the results, headed by the settings."""
    env = environment()
    lines = [
        f"{config.mode} | {env['device']} | torch {env['torch']} | batch {config.batch_size} at {config.img_size} | "
        f"{config.dtype}{' | channels_last' if config.channels_last else ''}{f' | compile ({config.compile_mode})' if config.compile else ''}"
        f"{' | deploy' if config.deploy else ''}",
        "",
        "| model | img/s | ms/step | peak GiB | ratio |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in results:
        peak = f"{r.peak_memory_gib:.1f}" if r.peak_memory_gib is not None else "n/a"
        lines.append(f"| {r.model} | {r.images_per_second:.1f} | {r.ms_per_step:.1f} | {peak} | {r.ratio_to_first:.2f} |")
    return "\n".join(lines)


def write_json(results: list[BenchResult], config: BenchConfig, path: str) -> None:
    """Write settings, environment and results as JSON."""
    with open(path, "w") as f:
        json.dump({"config": asdict(config), "environment": environment(),
                   "results": [asdict(r) for r in results]}, f, indent=2)
