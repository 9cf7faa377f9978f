"""Quality metrics on clips with known answers, and the shipped checkpoints against random weights."""

from pathlib import Path

import numpy as np
import pytest
import torch

from flowact.runtime import Runners
from flowact.engine import StreamEngine
from flowact.networks import build_networks
from flowact.presets import FRAMES_PER_CHUNK, SAMPLES_PER_CHUNK, get_preset
from flowact.train.data import (DEMO_IDENTITY, Motion, audio_envelope, make_clip, render, speech_timeline)
from flowact.train.metrics import (StreamMeter, drift, drift_curve, identity_distance, lip_sync, mouth_opening,
                                   pearson, seam_ratio)

SHIPPED = Path(__file__).resolve().parent.parent / "checkpoints"


@pytest.fixture(scope="module")
def clip(tiny):
    return make_clip(900_123, tiny.height, 12)  # 5.76 s, mouth opening = audio envelope


def test_envelope_is_causal_and_bounded():
    rng = np.random.default_rng(0)
    audio, _ = speech_timeline(rng, 3.0)
    env = audio_envelope(audio)
    assert env.shape == (75,) and env.min() >= 0 and env.max() <= 1 and env.std() > 0.1
    changed = audio.copy()
    changed[640 * 40:] = 0.0  # silence from frame 40 on: earlier frames must not change
    assert np.array_equal(audio_envelope(changed)[:40], env[:40])
    assert audio_envelope(np.zeros(6400, np.float32)).max() == 0.0


def test_lip_sync_known_answers(clip):
    assert lip_sync(clip.frames, clip.audio) > 0.95  # the mouth is exactly the envelope
    shuffled = clip.frames[np.random.default_rng(1).permutation(len(clip.frames))]
    assert abs(lip_sync(shuffled, clip.audio)) < 0.2
    closed = np.repeat(clip.reference[None], len(clip.frames), axis=0)
    assert lip_sync(closed, clip.audio) == 0.0  # constant mouth: no correlation, defined as 0


def test_mouth_opening_is_monotonic(tiny):
    openings = [mouth_opening(render(DEMO_IDENTITY, Motion.still(1, mouth=m), tiny.height))[0] for m in (0, 0.3, 0.6, 1)]
    assert np.all(np.diff(openings) > 0)


def test_identity_drift_known_answers(clip):
    constant = np.repeat(clip.reference[None], 48, axis=0)
    assert np.all(drift_curve(constant, clip.reference) == 0.0)
    assert drift(drift_curve(constant, clip.reference)) == (0.0, 0.0, 0.0)
    # fading to grey drifts away from the reference, monotonically
    fade = np.stack([(clip.reference * (1 - a) + 128 * a).astype(np.uint8) for a in np.linspace(0, 1, 48)])
    curve = drift_curve(fade, clip.reference)
    assert np.all(np.diff(curve) > 0) and drift(curve)[2] > 0.05
    # the mouth and the eyes are masked: an open mouth is not identity drift
    opened = render(DEMO_IDENTITY, Motion.still(1, mouth=1.0), 64)
    assert identity_distance(opened, render(DEMO_IDENTITY, Motion.still(1, mouth=0.0), 64)[0])[0] == 0.0


def test_seam_ratio_known_answers(clip):
    assert 0.8 < seam_ratio(clip.frames) < 1.3  # the renderer's motion is continuous
    jumpy = clip.frames.copy()
    for c in range(1, len(jumpy) // FRAMES_PER_CHUNK, 2):  # every other chunk shifted by 4 pixels
        jumpy[c * FRAMES_PER_CHUNK:(c + 1) * FRAMES_PER_CHUNK] = np.roll(jumpy[c * FRAMES_PER_CHUNK:(c + 1) * FRAMES_PER_CHUNK], 4, axis=2)
    assert seam_ratio(jumpy) > 3.0


def test_stream_meter_equals_whole_video(clip):
    meter = StreamMeter(clip.reference)
    for c in range(clip.chunks):
        meter.add(clip.frames[c * FRAMES_PER_CHUNK:(c + 1) * FRAMES_PER_CHUNK])
    assert meter.lip_sync(clip.audio) == pytest.approx(lip_sync(clip.frames, clip.audio), abs=1e-9)
    assert np.allclose(meter.drift_curve(), drift_curve(clip.frames, clip.reference))
    assert meter.seam_ratio() == pytest.approx(seam_ratio(clip.frames), rel=1e-5)
    assert pearson(np.arange(5), 2 * np.arange(5) + 1) == pytest.approx(1.0)


def stream_lip_sync(preset, nets, clip, seed=0) -> float:
    engine = StreamEngine(preset, Runners.from_networks(nets))
    stream = engine.start(clip.reference, seed=seed, prompt=clip.states[0])
    frames = np.concatenate([engine.step([stream], [clip.audio[c * SAMPLES_PER_CHUNK:(c + 1) * SAMPLES_PER_CHUNK]],
                                         [clip.states[c]])[0] for c in range(clip.chunks)])
    return lip_sync(frames, clip.audio)


@pytest.mark.parametrize("name", ["tiny", "cpu"])
def test_shipped_checkpoint_beats_random_weights(name, tiny, clip):
    """The shipped checkpoint of each trained preset (fp16 files into fp32 modules) lip-syncs a held-out
    clip; seeded random weights do not."""
    preset = get_preset(name)
    if not (SHIPPED / name / "preset.json").is_file():
        pytest.skip(f"no shipped {name} checkpoint")
    held_out = clip if name == "tiny" else make_clip(900_123, preset.height, 8)  # 3.84 s at 128x128
    before = torch.get_num_threads()
    torch.set_num_threads(1 if name == "tiny" else 2)  # batch-1 tiny steps: one thread is fastest
    try:
        trained = build_networks(preset, checkpoint=SHIPPED / name)
        assert next(trained.denoiser.parameters()).dtype == torch.float32
        r_trained = stream_lip_sync(preset, trained, held_out)
        r_random = stream_lip_sync(preset, build_networks(preset, seed=0), held_out)
    finally:
        torch.set_num_threads(before)
    assert r_trained > 0.4 and r_trained > r_random + 0.3, (r_trained, r_random)
