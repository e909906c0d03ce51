"""The authors' audio features (AST's, ``Audio/src/dataloader.py``) in plain torch: Kaldi-compatible log-mel
filterbanks, padding to a fixed number of frames, normalization, SpecAugment masks, noise and time roll.

:func:`fbank` reproduces ``torchaudio.compliance.kaldi.fbank(htk_compat=True, use_energy=False,
window_type='hanning', num_mel_bins=N, dither=0.0, frame_shift=10)`` at 16 kHz without torchaudio: 25 ms
frames every 10 ms that fit in the clip (``snip_edges``), per-frame DC removal, pre-emphasis 0.97 (the first
sample against itself), a symmetric Hann window, zero padding to 512 points, the power spectrum, ``N``
triangular filters on the HTK mel scale ``1127 ln(1 + f / 700)`` from 20 Hz to the Nyquist frequency, and the
natural log floored at ``FLT_EPSILON``. It works in float64 inside and returns float32.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

__all__ = ["FRAME_LENGTH", "FRAME_SHIFT", "LOG_FLOOR", "SAMPLE_RATE", "apply_masks", "apply_noise_and_roll",
           "draw_masks", "draw_noise", "fbank", "mel_banks", "normalize", "noise_and_roll", "pad_or_cut",
           "spec_augment"]

SAMPLE_RATE = 16_000
"""Every clip is resampled to this rate before its features are computed."""
FRAME_LENGTH = 400
"""25 ms at 16 kHz."""
FRAME_SHIFT = 160
"""10 ms at 16 kHz."""
FFT_SIZE = 512
"""The frame length rounded up to a power of two."""
LOW_FREQ = 20.0
"""Kaldi's default lowest filter edge (Hz)."""
PREEMPHASIS = 0.97
LOG_FLOOR = math.log(torch.finfo(torch.float32).eps)
"""``ln(FLT_EPSILON)`` = -15.9424: Kaldi's floor before the log (an empty filter gives exactly this)."""


def _mel(freq: torch.Tensor | float) -> torch.Tensor | float:
    if isinstance(freq, torch.Tensor):
        return 1127.0 * torch.log1p(freq / 700.0)
    return 1127.0 * math.log1p(freq / 700.0)


