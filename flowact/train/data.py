"""Procedural talking heads: identities, speech-like audio, behaviour timelines, rendered clips.

Everything is deterministic in a seed and needs only numpy (espeak-ng, when installed, adds real
synthetic English for some clips; `speech="synth"` never calls it). The phrases themselves, formant
speech and espeak-ng, come from flowact.train.speech; this module lays them out on a timeline.

A clip is `chunks` x 12 frames at 25 fps and `chunks` x 7,680 samples of 16 kHz audio, with
- an identity drawn from the seed: face shape, skin / hair / shirt / eye / lip colours, hair
  style, background (the layout is that of the shipped demo reference image);
- a mouth whose opening on frame f is exactly `audio_envelope(audio)[f]` (the loudness of the
  audio under that frame and the 20 ms before it), so lip sync has a ground truth;
- blinks, slow head motion, and behaviour states per chunk: `speaking` (speech in the chunk,
  small bobbing), `listening` (silence, nodding) and `idle` (silence, slow sway);
- a reference image: the same identity in a different pose and mouth opening, as a user's
  reference photo would be.

The face layout (`MOUTH_BOX`, `EYE_BOX`) is fixed in fractions of the image, so the quality
metrics can measure the mouth from pixels (flowact.train.metrics). This module knows nothing
about torch or the model.
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial

import numpy as np

from flowact.presets import FPS, FRAMES_PER_CHUNK, SAMPLE_RATE, SAMPLES_PER_CHUNK
from flowact.train.speech import espeak_available, espeak_phrase, random_voice, synth_phrase

SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 640
STATES = ("speaking", "listening", "idle")  # behaviour prompts the generator produces

# Face layout, in fractions of the image (x right, y down). Head motion stays within MAX_DX/MAX_DY.
HEAD_CENTER = (0.5, 0.46)
MOUTH_CENTER_Y = 0.61
EYE_Y = 0.44
MAX_DX, MAX_DY = 0.03, 0.02
MOUTH_BOX = (0.40, 0.545, 0.60, 0.685)  # x0, y0, x1, y1: where the mouth interior can be
EYE_BOX = (0.28, 0.37, 0.72, 0.50)  # eyes and brows (blinks): excluded from identity distance
MOUTH_DARK = (50, 12, 20)  # mouth interior colour: the only dark colour inside MOUTH_BOX

# Envelope -> mouth opening: dB of the frame's RMS, mapped linearly from ENV_FLOOR_DB (closed)
# to ENV_FLOOR_DB + ENV_RANGE_DB (wide open).
ENV_FLOOR_DB = -42.0
ENV_RANGE_DB = 24.0
ENV_LOOKBACK = 320  # samples before the frame included in its window (20 ms)


def audio_envelope(audio: np.ndarray) -> np.ndarray:
    """Mouth opening in [0, 1] per video frame from 16 kHz audio: (S,) -> (ceil(S / 640),).

    Frame f uses samples [640 f - 320, 640 f + 640): its own 40 ms and the 20 ms before, never
    the future, so a streaming model can predict it from the audio it has."""
    audio = np.asarray(audio, dtype=np.float64)
    n = -(-len(audio) // SAMPLES_PER_FRAME)
    padded = np.zeros(ENV_LOOKBACK + n * SAMPLES_PER_FRAME)
    padded[ENV_LOOKBACK:ENV_LOOKBACK + len(audio)] = audio
    sq = np.concatenate([[0.0], np.cumsum(padded ** 2)])
    end = ENV_LOOKBACK + SAMPLES_PER_FRAME * (np.arange(n) + 1)
    width = ENV_LOOKBACK + SAMPLES_PER_FRAME
    rms = np.sqrt((sq[end] - sq[end - width]) / width)
    db = 20.0 * np.log10(rms + 1e-6)
    return np.clip((db - ENV_FLOOR_DB) / ENV_RANGE_DB, 0.0, 1.0).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# Identities


@dataclass(frozen=True)
class Identity:
    background: tuple[int, int, int]  # top of the background gradient
    background2: tuple[int, int, int]  # bottom of the background gradient
    skin: tuple[int, int, int]
    hair: tuple[int, int, int]
    hair_style: int  # 0 short, 1 long, 2 buzz cut, 3 round / curly
    shirt: tuple[int, int, int]
    iris: tuple[int, int, int]
    lips: tuple[int, int, int]
    cheeks: tuple[int, int, int]
    head_w: float = 1.0  # head width and height factors
    head_h: float = 1.0
    eye_dx: float = 0.09  # eye distance from the centre line
    mouth_w: float = 1.0  # mouth width factor


# The shipped demo reference (flowact/samples/reference.png) in this generator's terms.
DEMO_IDENTITY = Identity(background=(176, 214, 226), background2=(176, 214, 226), skin=(241, 194, 160),
                         hair=(92, 58, 38), hair_style=0, shirt=(58, 110, 165), iris=(90, 70, 50),
                         lips=(170, 60, 70), cheeks=(240, 165, 150))

_SKINS = [(241, 194, 160), (232, 182, 140), (214, 160, 120), (190, 134, 98), (160, 110, 80), (135, 92, 66)]
_HAIRS = [(92, 58, 38), (40, 28, 22), (20, 18, 18), (150, 100, 50), (200, 160, 90), (120, 120, 125), (140, 50, 30)]
_IRISES = [(90, 70, 50), (60, 100, 150), (70, 120, 80), (110, 110, 120), (50, 40, 30)]


def luminance(rgb) -> np.ndarray:
    rgb = np.asarray(rgb, dtype=np.float32) / 255.0
    return rgb[..., 0] * 0.2126 + rgb[..., 1] * 0.7152 + rgb[..., 2] * 0.0722


def _jitter(rng: np.random.Generator, colour, amount: int) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in colour)


def _bright_colour(rng: np.random.Generator, min_lum: float = 0.35) -> tuple[int, int, int]:
    """A random colour light enough not to be mistaken for the mouth interior."""
    while True:
        c = tuple(int(v) for v in rng.integers(30, 256, 3))
        if luminance(c) >= min_lum:
            return c


def random_identity(rng: np.random.Generator) -> Identity:
    skin = _jitter(rng, _SKINS[rng.integers(len(_SKINS))], 12)
    bg = _bright_colour(rng)
    bg2 = bg if rng.random() < 0.5 else _jitter(rng, bg, 40)
    lips = _jitter(rng, (170, 60, 70), 20)
    return Identity(background=bg, background2=bg2 if luminance(bg2) >= 0.3 else bg, skin=skin,
                    hair=_jitter(rng, _HAIRS[rng.integers(len(_HAIRS))], 15), hair_style=int(rng.integers(4)),
                    shirt=tuple(int(v) for v in rng.integers(20, 236, 3)),
                    iris=_jitter(rng, _IRISES[rng.integers(len(_IRISES))], 15), lips=lips,
                    cheeks=_jitter(rng, (240, 165, 150), 15),
                    head_w=float(rng.uniform(0.9, 1.1)), head_h=float(rng.uniform(0.93, 1.07)),
                    eye_dx=float(rng.uniform(0.08, 0.10)), mouth_w=float(rng.uniform(0.85, 1.15)))


# ------------------------------------------------------------------------------------------------
# Rendering


@dataclass
class Motion:
    """Per-frame animation: arrays of shape (T,)."""

    dx: np.ndarray  # head offset, fraction of the width
    dy: np.ndarray  # head offset, fraction of the height
    mouth: np.ndarray  # opening in [0, 1]
    eyes: np.ndarray  # eyelid opening in [0, 1]

    @classmethod
    def still(cls, frames: int = 1, mouth: float = 0.0, dx: float = 0.0, dy: float = 0.0) -> "Motion":
        full = lambda v: np.full(frames, v, dtype=np.float32)  # noqa: E731
        return cls(full(dx), full(dy), full(mouth), full(1.0))


class _Canvas:
    """Soft-edged (anti-aliased) shapes painted over a (T, S, S, 3) float image, each shape limited
    to its bounding box over all frames."""

    def __init__(self, frames: int, size: int, identity: Identity):
        self.size = size
        coords = (np.arange(size, dtype=np.float32) + 0.5) / size  # pixel centres
        self.x, self.y = coords[None, None, :], coords[None, :, None]  # (1, 1, S), (1, S, 1)
        top, bottom = np.array(identity.background, np.float32), np.array(identity.background2, np.float32)
        grad = top + (bottom - top) * coords[:, None, None]  # (S, 1, 3)
        self.img = np.broadcast_to(grad[None], (frames, size, size, 3)).copy()  # (T, S, S, 3)

    def _box(self, lo: float, hi: float) -> slice:
        return slice(max(0, int(np.floor(lo * self.size)) - 1), min(self.size, int(np.ceil(hi * self.size)) + 2))

    def ellipse(self, cx, cy, rx, ry, colour, opacity: float = 1.0, above: float | None = None) -> None:
        """Paint an ellipse; cx, cy, rx, ry are scalars or (T,) arrays. `above`: keep only y < cy + above."""
        t = self.img.shape[0]
        cx, cy, rx, ry = (np.broadcast_to(np.asarray(v, np.float32), (t,))[:, None, None] for v in (cx, cy, rx, ry))
        ry = np.maximum(ry, 1e-3)
        rows = self._box(float((cy - ry).min()), float((cy + ry).max()))
        cols = self._box(float((cx - rx).min()), float((cx + rx).max()))
        if rows.start >= rows.stop or cols.start >= cols.stop:
            return
        x, y = self.x[:, :, cols], self.y[:, rows, :]
        q = np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)  # (T, h, w)
        alpha = np.clip(0.5 - (q - 1.0) * np.minimum(rx, ry) * self.size, 0.0, 1.0)
        if above is not None:
            alpha = alpha * np.clip((cy + above - y) * self.size + 0.5, 0.0, 1.0)
        region = self.img[:, rows, cols]
        region += (opacity * alpha)[..., None] * (np.asarray(colour, np.float32) - region)


def render(identity: Identity, motion: Motion, size: int) -> np.ndarray:
    """Draw the identity with its animation: -> (T, size, size, 3) uint8."""
    idn, m = identity, motion
    c = _Canvas(len(m.dx), size, idn)
    hx, hy = HEAD_CENTER[0] + m.dx, HEAD_CENTER[1] + m.dy  # (T,)
    bx, by = 0.5 + 0.4 * m.dx, 0.2 * m.dy  # body follows the head a little
    skin_dark = tuple(int(v * 0.88) for v in idn.skin)
    rw, rh = 0.21 * idn.head_w, 0.27 * idn.head_h  # head radii

    # hair behind the head
    if idn.hair_style == 1:  # long
        c.ellipse(hx, hy + 0.06, rw + 0.07, rh + 0.05, idn.hair)
    elif idn.hair_style == 3:  # round / curly
        c.ellipse(hx, hy - 0.09, rw + 0.09, rh - 0.02, idn.hair)
    else:
        c.ellipse(hx, hy - 0.10, rw + 0.05, rh - 0.04, idn.hair)
    c.ellipse(bx, 1.04 + by, 0.40, 0.28, idn.shirt)  # shoulders
    c.ellipse(bx, 0.76 + by, 0.10, 0.14, skin_dark)  # neck
    for side in (-1, 1):  # ears
        c.ellipse(hx + side * (rw + 0.005), hy + 0.01, 0.04, 0.065, skin_dark)
    c.ellipse(hx, hy, rw, rh, idn.skin)  # head
    if idn.hair_style == 2:  # buzz cut: a thin cap
        c.ellipse(hx, hy - rh * 0.55, rw + 0.005, 0.12, idn.hair, above=-0.02)
    else:  # fringe
        c.ellipse(hx, hy - rh * 0.55, rw + 0.02, 0.16, idn.hair, above=0.0)
    c.ellipse(hx, hy + 0.085, 0.022, 0.013, skin_dark)  # nose
    for side in (-1, 1):  # cheeks
        c.ellipse(hx + side * 0.135, hy + 0.09, 0.032, 0.02, idn.cheeks, opacity=0.7)

    # eyes: white, iris, pupil, highlight; the eyelid (skin) closes from the top for blinks
    for side in (-1, 1):
        ex, ey = hx + side * idn.eye_dx, hy + (EYE_Y - HEAD_CENTER[1])
        c.ellipse(ex, ey, 0.048, 0.028, (40, 30, 30))  # outline
        c.ellipse(ex, ey, 0.042, 0.023, (245, 245, 245))
        c.ellipse(ex, ey, 0.022, 0.022, idn.iris)
        c.ellipse(ex, ey, 0.011, 0.011, (15, 10, 10))
        c.ellipse(ex + 0.006, ey - 0.007, 0.004, 0.004, (255, 255, 255))
        lid = 1.0 - m.eyes  # (T,) 0 open .. 1 closed
        c.ellipse(ex, ey - 0.03 + 0.03 * lid, 0.052, 0.001 + 0.03 * lid, idn.skin, opacity=1.0)
        c.ellipse(ex, ey - 0.06, 0.05, 0.009, idn.hair)  # eyebrow

    # mouth: lips, then the dark interior whose height is the opening
    my = hy + (MOUTH_CENTER_Y - HEAD_CENTER[1])
    c.ellipse(hx, my, 0.085 * idn.mouth_w, 0.012 + 0.034 * m.mouth, idn.lips)
    c.ellipse(hx, my, 0.065 * idn.mouth_w, 0.001 + 0.03 * m.mouth, MOUTH_DARK)
    return np.clip(c.img + 0.5, 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------
# Timelines and clips


@dataclass
class Clip:
    frames: np.ndarray  # (T, H, W, 3) uint8, T = chunks * 12
    audio: np.ndarray  # (T * 640,) float32, 16 kHz
    mouth: np.ndarray  # (T,) ground-truth opening = audio_envelope(audio)
    states: list[str]  # behaviour prompt per chunk
    reference: np.ndarray  # (H, W, 3) uint8: the identity in another pose
    identity: Identity

    @property
    def chunks(self) -> int:
        return len(self.states)


def speech_timeline(rng: np.random.Generator, seconds: float, speech: str = "synth",
                    start_silent: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Speech phrases and pauses: -> (audio (S,) float32, silent-state per sample (S,) int8).

    The state array holds -1 while a phrase plays (or in short gaps between phrases), else the
    index into STATES of the pause's behaviour (listening or idle). speech: synth | espeak | mixed."""
    total = int(round(seconds * SAMPLE_RATE))
    audio = np.zeros(total)
    state = np.full(total, -1, dtype=np.int8)
    voice = random_voice(rng)
    gain = 10 ** (rng.uniform(-22, -14) / 20)  # speech RMS, dBFS
    use_espeak = speech == "espeak" or (speech == "mixed" and espeak_available() and rng.random() < 0.5)
    if use_espeak and not espeak_available():
        raise RuntimeError("espeak-ng not found; use speech='synth'")
    pos = 0
    silent = rng.random() < 0.3 if start_silent is None else start_silent
    while pos < total:
        if silent:  # a behaviour pause
            n = int(SAMPLE_RATE * rng.uniform(1.0, 4.0))
            state[pos:pos + n] = STATES.index("listening") if rng.random() < 0.5 else STATES.index("idle")
            pos += n
        else:  # a run of phrases with short breaths between them
            for _ in range(int(rng.integers(1, 5))):
                phrase = espeak_phrase(rng) if use_espeak else synth_phrase(rng, voice)
                phrase = phrase * gain / (np.sqrt(np.mean(phrase ** 2)) + 1e-9)
                n = min(len(phrase), total - pos)
                audio[pos:pos + n] = phrase[:n]
                pos += n + int(SAMPLE_RATE * rng.uniform(0.15, 0.5))
                if pos >= total:
                    break
        silent = not silent
    audio += 10 ** (-62 / 20) * rng.standard_normal(total)  # room noise floor
    peak = np.abs(audio).max()
    if peak > 0.99:
        audio *= 0.99 / peak
    return audio.astype(np.float32), state[:total]


