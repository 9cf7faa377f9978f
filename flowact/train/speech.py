"""Speech-like audio for the training clips: procedural vowel-formant speech and espeak-ng phrases.

`synth_phrase` builds a phrase from syllables (harmonics of a gliding pitch shaped by vowel
formants, fricative / plosive noise onsets and codas, syllable envelopes, falling phrase pitch)
for a `random_voice`; it is deterministic in its generator and needs only numpy.

`espeak_phrase` reads random English words with espeak-ng (random voice, speed and pitch) when it
is installed; a machine without it (a GPU box) gets the same kind of phrases from a bank,
$FLOWACT_ESPEAK_BANK (`ESPEAK_BANK_ENV`), an .npz written where espeak-ng exists by
`write_espeak_bank` (`python -m flowact.train.speech bank.npz --phrases 256`).

flowact.train.data lays these phrases out on a clip's timeline (`speech_timeline`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flowact.presets import SAMPLE_RATE


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
