"""`flowact serve` keeps its word when it stops and says why when it cannot start, against the real
launcher and tritonserver (tiny preset, CPU): SIGTERM drains, a killed launcher takes the server
with it, startup failures name their cause, oversized requests leave memory bounded. Figures are
printed; run with -s to see them."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from conftest import ref_image, speech_chunks, start_server, url
from flowact.client.stream import AvatarStream, StreamError
from flowact.contract import LAUNCHER_GUARD_KILL_S, SNAPSHOT_KEY_ENV
from flowact.presets import get_preset
from flowact.serving.processes import Stub, free_ports, shm_regions
from flowact.serving.server import TritonServer
from flowact.serving.startup import StartupError

TINY = get_preset("tiny")
KEY = "test-snapshot-key-0123456789abcdef"


@pytest.fixture(scope="module")
def repository(tmp_path_factory, onnx_dir):
    from flowact.serving.repository import RepositoryOptions, build_embedded_repository

    return build_embedded_repository("tiny", tmp_path_factory.mktemp("lifecycle") / "repo",
                                     opts=RepositoryOptions(capacity=4, idle_ttl_s=10.0), onnx_dir=onnx_dir)


class Serve:
    """`flowact serve` as a user runs it, in its own session (so that its whole group can be killed)."""

    def __init__(self, repository: Path, tmp: Path, *args: str, env: dict | None = None):
        self.http, self.grpc, self.metrics, self.health = free_ports(4)
        self.env = dict(os.environ, FLOWACT_DRAIN_FILE=str(tmp / "draining"), **(env or {}))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "flowact.cli", "serve", "--preset", "tiny", "--repository", str(repository),
             "--work-dir", str(tmp / "triton"), "--grpc-port", str(self.grpc), "--http-port", str(self.http),
             "--metrics-port", str(self.metrics), "--health-port", str(self.health), *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self.env, start_new_session=True)
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())

    def wait_serving(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not any(line.startswith("flowact serving") for line in self.lines):
            assert self.proc.poll() is None, self.proc.stderr.read()
            assert time.monotonic() < deadline, "flowact serve did not start"
            time.sleep(0.1)

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.grpc}"

    def server_processes(self) -> list[psutil.Process]:
        return [p for p in psutil.Process(self.proc.pid).children(recursive=True)
                if "tritonserver" in p.name() or "triton_python_backend_stub" in " ".join(p.cmdline()[:1])]

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def ports_free(*ports: int) -> bool:
    for port in ports:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return False
    return True


# --- stops ------------------------------------------------------------------------------------------


def test_sigterm_drains_active_streams_then_evacuates_and_stops(repository, tmp_path, tiny):
    """Drain timeout 8 s: a short stream finishes, a new START is refused ("server is stopping"), a long
    stream is told to resume elsewhere (it holds its last snapshot), then Triton stops."""
    serve = Serve(repository, tmp_path, "--drain-timeout", "8", env={SNAPSHOT_KEY_ENV: KEY})
    try:
        serve.wait_serving()
        results, errors, first = {}, {}, {"short": threading.Event(), "long": threading.Event()}
        streams = {}

        def run(name, n):
            stream = streams[name] = AvatarStream(serve.url, want_snapshots=True, timeout_s=30)
            try:
                results[name] = stream.run(ref_image(tiny), speech_chunks(n), seed=1, realtime=True,
                                           on_chunk=lambda frames: first[name].set())
            except StreamError as e:
                errors[name] = (str(e), time.monotonic())

        threads = [threading.Thread(target=run, args=("short", 10)), threading.Thread(target=run, args=("long", 60))]
        for t in threads:
            t.start()
        assert first["short"].wait(60) and first["long"].wait(60)
        t_term = time.monotonic()
        serve.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with AvatarStream(serve.url) as late:
            with pytest.raises(StreamError, match="server is stopping: no new streams"):
                late.run(ref_image(tiny), speech_chunks(1))
        for t in threads:
            t.join(timeout=60)
        assert len(results["short"].frames) == 10, errors  # finished within the drain timeout
        message, t_told = errors["long"]
        assert "server is stopping" in message and "RESUME" in message, message
        assert streams["long"].snapshot is not None  # the state after its last chunk: resume elsewhere
        assert serve.proc.wait(timeout=60) == 0
        t_exit = time.monotonic()
        print(f"\nSIGTERM drain: long stream told to resume after {t_told - t_term:.1f} s (timeout 8 s), "
              f"flowact serve exited {t_exit - t_term:.1f} s after SIGTERM")
        assert 8.0 <= t_told - t_term <= 8.0 + 5.0
        assert t_exit - t_term < 8.0 + 2.0 + 13.0 + 10.0  # drain, evacuation grace, Triton's exit timeout + linger
        assert ports_free(serve.grpc, serve.http, serve.metrics)
        assert not (tmp_path / "draining").exists()  # a server that is gone leaves no drain behind
    finally:
        for s in streams.values():
            s.close()
        serve.kill()


def test_a_killed_launcher_takes_tritonserver_and_its_stubs_with_it(repository, tmp_path, tiny):
    before = shm_regions()
    serve = Serve(repository, tmp_path)
    try:
        serve.wait_serving()
        with AvatarStream(serve.url) as stream:  # an open gRPC stream holds a SIGTERMed tritonserver forever
            stream.run(ref_image(tiny), speech_chunks(1), end=False)
            procs = serve.server_processes()
            assert len(procs) >= 3  # tritonserver and its 2 stubs (stream, vae_decoder)
            ours = shm_regions() - before
            t0 = time.monotonic()
            os.killpg(serve.proc.pid, signal.SIGKILL)  # the launcher's whole group: the server is in its own session
            serve.proc.wait()
            # the guard unlinks the stubs' regions after it has killed them: wait for both
            while ((any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in procs) or ours & shm_regions())
                   and time.monotonic() - t0 < 15):
                time.sleep(0.05)
            gone = time.monotonic() - t0
        print(f"\nlauncher SIGKILL: tritonserver and {len(procs) - 1} stubs gone after {gone:.1f} s")
        assert gone <= LAUNCHER_GUARD_KILL_S + 4.0  # SIGTERM, SIGKILL after the guard's wait, reaping (a loaded CI)
        assert ports_free(serve.grpc, serve.http, serve.metrics)
        assert not ours & shm_regions()  # the stubs' shared memory is gone too
    finally:
        serve.kill()


# --- startup failures --------------------------------------------------------------------------------


def test_a_short_snapshot_key_fails_naming_it(repository, tmp_path):
    serve = Serve(repository, tmp_path, env={SNAPSHOT_KEY_ENV: "short"})
    assert serve.proc.wait(timeout=120) == 1
    first = serve.proc.stderr.read().splitlines()[0]
    assert "FLOWACT_SNAPSHOT_KEY must be at least 16 bytes" in first, first


def test_a_busy_port_fails_naming_it(repository, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        serve = Serve(repository, tmp_path, "--http-port", str(port))
        assert serve.proc.wait(timeout=120) == 1
    first = serve.proc.stderr.read().splitlines()[0]
    assert f"HTTP port {port} on 127.0.0.1 is already in use" in first, first


def test_a_model_that_fails_to_load_is_named(repository, tmp_path):
    broken = tmp_path / "repo"
    shutil.copytree(repository, broken)
    config = broken / "stream" / "config.pbtxt"
    config.write_text(config.read_text().replace('string_value: "tiny"', 'string_value: "no-such-preset"'))
    http, grpc, metrics_port = free_ports(3)
    server = TritonServer(broken, grpc, http, metrics_port, work_dir=tmp_path / "triton")
    with pytest.raises(StartupError) as e:
        server.start(timeout_s=120)
    lines = str(e.value).splitlines()
    assert "exited with code" in lines[0]
    assert any("stream" in line and "no-such-preset" in line for line in lines[1:9]), str(e.value)[:2000]


def test_a_missing_libpython_is_named_before_launch(tmp_path, monkeypatch):
    from flowact.serving import startup

    monkeypatch.setattr(startup, "find_libpython", lambda env, version=None: None)
    http, grpc, metrics_port = free_ports(3)
    with pytest.raises(StartupError, match=r"^libpython3\.\d+\.so not found"):
        TritonServer(tmp_path, grpc, http, metrics_port, work_dir=tmp_path / "triton").start(timeout_s=5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where no CUDA device is visible")
def test_a_gpu_repository_without_a_gpu_is_named_before_launch(tmp_path):
    from flowact.presets import get_preset
    from flowact.serving.repository import RepositoryOptions, Target, render_repository

    repo = render_repository(get_preset("tiny"), Target.TORCH, tmp_path / "repo", opts=RepositoryOptions(device="cuda:0"))
    http, grpc, metrics_port = free_ports(3)
    with pytest.raises(StartupError, match=r"^the repository's models run on cuda:0, but .* here: serve it on a GPU"):
        TritonServer(repo, grpc, http, metrics_port, work_dir=tmp_path / "triton").start(timeout_s=5)


def test_gpu_load_failures_are_causes_not_cpu_noise():
    """CUDA lines are noise on a CPU machine, except where a model failed to load because of them."""
    from flowact.serving.startup import cause_lines

    log = ['W1202 07:04:09.0 1 pinned_memory_manager.cc:273] "Unable to allocate pinned system memory, CUDA error"',
           'E1202 07:04:09.1 1 server.cc:241] "CudaDriverHelper has not been initialized."',
           'E1202 07:04:09.2 1 model_lifecycle.cc:642] "failed to load \'stream\' version 1: Invalid argument: '
           'instance group stream_0 of model stream specifies invalid or unsupported gpu id 0."']
    assert cause_lines(log) == [log[2]]


def test_a_stepped_wall_clock_does_not_kill_a_live_stub(monkeypatch):
    """A stub's identity must survive a wall-clock step: psutil's wall-clock create_time moves with
    /proc/stat's btime (here shifted by 1 s, as a VM's clock sync does), and a watchdog that compared it
    once stopped two healthy servers in CI at the same instant. A real exit is still seen."""
    proc = subprocess.Popen(["sleep", "60"])
    try:
        stub = Stub("stream", "region", psutil.Process(proc.pid))
        started = stub.process.create_time()  # wall-clock seconds
        real_btime = psutil._pslinux.boot_time()
        monkeypatch.setattr(psutil._pslinux, "boot_time", lambda: real_btime + 1.0)
        assert psutil.Process(proc.pid).create_time() == started + 1.0  # the step moves a wall-clock identity
        assert stub.alive()
    finally:
        proc.kill()
        proc.wait()
    assert not stub.alive()


# --- oversized requests ------------------------------------------------------------------------------


def test_oversized_requests_leave_memory_bounded(tmp_path, onnx_dir):
    """RESUME has fixed dims: Triton refuses other sizes before the stream model (its /dev/shm region
    never grows). PROMPT is BYTES, whose length Triton does not bound: requests up to the gateway cap
    (8 MiB) fit the stubs' regions. tritonserver's own RSS (gRPC buffers) grows with the largest
    message and stays there, not with the count."""
    import collections

    import tritonclient.grpc as grpcclient

    srv = start_server(tmp_path, onnx_dir, capacity=2)
    try:
        main = next(p for p in psutil.Process(srv.process.pid).children() if "tritonserver" in p.name())
        regions = [Path("/dev/shm") / s.shm_region for s in srv.stubs.values()]
        shm = lambda: sum(r.stat().st_size for r in regions) / 2**20  # noqa: E731
        rss = lambda: main.memory_info().rss / 2**20  # noqa: E731
        client = grpcclient.InferenceServerClient(url(srv))
        answers, event = collections.deque(), threading.Event()
        client.start_stream(callback=lambda result, error: (answers.append(error), event.set()))

        def send(sid, inputs):
            event.clear()
            client.async_stream_infer("flowact", inputs, sequence_id=sid, sequence_start=True, sequence_end=True)
            assert event.wait(60)
            error = answers.popleft()
            return None if error is None else error.message()

        def t(name, array, dtype):
            x = grpcclient.InferInput(name, list(array.shape), dtype)
            x.set_data_from_numpy(array)
            return x

        audio = t("AUDIO", speech_chunks(1)[0][None], "FP32")
        image = t("REF_IMAGE", ref_image(TINY)[None], "UINT8")
        for i in range(3):
            assert send(f"warm-{i}", [audio, image]) is None
        shm0, rss0 = shm(), rss()
        resume = t("RESUME", np.zeros((1, 16 * 2**20), np.uint8), "UINT8")
        for i in range(100):
            error = send(f"resume-{i}", [audio, resume])
            assert "unexpected shape for input 'RESUME'" in error, error
        shm1, rss1 = shm(), rss()
        prompt = t("PROMPT", np.array([[b"x" * (4 * 2**20)]], dtype=np.object_), "BYTES")
        for i in range(100):
            error = send(f"prompt-{i}", [audio, image, prompt])
            assert "PROMPT: 4194304 bytes is far too long" in error, error
        shm2, rss2 = shm(), rss()
        client.stop_stream()
        print(f"\noversized: stubs' /dev/shm {shm0:.0f} -> {shm1:.0f} MiB after 100 x 16 MiB RESUME -> {shm2:.0f} MiB "
              f"after 100 x 4 MiB PROMPT; tritonserver RSS {rss0:.0f} -> {rss1:.0f} -> {rss2:.0f} MiB")
        assert shm1 == shm0 and shm2 == shm0
        assert rss1 - rss0 < 8 * 16 + 64 and rss2 - rss0 < 8 * 16 + 64  # a few messages' worth, not 100
    finally:
        srv.stop()