def _smooth(x: np.ndarray, frames: int) -> np.ndarray:
    kernel = np.hanning(2 * frames + 1)
    kernel /= kernel.sum()
    return np.convolve(np.pad(x, frames, mode="edge"), kernel, mode="valid")


def behaviour_motion(rng: np.random.Generator, mouth: np.ndarray, frame_state: np.ndarray) -> Motion:
    """Head motion and blinks for a per-frame state (index into STATES): -> Motion."""
    t = np.arange(len(mouth)) / FPS
    weights = [_smooth((frame_state == i).astype(np.float64), 6) for i in range(len(STATES))]
    speak, listen, idle = weights
    ph = rng.uniform(0, 2 * np.pi, 8)
    drift_x = sum(np.sin(2 * np.pi * f * t + p) for f, p in zip((0.05, 0.11, 0.17), ph[:3])) / 3
    drift_y = sum(np.sin(2 * np.pi * f * t + p) for f, p in zip((0.07, 0.13), ph[3:5])) / 2
    dx = 0.012 * drift_x + 0.015 * idle * np.sin(2 * np.pi * 0.25 * t + ph[5]) + 0.006 * speak * np.sin(2 * np.pi * 0.9 * t + ph[6])
    dy = 0.006 * drift_y + 0.011 * listen * np.sin(2 * np.pi * 1.3 * t) + 0.005 * speak * np.sin(2 * np.pi * 1.7 * t + ph[7])
    eyes = np.ones(len(mouth))
    pos = int(rng.integers(10, 60))
    profile = np.array([0.6, 0.15, 0.0, 0.2, 0.6, 0.9])
    while pos < len(mouth):
        n = min(len(profile), len(mouth) - pos)
        eyes[pos:pos + n] = profile[:n]
        pos += int(rng.integers(50, 130))  # a blink every 2-5 s
    return Motion(np.clip(dx, -MAX_DX, MAX_DX).astype(np.float32), np.clip(dy, -MAX_DY, MAX_DY).astype(np.float32),
                  mouth.astype(np.float32), eyes.astype(np.float32))


