"""Media in and out: reference images, speech audio, audio chunking and MP4 files.

Everything here is plain numpy at the stream's fixed geometry (`presets.FPS`, `presets.SAMPLE_RATE`,
`presets.SAMPLES_PER_CHUNK`). This module knows nothing about torch, the model or Triton: it turns
files into arrays and arrays into files.
"""

from __future__ import annotations

from fractions import Fraction
from math import gcd
from pathlib import Path
from types import TracebackType

import av
import numpy as np
import soundfile as sf
from PIL import Image, ImageOps

from flowact.presets import FPS, SAMPLE_RATE, SAMPLES_PER_CHUNK

SAMPLES_DIR = Path(__file__).parent / "samples"
REFERENCE_IMAGE = SAMPLES_DIR / "reference.png"  # shipped demo inputs, made by samples/make_samples.py
SPEECH_WAV = SAMPLES_DIR / "speech.wav"


# ----------------------------------------------------------------------------------------------
# Images


def load_image(path: str | Path, height: int, width: int) -> np.ndarray:
    """Read a PNG/JPEG as RGB, center-crop it to `width / height` and resize (LANCZOS). -> (H, W, 3) uint8."""
    with Image.open(path) as img:
        return fit_image(img, height, width)


def fit_image(img: Image.Image, height: int, width: int) -> np.ndarray:
    """An opened image (decoded here) -> RGB, upright (EXIF), center-cropped to `width / height` and resized
    (LANCZOS). -> (H, W, 3) uint8. Holds one decoded copy at most: turned in place, converted only when
    not RGB, and cropped by the resize itself."""
    ImageOps.exif_transpose(img, in_place=True)
    if img.mode != "RGB":
        img = img.convert("RGB")
    img = ImageOps.fit(img, (width, height), method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))
    return np.asarray(img, dtype=np.uint8).copy()


# ----------------------------------------------------------------------------------------------
# Audio


