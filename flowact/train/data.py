"""Procedural talking heads: identities, speech-like audio, behaviour timelines, rendered clips.

Everything is deterministic in a seed and needs only numpy (espeak-ng, when installed, adds real
synthetic English for some clips; `speech="synth"` never calls it).

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

import os
import shutil
import subprocess
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from flowact.presets import FPS, FRAMES_PER_CHUNK, SAMPLE_RATE, SAMPLES_PER_CHUNK

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
# Speech-like audio

# Vowel formants F1, F2, F3 in Hz (adult male averages; voices scale them).
VOWELS = np.array([(270, 2290, 3010), (390, 1990, 2550), (530, 1840, 2480), (660, 1720, 2410), (730, 1090, 2440),
                   (570, 840, 2410), (440, 1020, 2240), (300, 870, 2240), (640, 1190, 2390), (490, 1350, 1690)],
                  dtype=np.float64)


@dataclass(frozen=True)
class Voice:
    f0: float  # base pitch (Hz)
    formant_scale: float  # vocal-tract length factor
    rate: float  # speaking-rate factor
    breath: float  # aspiration noise level


def random_voice(rng: np.random.Generator) -> Voice:
    female = rng.random() < 0.5
    return Voice(f0=float(rng.uniform(170, 250) if female else rng.uniform(90, 150)),
                 formant_scale=float(rng.uniform(1.08, 1.2) if female else rng.uniform(0.92, 1.05)),
                 rate=float(rng.uniform(0.8, 1.25)), breath=float(rng.uniform(0.01, 0.05)))


def _band_noise(rng: np.random.Generator, n: int, lo: float, hi: float) -> np.ndarray:
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1.0 / SAMPLE_RATE)
    spec[(f < lo) | (f > hi)] = 0.0
    out = np.fft.irfft(spec, n)
    return out / (np.std(out) + 1e-9)


def _ramp(n: int, attack: int, release: int) -> np.ndarray:
    env = np.ones(n)
    a, r = min(attack, n // 2), min(release, n // 2)
    if a:
        env[:a] = 0.5 - 0.5 * np.cos(np.pi * np.arange(a) / a)
    if r:
        env[n - r:] = 0.5 + 0.5 * np.cos(np.pi * np.arange(r) / r)
    return env


def _syllable(rng: np.random.Generator, voice: Voice, f0: float, stress: float) -> np.ndarray:
    """One consonant-vowel(-consonant) syllable: formant-shaped harmonics under a syllable envelope."""
    sr = SAMPLE_RATE
    parts = []
    kind = rng.random()
    if kind < 0.45:  # fricative onset
        n = int(sr * rng.uniform(0.04, 0.09) / voice.rate)
        parts.append(0.25 * stress * _band_noise(rng, n, rng.uniform(2000, 3500), 7000) * _ramp(n, n // 3, n // 4))
    elif kind < 0.75:  # plosive burst and a short closure
        parts.append(np.zeros(int(sr * 0.03 / voice.rate)))
        n = int(sr * 0.015)
        parts.append(0.4 * stress * _band_noise(rng, n, 500, 6000) * _ramp(n, 2, n // 2))
    n = int(sr * rng.uniform(0.10, 0.22) / voice.rate)  # the vowel
    t = np.arange(n) / sr
    glide = f0 * (1.0 + rng.uniform(-0.08, 0.08) * t / t[-1] + 0.01 * np.sin(2 * np.pi * 5.5 * t))
    phase = 2 * np.pi * np.cumsum(glide) / sr  # (n,)
    a, b = VOWELS[rng.integers(len(VOWELS))] * voice.formant_scale, VOWELS[rng.integers(len(VOWELS))] * voice.formant_scale
    k = np.arange(1, int(5000 // f0) + 1)[:, None]  # (K, 1) harmonic numbers
    formants = a + (b - a) * 0.3  # a slight diphthong towards b, frozen per syllable
    hz = k * f0  # (K, 1)
    gain = sum(g / (1.0 + ((hz - f) / bw) ** 2) for f, bw, g in zip(formants, (90, 120, 170), (1.0, 0.6, 0.3)))
    gain = gain / (1.0 + hz / 800.0)  # spectral tilt of the glottal source
    vowel = (gain * np.sin(k * phase[None, :])).sum(axis=0)
    vowel = vowel / (np.std(vowel) + 1e-9) + voice.breath * rng.standard_normal(n)
    parts.append(stress * vowel * _ramp(n, int(sr * 0.025), int(sr * 0.06)))
    if rng.random() < 0.3:  # fricative coda
        n = int(sr * rng.uniform(0.03, 0.07) / voice.rate)
        parts.append(0.2 * stress * _band_noise(rng, n, 3000, 7500) * _ramp(n, n // 4, n // 2))
    return np.concatenate(parts)


def synth_phrase(rng: np.random.Generator, voice: Voice) -> np.ndarray:
    """A phrase of 2-8 words of 1-3 syllables, with a falling pitch contour: (S,) float64."""
    words = int(rng.integers(2, 9))
    out = []
    syllables = 0
    for w in range(words):
        for _ in range(int(rng.integers(1, 4))):
            decline = 1.0 - 0.15 * syllables / 12.0
            out.append(_syllable(rng, voice, voice.f0 * decline * rng.uniform(0.92, 1.1), rng.uniform(0.5, 1.0)))
            syllables += 1
        if w < words - 1:
            out.append(np.zeros(int(SAMPLE_RATE * rng.uniform(0.0, 0.09))))
    return np.concatenate(out)


_WORDS = ("hello welcome today we can talk about the weather music science and the little things that make "
          "a good morning great people often ask me how this works it is simple every half second new video "
          "arrives while I listen think and answer questions about travel food books games history sport "
          "family friends work holidays the city river mountain coffee tea really quite nice yes no maybe "
          "absolutely thank you very much let me think for a moment that sounds wonderful").split()
_ESPEAK_VOICES = ("en-us", "en-gb", "en-us+f2", "en-gb+f3", "en-us+m3", "en-gb-scotland", "en-us+f4")


ESPEAK_BANK_ENV = "FLOWACT_ESPEAK_BANK"  # an .npz of phrases pre-read by espeak-ng (`write_espeak_bank`)
_espeak_bank: list[np.ndarray] | None = None


def espeak_bank() -> list[np.ndarray] | None:
    """The phrases of $FLOWACT_ESPEAK_BANK, for machines without espeak-ng (a GPU box), else None."""
    global _espeak_bank
    if _espeak_bank is None and os.environ.get(ESPEAK_BANK_ENV):
        with np.load(os.environ[ESPEAK_BANK_ENV]) as z:
            audio = z["audio"].astype(np.float64) / 32767.0  # (total,) all phrases end to end
            _espeak_bank = np.split(audio, z["ends"][:-1])
    return _espeak_bank


def espeak_available() -> bool:
    return espeak_bank() is not None or shutil.which("espeak-ng") is not None


def espeak_phrase(rng: np.random.Generator) -> np.ndarray:
    """A random English phrase read by espeak-ng, 16 kHz, peak-normalised like the demo speech
    (drawn from the phrase bank instead when $FLOWACT_ESPEAK_BANK names one)."""
    bank = espeak_bank()
    if bank is not None:
        return bank[int(rng.integers(len(bank)))]
    from flowact.media import load_audio

    text = " ".join(rng.choice(_WORDS, size=int(rng.integers(3, 12))))
    voice = _ESPEAK_VOICES[rng.integers(len(_ESPEAK_VOICES))]
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "phrase.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(int(rng.integers(130, 185))), "-p",
                        str(int(rng.integers(30, 70))), "-w", str(wav), text], check=True, capture_output=True)
        audio = load_audio(wav).astype(np.float64)
    # espeak pads with silence; trim it so the timeline controls the pauses
    loud = np.flatnonzero(np.abs(audio) > 0.01 * np.abs(audio).max())
    return audio[loud[0]:loud[-1] + 1] if len(loud) else audio


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


def write_espeak_bank(path: str | Path, phrases: int, seed: int = 0) -> None:
    """Read `phrases` random phrases with espeak-ng into an int16 .npz (for $FLOWACT_ESPEAK_BANK)."""
    rng = np.random.default_rng(seed)
    audio = [espeak_phrase(rng) for _ in range(phrases)]
    audio = [a / np.abs(a).max() for a in audio]  # each phrase peak 1: the timeline sets its level
    np.savez(path, audio=np.round(np.concatenate(audio) * 32767).astype(np.int16),
             ends=np.cumsum([len(a) for a in audio]))


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="write a phrase bank of espeak-ng speech for machines without it")
    p.add_argument("out")
    p.add_argument("--phrases", type=int, default=256)
    a = p.parse_args()
    write_espeak_bank(a.out, a.phrases)
    print(f"wrote {a.out}: {Path(a.out).stat().st_size / 2**20:.1f} MiB")
