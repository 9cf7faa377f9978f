"""The torch target end to end on a real tritonserver, device=cpu: the same code path that runs on
CUDA in bf16 (networks inside the stream model, beside a pool of per-stream state; vae_decoder a
torch network model), checked against the in-process session."""

import threading

import numpy as np
import pytest

from conftest import ref_image, run_stream, speech_chunks, url
from flowact.client.stream import AvatarStream
from flowact.serving.repository import RepositoryOptions, Target, render_repository
from flowact.serving.processes import free_ports
from flowact.serving.server import TritonServer


@pytest.fixture(scope="module")
def torch_server(tmp_path_factory, tiny):
    tmp = tmp_path_factory.mktemp("torch_target")
    # no checkpoint: seeded random weights (seed 0), the same as the tiny_nets fixture
    repo = render_repository(tiny, Target.TORCH, tmp / "repo", opts=RepositoryOptions(capacity=3, idle_ttl_s=20.0))
    http, grpc, metrics_port = free_ports(3)
    srv = TritonServer(repo, grpc, http, metrics_port, work_dir=tmp / "triton",
                       extra_env={"FLOWACT_DRAIN_FILE": str(tmp / "draining")}).start(timeout_s=180)
    yield srv
    srv.stop()


def test_torch_target_frames_equal_in_process(torch_server, tiny, tiny_runners):
    """Two streams, the second joining when the first's memory is full: a batch with one mask-free
    and one masked group, memory refinement inside the server; each equals its in-process run."""
    chunks = {1: speech_chunks(8, seed=1), 2: speech_chunks(4, seed=2)}
    results = {}

    def run(sid, delay_chunks):
        with AvatarStream(url(torch_server), stream_id=f"torch-{sid}") as stream:
            results[sid] = stream.run(ref_image(tiny, sid), chunks[sid], seed=sid, realtime=True, max_in_flight=1)

    first = threading.Thread(target=run, args=(1, 0))
    first.start()
    second = threading.Timer(4 * 0.48, run, args=(2, 4))
    second.start()
    first.join(120)
    second.join(120)
    for sid in (1, 2):
        want = run_stream(tiny, tiny_runners, sid, chunks[sid], ref_image(tiny, sid))
        diff = np.abs(np.stack(results[sid].frames).astype(int) - want.astype(int))
        print(f"torch target stream {sid}: max {diff.max()} mean {diff.mean():.2e}")
        assert diff.max() <= 1 and diff.mean() < 1e-3
    assert "3 stream slots on cpu (torch)" in torch_server.log_path.read_text()
