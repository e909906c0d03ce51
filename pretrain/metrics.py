"""Logging setup, TensorBoard scalars/images, throughput and data-wait accounting, memory, progress."""
from __future__ import annotations

import logging
import os
import resource
import sys
import time

import torch

__all__ = ["Progress", "TensorBoard", "Throughput", "close_run_log", "init_logging", "memory_stats"]

_logger = logging.getLogger(__name__)


def init_logging(rank: int, log_file: str | None = None) -> None:
    """Rank-prefixed log lines on stderr (INFO on rank 0, WARNING elsewhere), and a log file on rank 0 (the
    latest run's only, when one process runs several)."""
    root = logging.getLogger()
    formatter = logging.Formatter(f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    if not any(getattr(h, "_pretrain", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler._pretrain = True
        root.addHandler(handler)
    for handler in root.handlers:
        if getattr(handler, "_pretrain", False):
            handler.setFormatter(formatter)
            handler.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    root.setLevel(logging.INFO)
    if log_file and rank == 0 and not any(getattr(h, "baseFilename", None) == os.path.abspath(log_file)
                                          for h in root.handlers):
        for earlier in [h for h in root.handlers if getattr(h, "_pretrain_run_log", False)]:
            root.removeHandler(earlier)  # one run's log per process: a later run does not write into an earlier's
            earlier.close()
        os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
        file_handler = logging.FileHandler(log_file)
        file_handler._pretrain_run_log = True
        file_handler.setFormatter(formatter)
        root.addHandler(file_handler)
    for noisy in ("DeepSpeed", "deepspeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def close_run_log() -> None:
    """Stop writing this process's log to the run's log file (a run is over; later lines are not its)."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_pretrain_run_log", False)]:
        root.removeHandler(handler)
        handler.close()


def memory_stats(device: torch.device) -> dict[str, float]:
    """Resident CPU memory now and at peak, and peak GPU memory allocated since the last reset, in GiB."""
    stats = {"cpu_peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    try:
        with open("/proc/self/statm") as f:
            stats["cpu_rss_gib"] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except OSError:
        pass
    if device.type == "cuda":
        stats["gpu_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        stats["gpu_reserved_gib"] = torch.cuda.memory_reserved(device) / 2**30
    return stats


class Throughput:
    """Samples, wall time and time spent waiting for data over one logging interval."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.samples = 0
        self.data_wait = 0.0
        self.steps = 0

    def summary(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return {
            "samples_per_s": self.samples / elapsed,
            "data_wait_fraction": self.data_wait / elapsed,
            "step_time_s": elapsed / max(self.steps, 1),
            "elapsed_s": elapsed,
        }


class TensorBoard:
    """A SummaryWriter under ``RUN_DIR/tensorboard`` on rank 0; every call is a no-op on other ranks."""

    def __init__(self, log_dir: str, enabled: bool):
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=log_dir)

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)

    def image_grid(self, tag: str, images: torch.Tensor, step: int) -> None:
        """``images`` in [0, 1], (N, 3, H, W): shown as one grid."""
        if self.writer is not None:
            from torchvision.utils import make_grid

            self.writer.add_image(tag, make_grid(images, nrow=min(8, len(images)), padding=2), step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class Progress:
    """A tqdm bar with ETA on rank 0 when stderr is a terminal; otherwise plain log lines."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.total = total
        self.bar = None
        self.start_time, self.start_step = time.perf_counter(), initial
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, dynamic_ncols=True, unit="step")
        self.log_lines = enabled and self.bar is None

    def eta_seconds(self, step: int) -> float:
        done = step - self.start_step
        if done <= 0:
            return float("nan")
        return (time.perf_counter() - self.start_time) / done * (self.total - step)

    def update(self, step: int, values: dict[str, float], log: bool) -> None:
        """Advance to ``step``; on a log step show ``values`` (bar postfix or one log line)."""
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            if log:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()}, refresh=False)
        elif self.log_lines and log:
            eta = self.eta_seconds(step)
            eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta == eta else "?"
            fields = " | ".join(f"{k} {v:.4g}" for k, v in values.items())
            _logger.info("step %d/%d | %s | eta %s", step, self.total, fields, eta_text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
