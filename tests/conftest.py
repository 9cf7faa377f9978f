import numpy as np
import pytest
import torch

from flowact.engine import Engines, StreamSession
from flowact.networks import build_networks
from flowact.presets import SAMPLES_PER_CHUNK, get_preset

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny():
    return get_preset("tiny")


@pytest.fixture(scope="session")
def tiny_nets(tiny):
    return build_networks(tiny, seed=0)


@pytest.fixture(scope="session")
def tiny_engines(tiny_nets):
    return Engines.from_networks(tiny_nets)


@pytest.fixture(scope="session")
def onnx_dir(tmp_path_factory, tiny, tiny_nets):
    """The tiny preset's networks exported to ONNX once per test run (seed 0, like tiny_nets)."""
    from flowact.export.onnx import export_onnx

    root = tmp_path_factory.mktemp("onnx")
    export_onnx(tiny, root, nets=tiny_nets, say=lambda msg: None)
    return root


def ref_image(preset, seed: int = 0) -> np.ndarray:
    """A smooth random reference image (H, W, 3) uint8."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (preset.height // 8, preset.width // 8, 3)).astype(np.uint8)
    return coarse.repeat(8, axis=0).repeat(8, axis=1)


def speech_chunks(n: int, seed: int = 0) -> list[np.ndarray]:
    """n chunks of speech-like audio: a modulated tone plus noise, float32 (7680,) each."""
    rng = np.random.default_rng(seed)
    t = np.arange(n * SAMPLES_PER_CHUNK) / 16_000
    audio = 0.3 * np.sin(2 * np.pi * 180 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)) + 0.02 * rng.standard_normal(t.shape)
    return list(audio.astype(np.float32).reshape(n, SAMPLES_PER_CHUNK))


def run_session(preset, engines, seed: int, chunks, image=None) -> np.ndarray:
    session = StreamSession(preset, engines)
    session.start(ref_image(preset) if image is None else image, seed=seed)
    return np.stack([session.step(c) for c in chunks])  # (N, 12, H, W, 3)
