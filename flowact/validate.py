"""The checks a stream's inputs pass at the boundary where they enter: each refusal an `InputError`
whose message names the field and the rule.

The serving boundary (flowact.serving.streams.parse_request) and the snapshot codec run them; the
engine (flowact.engine) trusts what it is given. Torch-free.
"""

from __future__ import annotations

import numpy as np

from flowact.contract import MAX_AUDIO_MAGNITUDE, MAX_PROMPT_BYTES, MAX_SEED
from flowact.presets import SAMPLES_PER_CHUNK, Preset


class InputError(ValueError):
    """A request refused for its content; the message names the field and the rule."""


def check_audio_chunk(audio, name: str = "audio") -> np.ndarray:
    if not isinstance(audio, np.ndarray):
        raise InputError(f"{name}: expected a numpy float32 array, got {type(audio).__name__}")
    if audio.dtype != np.float32:
        raise InputError(f"{name}: dtype must be float32, got {audio.dtype}")
    if audio.shape != (SAMPLES_PER_CHUNK,):
        raise InputError(f"{name}: shape must be ({SAMPLES_PER_CHUNK},) (0.48 s at 16 kHz), got {audio.shape}")
    if not np.isfinite(audio).all():
        raise InputError(f"{name}: contains NaN or Inf samples")
    if np.abs(audio).max(initial=0.0) > MAX_AUDIO_MAGNITUDE:
        raise InputError(f"{name}: sample magnitude {np.abs(audio).max():.3g} is absurd (expected about [-1, 1])")
    return audio


def check_image(image, preset: Preset, name: str = "reference image") -> np.ndarray:
    if not isinstance(image, np.ndarray):
        raise InputError(f"{name}: expected a numpy uint8 array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise InputError(f"{name}: dtype must be uint8, got {image.dtype}")
    expected = (preset.height, preset.width, 3)
    if image.shape != expected:
        raise InputError(f"{name}: shape must be {expected} (H, W, RGB) for preset {preset.name}, got {image.shape}")
    return image


def check_prompt(prompt, name: str = "prompt") -> str:
    if not isinstance(prompt, str):
        raise InputError(f"{name}: expected text, got {type(prompt).__name__}")
    if len(prompt.encode("utf-8")) > MAX_PROMPT_BYTES:
        raise InputError(f"{name}: {len(prompt.encode('utf-8'))} bytes is longer than {MAX_PROMPT_BYTES}")
    return prompt


def check_seed(seed, name: str = "seed") -> int:
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise InputError(f"{name}: expected an integer, got {type(seed).__name__}")
    if not 0 <= int(seed) <= MAX_SEED:
        raise InputError(f"{name}: {seed} is out of range [0, {MAX_SEED}]")
    return int(seed)