def resample(audio: np.ndarray, rate_in: int, rate_out: int, zeros: int = 16, beta: float = 8.6) -> np.ndarray:
    """Band-limited polyphase resampling with a Kaiser-windowed sinc. (S,) -> (ceil(S * out / in),) float32.

    `zeros` is the number of sinc zero crossings kept each side; the cutoff is 0.95 of the lower
    Nyquist rate, so downsampling removes what would alias. Each output sample is a dot product of
    the input around its exact position with one of `up` precomputed filter phases.
    """
    audio = np.asarray(audio, dtype=np.float32)
    if rate_in == rate_out:
        return audio.copy()
    g = gcd(rate_in, rate_out)
    up, down = rate_out // g, rate_in // g  # output sample n sits at input position n * down / up
    cutoff = 0.95 * min(1.0, up / down)  # as a fraction of the input Nyquist rate
    half = int(np.ceil(zeros / cutoff))  # filter half-width in input samples
    taps = np.arange(-half + 1, half + 1)  # (T,) input offsets relative to floor(position)

    # Filter bank: row p is the kernel for fractional position p / up, normalised to unit DC gain.
    t = taps[None, :] - np.arange(up)[:, None] / up  # (up, T) distance from the exact position
    window = np.i0(beta * np.sqrt(np.clip(1 - (t / half) ** 2, 0, None))) / np.i0(beta)  # Kaiser
    bank = cutoff * np.sinc(cutoff * t) * window
    bank /= bank.sum(axis=1, keepdims=True)

    n_out = -(-len(audio) * up // down)
    pos = np.arange(n_out, dtype=np.int64) * down
    base, phase = pos // up, pos % up  # (n_out,) integer input index and filter phase
    padded = np.pad(audio.astype(np.float64), (half, half))
    out = np.zeros(n_out, dtype=np.float64)
    for j, k in enumerate(taps):  # one gather per tap keeps memory at O(n_out)
        out += padded[base + k + half] * bank[phase, j]
    return out.astype(np.float32)


def load_audio(path: str | Path) -> np.ndarray:
    """Read a WAV/FLAC, downmix to mono by averaging channels, resample to 16 kHz. -> (S,) float32."""
    data, rate = sf.read(str(path), dtype="float32", always_2d=True)  # (S, C)
    mono = data.mean(axis=1)
    return resample(mono, rate, SAMPLE_RATE) if rate != SAMPLE_RATE else mono.astype(np.float32)


def split_chunks(audio: np.ndarray) -> tuple[np.ndarray, int]:
    """Cut 16 kHz audio into request-sized chunks, zero-padding the last one.

    Returns (chunks (N, SAMPLES_PER_CHUNK) float32, n_frames): n_frames = ceil(S * FPS / SAMPLE_RATE)
    is the number of video frames that cover the audio, so the video can be trimmed to its length.
    """
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim != 1 or len(audio) == 0:
        raise ValueError(f"expected non-empty mono audio of shape (S,), got {audio.shape}")
    n_chunks = -(-len(audio) // SAMPLES_PER_CHUNK)
    chunks = np.zeros(n_chunks * SAMPLES_PER_CHUNK, dtype=np.float32)
    chunks[: len(audio)] = audio
    n_frames = -(-len(audio) * FPS // SAMPLE_RATE)
    return chunks.reshape(n_chunks, SAMPLES_PER_CHUNK), n_frames


# ----------------------------------------------------------------------------------------------
# MP4


class Mp4Writer:
    """Incremental H.264 (+ AAC) MP4 writer: `write()` frames as chunks arrive, `close()` finishes.

    The audio track, if any, is known up front; it is encoded alongside the video as far as the
    frames written so far reach, and the rest on close, so the file stays interleaved.

        with Mp4Writer("out.mp4", width=832, height=480, audio=speech) as w:
            for frames in chunks:  # (N, H, W, 3) uint8
                w.write(frames)
    """

    def __init__(self, path: str | Path, width: int, height: int, fps: int = FPS,
                 audio: np.ndarray | None = None, sample_rate: int = SAMPLE_RATE):
        if width % 2 or height % 2:
            raise ValueError(f"yuv420p needs even sizes, got {width}x{height}")
        self.width, self.height, self.fps, self.sample_rate = width, height, fps, sample_rate
        self.frames_written = 0
        self._container = av.open(str(path), mode="w")
        self._video = self._container.add_stream("libx264", rate=fps)
        self._video.width, self._video.height, self._video.pix_fmt = width, height, "yuv420p"
        self._video.options = {"crf": "20", "preset": "veryfast"}
        self._video.codec_context.thread_count = 2
        self._audio_data = None if audio is None else np.asarray(audio, dtype=np.float32).reshape(-1)
        self._audio_pos = 0  # samples of _audio_data already encoded
        self._audio = None
        if self._audio_data is not None:
            self._audio = self._container.add_stream("aac", rate=sample_rate, layout="mono")
        self._closed = False

    def write(self, frames: np.ndarray) -> None:
        """Encode (N, H, W, 3) uint8 frames (or one (H, W, 3) frame)."""
        assert not self._closed, "write() after close()"
        frames = np.asarray(frames)
        if frames.ndim == 3:
            frames = frames[None]
        if frames.dtype != np.uint8 or frames.shape[1:] != (self.height, self.width, 3):
            raise ValueError(f"expected (N, {self.height}, {self.width}, 3) uint8, got {frames.shape} {frames.dtype}")
        for rgb in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame.pts, frame.time_base = self.frames_written, Fraction(1, self.fps)
            self._container.mux(self._video.encode(frame))
            self.frames_written += 1
        self._encode_audio(until=self.frames_written * self.sample_rate // self.fps)

    def _encode_audio(self, until: int | None) -> None:
        """Encode audio samples [_audio_pos, until) (None: to the end)."""
        if self._audio is None:
            return
        end = len(self._audio_data) if until is None else min(until, len(self._audio_data))
        if end <= self._audio_pos:
            return
        frame = av.AudioFrame.from_ndarray(self._audio_data[None, self._audio_pos:end], format="flt", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = self.sample_rate, self._audio_pos, Fraction(1, self.sample_rate)
        self._container.mux(self._audio.encode(frame))
        self._audio_pos = end

    def close(self) -> None:
        """Encode the remaining audio, flush both encoders and write the MP4 index."""
        if self._closed:
            return
        self._closed = True
        try:
            self._container.mux(self._video.encode(None))
            if self._audio is not None:
                self._encode_audio(until=None)
                self._container.mux(self._audio.encode(None))
        finally:
            self._container.close()

    def __enter__(self) -> "Mp4Writer":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def read_mp4(path: str | Path) -> tuple[np.ndarray, float, np.ndarray | None, int | None]:
    """Decode an MP4 -> (frames (N, H, W, 3) uint8, fps, audio (S,) float32 mono or None, audio rate or None)."""
    with av.open(str(path)) as container:
        video = container.streams.video[0]
        fps = float(video.average_rate)
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video)])
    with av.open(str(path)) as container:
        if not container.streams.audio:
            return frames, fps, None, None
        stream = container.streams.audio[0]
        # Packed or planar float; to_ndarray gives (C, n) for planar and (1, n * C) for packed.
        parts = [f.to_ndarray().reshape(len(f.layout.channels), -1) if f.format.is_planar
                 else f.to_ndarray().reshape(-1, len(f.layout.channels)).T for f in container.decode(stream)]
        audio = np.concatenate(parts, axis=1).mean(axis=0).astype(np.float32)
        return frames, fps, audio, stream.rate