@lru_cache(maxsize=8)
def mel_banks(num_bins: int, sample_rate: int = SAMPLE_RATE, fft_size: int = FFT_SIZE,
              low_freq: float = LOW_FREQ) -> torch.Tensor:
    """Kaldi's triangular filters (``num_bins``, ``fft_size // 2 + 1``) in float64: equally spaced on the mel
    scale between ``low_freq`` and the Nyquist frequency, evaluated at the mel value of each FFT bin centre;
    the Nyquist bin gets no weight (Kaldi's filters span the first ``fft_size // 2`` bins)."""
    nyquist = sample_rate / 2
    mel_low, mel_high = _mel(low_freq), _mel(nyquist)
    delta = (mel_high - mel_low) / (num_bins + 1)
    edges = mel_low + delta * torch.arange(num_bins + 2, dtype=torch.float64)
    left, centre, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    bins = _mel(sample_rate / fft_size * torch.arange(fft_size // 2, dtype=torch.float64))[None]
    up = (bins - left) / (centre - left)
    down = (right - bins) / (right - centre)
    weights = torch.clamp(torch.minimum(up, down), min=0.0)
    return torch.nn.functional.pad(weights, (0, 1))


def fbank(waveform: torch.Tensor, num_mel_bins: int = 128) -> torch.Tensor:
    """Log-mel filterbank energies of 16 kHz ``waveform`` (``(samples,)`` or ``(batch, samples)``, at least one
    25 ms frame long) -> ``(frames, num_mel_bins)`` or ``(batch, frames, num_mel_bins)`` float32, ``frames =
    1 + (samples - 400) // 160`` (98 for one second)."""
    single = waveform.dim() == 1
    signal = waveform.to(torch.float64).reshape(-1, waveform.shape[-1])
    if signal.shape[-1] < FRAME_LENGTH:
        raise ValueError(f"a clip of {signal.shape[-1]} samples is shorter than one {FRAME_LENGTH}-sample frame")
    frames = signal.unfold(-1, FRAME_LENGTH, FRAME_SHIFT)  # (batch, frames, 400)
    frames = frames - frames.mean(dim=-1, keepdim=True)
    previous = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)
    frames = frames - PREEMPHASIS * previous
    window = torch.hann_window(FRAME_LENGTH, periodic=False, dtype=torch.float64, device=frames.device)
    spectrum = torch.view_as_real(torch.fft.rfft(frames * window, n=FFT_SIZE)).pow(2).sum(-1)  # |X|^2, (batch, frames, 257)
    banks = mel_banks(num_mel_bins).to(frames.device)
    energies = spectrum @ banks.T
    out = torch.log(torch.clamp(energies, min=torch.finfo(torch.float32).eps)).to(torch.float32)
    return out[0] if single else out


def pad_or_cut(features: torch.Tensor, frames: int) -> torch.Tensor:
    """``(T, F)`` log-mel -> ``(frames, F)``: zero rows appended after the log, or the first ``frames`` kept (AST)."""
    missing = frames - features.shape[0]
    if missing > 0:
        return torch.nn.functional.pad(features, (0, 0, 0, missing))
    return features[:frames]


def normalize(features: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """AST's dataset normalization ``(x - mean) / (2 std)`` (Speech Commands: mean -6.845978, std 5.5654526)."""
    return (features - mean) / (2 * std)


def _mask_bounds(rng: np.random.Generator, size: int, max_width: int) -> tuple[int, int]:
    """torchaudio's ``mask_along_axis``: width ``U[0, max_width)``, start ``U[0, size - width)``, both floored."""
    width = rng.random() * max_width
    start = rng.random() * (size - width)
    return int(start), int(start) + int(width)


def draw_masks(rng: np.random.Generator, frames: int, mel: int, freq_mask: int, time_mask: int) -> tuple[int, ...]:
    """SpecAugment's draws for one ``(frames, mel)`` map: ``(freq_start, freq_end, time_start, time_end)``, the
    frequency mask drawn first (AST's order); a width of 0 turns a mask off (start = end = 0, nothing drawn)."""
    freq = _mask_bounds(rng, mel, freq_mask) if freq_mask else (0, 0)
    time = _mask_bounds(rng, frames, time_mask) if time_mask else (0, 0)
    return (*freq, *time)


def apply_masks(features: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """Zero each ``(B, T, F)`` map's frequency bins ``[bounds[b, 0], bounds[b, 1])`` and frames ``[bounds[b, 2],
    bounds[b, 3])`` (``bounds``: (B, 4) integers from :func:`draw_masks`); out of place, in one batched pass."""
    bounds = bounds.to(features.device)
    times = torch.arange(features.shape[-2], device=features.device)[None, :, None]
    freqs = torch.arange(features.shape[-1], device=features.device)[None, None, :]
    b = bounds[:, :, None, None]
    masked = (((freqs >= b[:, 0]) & (freqs < b[:, 1])) | ((times >= b[:, 2]) & (times < b[:, 3])))
    return features.masked_fill(masked, 0.0)


def spec_augment(features: torch.Tensor, rng: np.random.Generator, freq_mask: int, time_mask: int) -> torch.Tensor:
    """One frequency mask then one time mask (value 0) on a ``(T, F)`` log-mel, widths below ``freq_mask`` and
    ``time_mask`` (AST applies torchaudio's ``FrequencyMasking(48)`` and ``TimeMasking(48)``); 0 turns one off."""
    bounds = draw_masks(rng, features.shape[0], features.shape[1], freq_mask, time_mask)
    return apply_masks(features[None], torch.tensor([bounds]))[0]


def draw_noise(rng: np.random.Generator, frames: int, mel: int, roll: int) -> tuple[float, np.ndarray, int]:
    """AST's ``noise`` draws for one ``(frames, mel)`` map: the scale ``U[0, 1) / 10``, the ``U[0, 1)`` float32
    noise and the roll in ``[-roll, roll)`` frames (0 without ``roll``), in that order."""
    scale = rng.random() / 10
    noise = rng.random((frames, mel), dtype=np.float32)
    return scale, noise, int(rng.integers(-roll, roll)) if roll else 0


def apply_noise_and_roll(features: torch.Tensor, scale: torch.Tensor, noise: torch.Tensor,
                         shift: torch.Tensor) -> torch.Tensor:
    """``(B, T, F)`` maps + ``noise * scale`` per map, then each rolled by its ``shift`` frames (``torch.roll``'s
    direction), batched: ``scale`` (B,), ``noise`` (B, T, F), ``shift`` (B,) integers."""
    noisy = features + noise.to(features.device) * scale.to(features.device, features.dtype)[:, None, None]
    frames = features.shape[-2]
    source = (torch.arange(frames, device=features.device)[None] - shift.to(features.device)[:, None]) % frames
    return torch.gather(noisy, -2, source[:, :, None].expand(-1, -1, features.shape[-1]))


def noise_and_roll(features: torch.Tensor, rng: np.random.Generator, roll: int) -> torch.Tensor:
    """AST's ``noise``: add ``U[0, 1) * (U[0, 1) / 10)`` per element, then roll the frames by an integer in
    ``[-roll, roll)``."""
    scale, noise, shift = draw_noise(rng, features.shape[0], features.shape[1], roll)
    return apply_noise_and_roll(features[None], torch.tensor([scale]), torch.from_numpy(noise)[None],
                                torch.tensor([shift]))[0]
