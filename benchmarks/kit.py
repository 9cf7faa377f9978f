"""What the benchmarks share: the shipped inputs, a log line, timing summaries.

The inputs are the shipped demo samples read through `flowact.media`. On a machine without PyAV or
soundfile (the lent GPU machine installs this package with --no-deps), `flowact.media` cannot be
imported; `reference_inputs` then reads the same two files with `wave` and PIL, to the same arrays
(tests/test_gpu_stream.py checks it).

This module knows nothing about Triton, torch or any one benchmark's modes.
"""

from __future__ import annotations

import statistics
import time
import wave
from pathlib import Path

import numpy as np

from flowact.presets import SAMPLE_RATE, SAMPLES_PER_CHUNK, Preset
from flowact.stats import percentile

RESULTS = Path(__file__).resolve().parent / "results"  # the published results, beside README.md
README = Path(__file__).resolve().parent / "README.md"  # the benchmarks' README, with the generated tables



def say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def reference_inputs(preset: Preset) -> tuple[np.ndarray, np.ndarray, str]:
    """(the shipped reference image (H, W, 3) uint8 at the preset's size, the shipped speech (S,) float32
    at 16 kHz, which reader read them: "flowact.media" or "wave+PIL")."""
    try:
        from flowact.media import REFERENCE_IMAGE, SPEECH_WAV, load_audio, load_image
    except (ImportError, OSError):  # no PyAV / soundfile (or no libsndfile)
        return *_stdlib_inputs(preset), "wave+PIL"
    return load_image(REFERENCE_IMAGE, preset.height, preset.width), load_audio(SPEECH_WAV), "flowact.media"


def _stdlib_inputs(preset: Preset) -> tuple[np.ndarray, np.ndarray]:
    """The two shipped files as flowact.media reads them (a 16-bit mono 16 kHz WAV needs no resampling)."""
    from PIL import Image, ImageOps

    import flowact

    samples = Path(flowact.__file__).parent / "samples"
    wav = samples / "speech.wav"
    with wave.open(str(wav)) as w:
        if (w.getnchannels(), w.getsampwidth(), w.getframerate()) != (1, 2, SAMPLE_RATE):
            raise RuntimeError(f"{wav}: expected 16-bit mono {SAMPLE_RATE} Hz, got {w.getparams()}")
        speech = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768.0  # (S,)
    with Image.open(samples / "reference.png") as img:
        img = ImageOps.fit(ImageOps.exif_transpose(img).convert("RGB"), (preset.width, preset.height),
                           method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))
        image = np.asarray(img, dtype=np.uint8).copy()  # (H, W, 3)
    return image, speech


def whole_chunks(speech: np.ndarray) -> np.ndarray:
    """(S,) -> (S // 7680, 7680): the speech's whole request-sized chunks (a partial last one dropped)."""
    return speech[:len(speech) // SAMPLES_PER_CHUNK * SAMPLES_PER_CHUNK].reshape(-1, SAMPLES_PER_CHUNK)


def ms_stats(values: list[float]) -> dict:
    """p50 / p99 / mean / max of millisecond timings, to the microsecond, and how many."""
    if not values:
        return {"p50": None, "p99": None, "mean": None, "max": None, "n": 0}
    return {"p50": round(percentile(values, 50), 3), "p99": round(percentile(values, 99), 3),
            "mean": round(statistics.fmean(values), 3), "max": round(max(values), 3), "n": len(values)}
