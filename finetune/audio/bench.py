"""Loader cost of the audio task: training clips per CPU-second (mixup, SpecAugment, noise, roll) of this task's
sample pipeline (``audio.features_on=loader``: a worker makes the whole map; ``device``: a worker reads, mixes
and draws, the batched features run on the training device, timed here on this CPU too) and of an AST-style
reference on the same files, one process each.

    python -m finetune.audio.bench ROOT [--clips 300] [--mel 128] [--frames 128]

The reference does per clip what the authors' (AST's) ``dataloader.py`` does: read both clips, mix the
waveforms, ``torchaudio.compliance.kaldi.fbank``, ``FrequencyMasking``/``TimeMasking``, normalize, noise, roll;
it needs torchaudio (a test-only dependency: ``pip install --no-deps torchaudio==2.11.1``) and is skipped
without it. Figures, not a test: they depend on the machine.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np
import torch

from .config import AudioConfig
from .data import TrainSamples, _collate_train, list_split, read_clip

__all__ = ["ast_style_sample", "clips_per_cpu_second", "main"]


def ast_style_sample(files, index: int, rng: np.random.Generator, config: AudioConfig):
    """One training sample the AST way (global RNG draws replaced by ``rng``), from the split's files."""
    import torchaudio

    def load(i: int) -> torch.Tensor:
        with open(f"{files.root}/{files.clips[i][0]}", "rb") as f:
            clip = torch.from_numpy(read_clip(f.read(), files.clips[i][0]))[None]
        return clip - clip.mean()

    waveform = load(index)
    if rng.random() < config.mixup:
        other = load(int(rng.integers(len(files))))
        other = torch.nn.functional.pad(other, (0, max(0, waveform.shape[1] - other.shape[1])))[:, :waveform.shape[1]]
        weight = float(rng.beta(config.mixup_alpha, config.mixup_alpha))
        waveform = weight * waveform + (1 - weight) * other
        waveform = waveform - waveform.mean()
    fbank = torchaudio.compliance.kaldi.fbank(waveform, htk_compat=True, sample_frequency=16000, use_energy=False,
                                              window_type="hanning", num_mel_bins=config.num_mel_bins, dither=0.0,
                                              frame_shift=10)
    fbank = torch.nn.functional.pad(fbank, (0, 0, 0, max(0, config.target_length - fbank.shape[0])))
    fbank = fbank[:config.target_length].T[None]
    fbank = torchaudio.transforms.TimeMasking(config.time_mask)(
        torchaudio.transforms.FrequencyMasking(config.freq_mask)(fbank))[0].T
    fbank = (fbank - config.norm_mean) / (2 * config.norm_std)
    fbank = fbank + torch.rand(fbank.shape) * float(rng.random()) / 10
    return torch.roll(fbank, int(rng.integers(-config.roll, config.roll)), 0)


def clips_per_cpu_second(make, clips: int, warmup: int = 10) -> float:
    """``clips / CPU seconds`` of ``make(i)`` for ``i`` in range(clips), after ``warmup`` calls."""
    for i in range(warmup):
        make(i)
    start = time.process_time()
    for i in range(clips):
        make(i)
    return clips / (time.process_time() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune.audio.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="a Speech Commands layout (e.g. python -m finetune make-demo-data audio OUT)")
    parser.add_argument("--clips", type=int, default=300)
    parser.add_argument("--mel", type=int, default=128)
    parser.add_argument("--frames", type=int, default=128)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    files = list_split(args.root, "training")
    config = AudioConfig(data_root=args.root, num_classes=len(files.classes), num_mel_bins=args.mel,
                         target_length=args.frames)
    samples = TrainSamples(files, config, seed=0)
    ours = clips_per_cpu_second(lambda i: samples[(1, i % len(files))], args.clips)
    print(f"this task's loader, features in the workers: {ours:.0f} clips per CPU-second ({args.mel} x {args.frames}, "
          f"mixup {config.mixup})")
    on_device = replace(config, features_on="device")
    workers = TrainSamples(files, on_device, seed=0)
    lean = clips_per_cpu_second(lambda i: workers[(1, i % len(files))], args.clips)
    batch = _collate_train([workers[(1, i % len(files))] for i in range(64)])[0]
    batched = 64 * clips_per_cpu_second(lambda i: batch.model_input(on_device, torch.device("cpu")), 5, warmup=1)
    print(f"this task's loader, features on the device: {lean:.0f} clips per CPU-second in the workers "
          f"({lean / ours:.2f}x); the batched features, here on the CPU: {batched:.0f} clips per CPU-second")
    try:
        import torchaudio  # noqa: F401
    except ImportError:
        print("AST-style reference skipped: torchaudio is not installed")
        return 0
    rng = np.random.default_rng(0)
    reference = clips_per_cpu_second(lambda i: ast_style_sample(files, i % len(files), rng, config), args.clips)
    print(f"AST-style reference: {reference:.0f} clips per CPU-second; ratio {ours / reference:.2f} (features in the "
          f"workers), {lean / reference:.2f} (on the device)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
