"""Objective quality metrics for generated talking-head video, measured from pixels.

They rely on the fixed face layout of flowact.train.data (a model trained on that data draws its
avatars in that layout) and know nothing about the model:
- lip sync: Pearson correlation between the audio envelope (`data.audio_envelope`, the mouth
  opening the training data uses) and the mouth opening measured in the frames (area of dark
  mouth-interior pixels inside `MOUTH_BOX`); 1 = perfect, 0 = unrelated.
- identity distance: mean absolute difference (0..1) between each frame and the reference image,
  both pooled to 16 x 16 and with the mouth and eye boxes masked out (they move legitimately);
  over a long stream it is the drift curve; drift = late minus early distance.
- seam ratio: the mean frame-to-frame change across chunk boundaries divided by the mean change
  inside chunks; 1 = seams are as smooth as the motion, larger = visible jumps.
"""

from __future__ import annotations

import numpy as np

from flowact.presets import FRAMES_PER_CHUNK
from flowact.train.data import EYE_BOX, MOUTH_BOX, audio_envelope, luminance

DARK_LUMINANCE = 0.25  # below this a mouth-box pixel starts counting as mouth interior
DARK_SOFTNESS = 0.15  # ... and fully counts DARK_SOFTNESS below it
POOL_GRID = 16  # identity distance compares 16 x 16 pooled images


def _box(box: tuple[float, float, float, float], height: int, width: int) -> tuple[slice, slice]:
    x0, y0, x1, y1 = box
    return slice(int(y0 * height), int(np.ceil(y1 * height))), slice(int(x0 * width), int(np.ceil(x1 * width)))


def mouth_opening(frames: np.ndarray) -> np.ndarray:
    """Measured mouth opening per frame: (T, H, W, 3) uint8 -> (T,) fraction of dark mouth-box pixels."""
    rows, cols = _box(MOUTH_BOX, frames.shape[1], frames.shape[2])
    lum = luminance(frames[:, rows, cols])  # (T, h, w)
    return np.clip((DARK_LUMINANCE - lum) / DARK_SOFTNESS, 0.0, 1.0).mean(axis=(1, 2))


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    a, b = a - a.mean(), b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else 0.0


def lip_sync(frames: np.ndarray, audio: np.ndarray) -> float:
    """Correlation of the audio envelope with the measured mouth opening over the frames."""
    env = audio_envelope(audio)[: len(frames)]
    return pearson(env, mouth_opening(frames[: len(env)]))


def _pool(images: np.ndarray) -> np.ndarray:
    """(..., H, W, 3) -> (..., 16, 16, 3) block means in 0..1 (H, W multiples of 16 after cropping)."""
    h, w = images.shape[-3] // POOL_GRID, images.shape[-2] // POOL_GRID
    x = images[..., : h * POOL_GRID, : w * POOL_GRID, :].astype(np.float32) / 255.0
    x = x.reshape(*x.shape[:-3], POOL_GRID, h, POOL_GRID, w, 3)
    return x.mean(axis=(-4, -2))


def _identity_mask() -> np.ndarray:
    mask = np.ones((POOL_GRID, POOL_GRID), dtype=bool)
    for box in (MOUTH_BOX, EYE_BOX):
        x0, y0, x1, y1 = box
        mask[int(y0 * POOL_GRID):int(np.ceil(y1 * POOL_GRID)), int(x0 * POOL_GRID):int(np.ceil(x1 * POOL_GRID))] = False
    return mask


def identity_distance(frames: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per-frame distance to the reference image: (T, H, W, 3), (H, W, 3) uint8 -> (T,) in 0..1."""
    mask = _identity_mask()
    diff = np.abs(_pool(frames) - _pool(reference)[None])  # (T, 16, 16, 3)
    return diff[:, mask].mean(axis=(1, 2))


def drift_curve(frames: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Identity distance per chunk (mean over its 12 frames): (T, H, W, 3) -> (T // 12,)."""
    d = identity_distance(frames, reference)
    n = len(d) // FRAMES_PER_CHUNK
    return d[: n * FRAMES_PER_CHUNK].reshape(n, FRAMES_PER_CHUNK).mean(axis=1)


def drift(curve: np.ndarray, fraction: float = 0.1) -> tuple[float, float, float]:
    """(early, late, late - early): mean distance over the first and the last `fraction` of a curve."""
    k = max(1, int(len(curve) * fraction))
    early, late = float(np.mean(curve[:k])), float(np.mean(curve[-k:]))
    return early, late, late - early


def seam_ratio(frames: np.ndarray) -> float:
    """Mean change across chunk boundaries / mean change inside chunks (frames: (T, H, W, 3))."""
    x = frames.astype(np.float32)
    step = np.abs(np.diff(x, axis=0)).mean(axis=(1, 2, 3))  # (T-1,): step[i] is frame i -> i+1
    boundary = (np.arange(1, len(x)) % FRAMES_PER_CHUNK) == 0
    inside = step[~boundary].mean()
    return float(step[boundary].mean() / inside) if inside > 0 else float("inf") if step[boundary].mean() > 0 else 1.0


class StreamMeter:
    """The metrics of a stream accumulated chunk by chunk (constant memory over a long stream);
    the results equal those of the whole-video functions above."""

    def __init__(self, reference: np.ndarray):
        self.reference = reference
        self.opening: list[np.ndarray] = []  # (12,) per chunk
        self.distance: list[np.ndarray] = []  # (12,) per chunk
        self.inside: list[float] = []  # mean step inside each chunk (11 steps)
        self.boundary: list[float] = []  # step from the previous chunk's last frame
        self.last: np.ndarray | None = None

    def add(self, frames: np.ndarray) -> None:
        """frames (12, H, W, 3) uint8: the next chunk."""
        self.opening.append(mouth_opening(frames))
        self.distance.append(identity_distance(frames, self.reference))
        x = frames.astype(np.float32)
        self.inside.append(float(np.abs(np.diff(x, axis=0)).mean(axis=(1, 2, 3)).sum()))
        if self.last is not None:
            self.boundary.append(float(np.abs(x[0] - self.last).mean()))
        self.last = x[-1]

    def lip_sync(self, audio: np.ndarray) -> float:
        opening = np.concatenate(self.opening)
        env = audio_envelope(audio)[: len(opening)]
        return pearson(env, opening[: len(env)])

    def drift_curve(self) -> np.ndarray:
        return np.array([d.mean() for d in self.distance])

    def seam_ratio(self) -> float:
        steps_inside = len(self.inside) * (FRAMES_PER_CHUNK - 1)
        inside = sum(self.inside) / steps_inside
        boundary = float(np.mean(self.boundary)) if self.boundary else 0.0
        return boundary / inside if inside > 0 else (float("inf") if boundary > 0 else 1.0)
