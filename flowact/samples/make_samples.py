"""How the shipped demo inputs in this folder were made; rerun to regenerate them.

    python -m flowact.samples.make_samples            # writes reference.png and speech.wav here
    python -m flowact.samples.make_samples --out DIR

- reference.png: a 256x256 cartoon face drawn with Pillow (no randomness, drawn at 4x and
  downsampled with LANCZOS for smooth edges).
- speech.wav: ~10 s of English read by espeak-ng (`apt-get install espeak-ng`; made with
  espeak-ng 1.51, voice en-us, 150 words per minute), resampled from espeak's 22,050 Hz to
  16 kHz with `flowact.media.resample`, peak-normalised to -1 dBFS, written as 16-bit PCM mono.

Both are deterministic for a given Pillow / espeak-ng version. Nothing is downloaded at run time:
the generated files are committed and read through `flowact.media.REFERENCE_IMAGE` / `SPEECH_WAV`.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image, ImageDraw

from flowact.media import resample
from flowact.presets import SAMPLE_RATE

SIZE = 256  # output image side in pixels
SCALE = 4  # supersampling factor for anti-aliased edges
SPEECH_TEXT = (
    "Hello, and welcome to this streaming avatar demo. "
    "I can listen, think, and talk with you in real time. "
    "New video arrives every half second."
)
PEAK_DBFS = -1.0


def make_reference(size: int = SIZE) -> Image.Image:
    """A friendly cartoon head and shoulders on a plain background."""
    s = size * SCALE

    def box(x0: float, y0: float, x1: float, y1: float) -> tuple[int, int, int, int]:
        """Fractions of the canvas -> pixel box on the supersampled canvas."""
        return int(x0 * s), int(y0 * s), int(x1 * s), int(y1 * s)

    skin, skin_dark = (241, 194, 160), (214, 160, 125)
    hair, shirt, ink = (92, 58, 38), (58, 110, 165), (45, 35, 30)
    img = Image.new("RGB", (s, s), (176, 214, 226))  # pale blue background
    d = ImageDraw.Draw(img)

    d.ellipse(box(0.12, 0.78, 0.88, 1.30), fill=shirt)  # shoulders
    d.rectangle(box(0.42, 0.66, 0.58, 0.84), fill=skin_dark)  # neck
    d.pieslice(box(0.40, 0.72, 0.60, 0.88), 0, 180, fill=skin_dark)  # collar opening
    d.ellipse(box(0.24, 0.12, 0.76, 0.62), fill=hair)  # hair behind the head
    d.ellipse(box(0.25, 0.40, 0.33, 0.54), fill=skin_dark)  # ears
    d.ellipse(box(0.67, 0.40, 0.75, 0.54), fill=skin_dark)
    d.ellipse(box(0.29, 0.20, 0.71, 0.74), fill=skin)  # head
    d.chord(box(0.27, 0.14, 0.73, 0.44), 180, 360, fill=hair)  # fringe

    for cx in (0.41, 0.59):  # eyes: white, iris, pupil, highlight
        d.ellipse(box(cx - 0.050, 0.43, cx + 0.050, 0.49), fill=(255, 255, 255), outline=ink, width=SCALE)
        d.ellipse(box(cx - 0.024, 0.435, cx + 0.024, 0.485), fill=(90, 70, 50))
        d.ellipse(box(cx - 0.012, 0.448, cx + 0.012, 0.472), fill=(15, 10, 10))
        d.ellipse(box(cx + 0.002, 0.446, cx + 0.010, 0.454), fill=(255, 255, 255))
        d.arc(box(cx - 0.060, 0.38, cx + 0.060, 0.44), 200, 340, fill=hair, width=3 * SCALE)  # eyebrow

    d.arc(box(0.47, 0.50, 0.53, 0.58), 20, 160, fill=skin_dark, width=2 * SCALE)  # nose
    d.chord(box(0.42, 0.57, 0.58, 0.67), 0, 180, fill=(170, 60, 70), outline=ink, width=SCALE)  # smile
    d.chord(box(0.45, 0.62, 0.55, 0.665), 180, 360, fill=(225, 110, 115))  # tongue
    d.ellipse(box(0.33, 0.53, 0.39, 0.57), fill=(240, 165, 150))  # cheeks
    d.ellipse(box(0.61, 0.53, 0.67, 0.57), fill=(240, 165, 150))
    return img.resize((size, size), Image.Resampling.LANCZOS)


def make_speech(text: str = SPEECH_TEXT) -> np.ndarray:
    """English speech from espeak-ng at 16 kHz, peak-normalised. -> (S,) float32."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise RuntimeError("espeak-ng not found; install it with `apt-get install -y espeak-ng`")
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "espeak.wav"
        subprocess.run([exe, "-v", "en-us", "-s", "150", "-w", str(wav), text], check=True)
        audio, rate = sf.read(str(wav), dtype="float32", always_2d=True)
    audio = resample(audio.mean(axis=1), rate, SAMPLE_RATE)
    return (audio * (10 ** (PEAK_DBFS / 20) / np.abs(audio).max())).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent, help="output folder")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    make_reference().save(args.out / "reference.png", optimize=True)
    sf.write(str(args.out / "speech.wav"), make_speech(), SAMPLE_RATE, subtype="PCM_16")
    for name in ("reference.png", "speech.wav"):
        print(f"wrote {args.out / name} ({(args.out / name).stat().st_size / 1024:.1f} KiB)")


if __name__ == "__main__":
    main()
