"""flowact.media: image/audio loading, resampling, chunking and the MP4 round trip (no model)."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from flowact.media import REFERENCE_IMAGE, SPEECH_WAV, Mp4Writer, load_audio, load_image, read_mp4, resample, split_chunks
from flowact.presets import FPS, SAMPLE_RATE, SAMPLES_PER_CHUNK


def _gradient_frames(n: int, height: int, width: int) -> np.ndarray:
    """Smooth test video: red ramps left->right, green top->bottom, blue with time. -> (n, H, W, 3) uint8."""
    yy, xx = np.mgrid[:height, :width]
    frames = np.empty((n, height, width, 3), dtype=np.uint8)
    frames[..., 0] = xx * 255 // (width - 1)
    frames[..., 1] = yy * 255 // (height - 1)
    frames[..., 2] = (np.arange(n) * 255 // max(n - 1, 1))[:, None, None]
    return frames


def test_load_image_crops_and_resizes(tmp_path):
    assert load_image(REFERENCE_IMAGE, 64, 64).shape == (64, 64, 3)
    # A wide RGBA image, left half red, right half blue: the center crop to a tall aspect keeps
    # both colours (one at each edge) and drops the alpha channel.
    rgba = np.zeros((100, 300, 4), dtype=np.uint8)
    rgba[:, :150, 0], rgba[:, 150:, 2], rgba[..., 3] = 255, 255, 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "wide.png")
    img = load_image(tmp_path / "wide.png", height=64, width=32)
    assert img.shape == (64, 32, 3) and img.dtype == np.uint8
    assert img[:, 0, 0].min() > 200 and img[:, -1, 2].min() > 200  # red left edge, blue right edge


def test_load_shipped_speech():
    audio = load_audio(SPEECH_WAV)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert sf.info(str(SPEECH_WAV)).samplerate == SAMPLE_RATE
    assert 8.0 < len(audio) / SAMPLE_RATE < 12.0
    assert np.sqrt(np.mean(audio**2)) > 0.03 and np.abs(audio).max() <= 1.0


def test_resample_sine_keeps_frequency_and_length(tmp_path):
    rate, seconds, freq = 44_100, 2, 1_000
    t = np.arange(rate * seconds) / rate
    stereo = np.stack([np.sin(2 * np.pi * freq * t), np.sin(2 * np.pi * freq * t)], axis=1) * 0.5
    sf.write(str(tmp_path / "sine.wav"), stereo, rate, subtype="FLOAT")
    audio = load_audio(tmp_path / "sine.wav")  # downmix + 44.1 kHz -> 16 kHz
    assert len(audio) == SAMPLE_RATE * seconds
    ideal = 0.5 * np.sin(2 * np.pi * freq * np.arange(len(audio)) / SAMPLE_RATE)
    err = np.abs(audio - ideal)[200:-200]  # edges see the zero padding
    assert err.max() < 1e-3, f"max {err.max():.2e}, mean {err.mean():.2e}"
    spectrum = np.abs(np.fft.rfft(audio))
    assert np.fft.rfftfreq(len(audio), 1 / SAMPLE_RATE)[spectrum.argmax()] == freq
    # A 10 kHz tone is above the new Nyquist rate (8 kHz): it must be filtered out, not aliased.
    alias = resample(np.sin(2 * np.pi * 10_000 * t).astype(np.float32), rate, SAMPLE_RATE)
    assert np.sqrt(np.mean(alias[200:-200] ** 2)) < 1e-3


@pytest.mark.parametrize("n_samples, n_chunks, n_frames", [
    (SAMPLES_PER_CHUNK * 3, 3, 36),
    (SAMPLES_PER_CHUNK * 3 + 1, 4, 37),
    (1, 1, 1),
    (SAMPLE_RATE, 3, FPS),  # 1 s: 25 frames in 3 chunks (36 frames) -> trimmed to 25
])
def test_split_chunks(n_samples, n_chunks, n_frames):
    audio = np.arange(1, n_samples + 1, dtype=np.float32)
    chunks, frames = split_chunks(audio)
    assert chunks.shape == (n_chunks, SAMPLES_PER_CHUNK) and chunks.dtype == np.float32
    assert frames == n_frames
    np.testing.assert_array_equal(chunks.reshape(-1)[:n_samples], audio)
    assert not chunks.reshape(-1)[n_samples:].any()


def test_split_chunks_rejects_empty():
    with pytest.raises(ValueError):
        split_chunks(np.zeros(0, dtype=np.float32))


def test_mp4_round_trip(tmp_path):
    height, width = 64, 96
    frames = _gradient_frames(FPS, height, width)
    audio = (0.5 * np.sin(2 * np.pi * 440 * np.arange(SAMPLE_RATE) / SAMPLE_RATE)).astype(np.float32)
    path = tmp_path / "out.mp4"
    with Mp4Writer(path, width=width, height=height, audio=audio) as writer:
        writer.write(frames[:12])  # two calls, as a streaming client writes chunks
        writer.write(frames[12:])

    video, fps, decoded, rate = read_mp4(path)
    assert fps == FPS and rate == SAMPLE_RATE
    assert video.shape == frames.shape and video.dtype == np.uint8
    mae = np.abs(video.astype(np.int16) - frames).mean()
    assert mae < 3.0, f"video mean abs error {mae:.2f} (measured 1.84, max 11, at crf 20)"

    # AAC decodes in 1024-sample frames: the tail is padded, the start is aligned (priming skipped).
    assert len(audio) <= len(decoded) < len(audio) + 2048
    settled = slice(2048, len(audio))  # the encoder's first two frames are rougher
    rms = np.sqrt(np.mean((decoded[settled] - audio[settled]) ** 2))
    assert rms < 0.01, f"audio rms error {rms:.4f} (measured ~2e-4)"


def test_mp4_without_audio(tmp_path):
    path = tmp_path / "silent.mp4"
    with Mp4Writer(path, width=32, height=32) as writer:
        writer.write(_gradient_frames(5, 32, 32))
    video, fps, audio, rate = read_mp4(path)
    assert video.shape == (5, 32, 32, 3) and fps == FPS and audio is None and rate is None