def chunk_states(audio: np.ndarray, silent_state: np.ndarray) -> list[str]:
    """Behaviour prompt per chunk: speaking if any speech in the chunk, else the pause's behaviour."""
    out = []
    for c in range(len(audio) // SAMPLES_PER_CHUNK):
        s = silent_state[c * SAMPLES_PER_CHUNK:(c + 1) * SAMPLES_PER_CHUNK]
        if (s < 0).mean() > 0.15:
            out.append("speaking")
        else:
            vals = s[s >= 0]
            out.append(STATES[int(np.bincount(vals).argmax())] if len(vals) else "speaking")
    return out


def frame_states(states: list[str]) -> np.ndarray:
    return np.repeat(np.array([STATES.index(s) for s in states]), FRAMES_PER_CHUNK)


def make_clip(seed: int, size: int, chunks: int, speech: str = "synth", identity: Identity | None = None) -> Clip:
    """One deterministic clip: `chunks` x 0.48 s of a talking head at size x size pixels."""
    rng = np.random.default_rng(seed)
    idn = identity if identity is not None else random_identity(rng)
    audio, silent = speech_timeline(rng, chunks * SAMPLES_PER_CHUNK / SAMPLE_RATE, speech)
    mouth = audio_envelope(audio)  # (T,)
    states = chunk_states(audio, silent)
    motion = behaviour_motion(rng, mouth, frame_states(states))
    frames = render(idn, motion, size)
    ref_motion = Motion.still(1, mouth=float(rng.uniform(0.0, 0.6)), dx=float(rng.uniform(-MAX_DX, MAX_DX)),
                              dy=float(rng.uniform(-MAX_DY, MAX_DY)))
    return Clip(frames, audio, mouth, states, render(idn, ref_motion, size)[0], idn)


def make_clips(seeds: list[int], size: int, chunks: int, speech: str = "synth", workers: int = 1) -> list[Clip]:
    """make_clip for many seeds, in `workers` processes (same clips as one by one)."""
    make = partial(make_clip, size=size, chunks=chunks, speech=speech)
    if workers <= 1:
        return [make(s) for s in seeds]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(make, seeds, chunksize=max(1, len(seeds) // (4 * workers))))
