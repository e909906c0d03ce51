"""A spoken-word demo set in the Speech Commands v0.02 layout, synthesized offline, learnable in CPU minutes.

The ten command words of Speech Commands are spoken by espeak-ng (Debian package ``espeak-ng``, run as a
subprocess with an argument list) in 16 voices (8 English accents x male/female variants), 3 speeds and 2
pitches, with a random gain and leading silence, resampled from 22,050 Hz to 16 kHz and written as mono PCM16
WAVs ``<word>/<voice-hash>_nohash_<k>.wav``. The split is by voice, as Speech Commands splits by speaker:
12 voices train, 2 validate, 2 test. ``_background_noise_/`` holds one noise file (not a class).

Where espeak-ng is absent, each word becomes a generated signal instead (a two-tone chirp pattern of its own,
shifted and stretched by the "voice"), so the layout, the split and the learnability hold without it.
File ``k`` of a voice and word depends only on (seed, voice, word, k).
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile

import numpy as np

from .data import to_mono_16k
from .features import SAMPLE_RATE

__all__ = ["ESPEAK", "VOICES", "WORDS", "write_demo"]

_logger = logging.getLogger(__name__)

WORDS: tuple[str, ...] = ("down", "go", "left", "no", "off", "on", "right", "stop", "up", "yes")
"""The ten command words of Speech Commands (class index = position, the sorted order)."""
_ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us-nyc", "en-gb-x-gbclan",
            "en-gb-x-gbcwmd")
VOICES: tuple[str, ...] = tuple(f"{accent}+{variant}" for accent in _ACCENTS for variant in ("m3", "f2"))
"""espeak-ng voices (accent + variant); the first 12 train, then 2 validate and 2 test."""
_SPLIT_OF_VOICE = {voice: "training" if i < 12 else "validation" if i < 14 else "testing"
                   for i, voice in enumerate(VOICES)}
SPEEDS = (130, 160, 190)
"""Words per minute."""
PITCHES = (35, 65)
"""espeak-ng pitch (0-99)."""
ESPEAK = "espeak-ng"
"""The synthesizer's command name (looked up on PATH)."""


def _voice_hash(voice: str) -> str:
    return hashlib.sha1(voice.encode()).hexdigest()[:8]


def _espeak(executable: str, word: str, voice: str, speed: int, pitch: int, scratch: str) -> np.ndarray:
    """The word as espeak-ng speaks it, mono 16 kHz float32 (at most 1 s)."""
    import soundfile

    path = os.path.join(scratch, "word.wav")
    subprocess.run([executable, "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", path, word], check=True,
                   capture_output=True, timeout=60)
    samples, rate = soundfile.read(path, dtype="float32", always_2d=True)
    return to_mono_16k(samples, rate)


def _generated(word: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    """A word's stand-in signal: two harmonic chirps whose frequencies are the word's own, scaled by the voice's
    pitch and stretched by its speed."""
    index, voice_index = WORDS.index(word) if word in WORDS else len(word), VOICES.index(voice) % 7
    duration = 0.45 * 160 / speed
    t = np.arange(int(duration * SAMPLE_RATE)) / SAMPLE_RATE
    scale = (1 + (pitch - 50) / 200) * (1 + 0.03 * voice_index)
    f0, f1 = 250 * scale * (1 + 0.35 * (index % 5)), 250 * scale * (1 + 0.35 * ((index * 3 + 1) % 5))
    half = len(t) // 2
    sweep = np.where(np.arange(len(t)) < half, f0 + (f1 - f0) * t / duration, f1 + (f0 - f1) * (t - t[half]) / duration)
    phase = 2 * np.pi * np.cumsum(sweep) / SAMPLE_RATE
    tone = sum(np.sin(k * phase) / k for k in (1, 2, 3))
    envelope = np.sin(np.pi * t / duration) ** 2 * (1 + 0.5 * (index >= 5) * np.sin(2 * np.pi * 6 * t))
    return (0.3 * tone * envelope).astype(np.float32)


def _place(word: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The word with a random gain after 0-150 ms of silence, in at most one second."""
    lead = int(rng.uniform(0, 0.15) * SAMPLE_RATE)
    peak = float(np.abs(word).max()) or 1.0
    clip = np.concatenate([np.zeros(lead, np.float32), word / peak * rng.uniform(0.3, 0.9)])[:SAMPLE_RATE]
    return clip + rng.normal(0, 0.002, len(clip)).astype(np.float32)


def write_demo(out: str, seed: int = 0, train_images: int | None = None, val_images: int | None = None,
               use_espeak: bool | None = None) -> dict[str, int]:
    """Write the demo set into ``out`` (see the module docstring); returns the clips per split. ``train_images``
    and ``val_images`` cap the training clips and the validation (and testing) clips per word (default: all, 36
    and 6); ``use_espeak`` None: espeak-ng when it is on PATH, else the generated signals."""
    import soundfile

    executable = shutil.which(ESPEAK)
    if use_espeak is None:
        use_espeak = executable is not None
    elif use_espeak and executable is None:
        raise FileNotFoundError(f"{ESPEAK} is not on PATH (make system-deps installs it)")
    if not use_espeak:
        _logger.warning("%s not found: the demo set holds generated chirps instead of spoken words", ESPEAK)
    combos = [(speed, pitch) for speed in SPEEDS for pitch in PITCHES]
    caps = {"training": train_images, "validation": val_images, "testing": val_images}
    counts = {"training": 0, "validation": 0, "testing": 0}
    lists: dict[str, list[str]] = {"validation": [], "testing": []}
    os.makedirs(out, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        for label, word in enumerate(WORDS):
            os.makedirs(os.path.join(out, word), exist_ok=True)
            per_split = {split: 0 for split in counts}
            for voice_index, voice in enumerate(VOICES):
                split = _SPLIT_OF_VOICE[voice]
                for k, (speed, pitch) in enumerate(combos):
                    if caps[split] is not None and per_split[split] >= caps[split]:
                        break
                    rng = np.random.default_rng([seed, voice_index, label, k])
                    spoken = (_espeak(executable, word, voice, speed, pitch, scratch) if use_espeak
                              else _generated(word, voice, speed, pitch))
                    name = f"{_voice_hash(voice)}_nohash_{k}.wav"
                    soundfile.write(os.path.join(out, word, name), _place(spoken, rng), SAMPLE_RATE, subtype="PCM_16")
                    per_split[split] += 1
                    counts[split] += 1
                    if split in lists:
                        lists[split].append(f"{word}/{name}")
    for split, name in (("validation", "validation_list.txt"), ("testing", "testing_list.txt")):
        with open(os.path.join(out, name), "w") as f:
            f.write("".join(f"{line}\n" for line in lists[split]))
    noise_dir = os.path.join(out, "_background_noise_")
    os.makedirs(noise_dir, exist_ok=True)
    noise = np.random.default_rng(seed).normal(0, 0.05, 2 * SAMPLE_RATE).astype(np.float32)
    soundfile.write(os.path.join(noise_dir, "white_noise.wav"), noise, SAMPLE_RATE, subtype="PCM_16")
    with open(os.path.join(out, "README.txt"), "w") as f:
        f.write(f"Generated spoken-word demo set in the Speech Commands v0.02 layout "
                f"({'espeak-ng' if use_espeak else 'generated chirps'}; seed {seed}): "
                f"{counts['training']} training, {counts['validation']} validation, {counts['testing']} testing clips.\n")
    return counts
