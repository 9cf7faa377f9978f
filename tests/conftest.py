import numpy as np
import pytest
import torch

from flowact.engine import StreamEngine
from flowact.runtime import Runners
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
def tiny_runners(tiny_nets):
    return Runners.from_networks(tiny_nets)


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


def run_stream(preset, runners, seed: int, chunks, image=None) -> np.ndarray:
    """One stream in process: frames (N, 12, H, W, 3) of N chunks."""
    engine = StreamEngine(preset, runners)
    stream = engine.start(ref_image(preset) if image is None else image, seed=seed)
    return np.stack([engine.step([stream], [c])[0] for c in chunks])


def start_server(tmp, onnx_dir, capacity: int = 12, idle_ttl_s: float = 3.0, extra_env=None, by_port: bool = False,
                 **kwargs):
    """A real tiny-preset tritonserver on free loopback ports, with its own drain file under `tmp` (`by_port`:
    the one `flowact serve` gives it, named by its metrics port, flowact.serving.drain)."""
    from flowact.serving.drain import drain_file
    from flowact.serving.repository import RepositoryOptions, build_embedded_repository
    from flowact.serving.processes import free_ports
    from flowact.serving.server import TritonServer

    repo = build_embedded_repository("tiny", tmp / "repo", opts=RepositoryOptions(capacity=capacity, idle_ttl_s=idle_ttl_s),
                                     onnx_dir=onnx_dir)
    http, grpc, metrics_port = free_ports(3)
    env = {"FLOWACT_DRAIN_FILE": str(drain_file(metrics_port) if by_port else tmp / "draining"), **(extra_env or {})}
    return TritonServer(repo, grpc, http, metrics_port, work_dir=tmp / "triton", extra_env=env, **kwargs).start(timeout_s=120)


def wait_for(predicate, timeout_s: float, what: str):
    """Poll `predicate` every 0.1 s until it returns something truthy (-> that), failing the test after `timeout_s`."""
    import time

    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.1)
    return value


def url(srv) -> str:
    return f"127.0.0.1:{srv.grpc_port}"


def metrics(srv) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=5) as r:
        return r.read().decode()
