"""Scale-down without cutting streams, against the embedded server: the chart's preStop and readiness
commands (`flowact drain`, `flowact probe ready`) run for real."""

import os
import subprocess
import sys
import threading
import time

import pytest

from conftest import ref_image, speech_chunks, start_server, url
from flowact.client.stream import AvatarStream, StreamError


def flowact(*args, env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flowact.cli", *args], env=env, capture_output=True, text=True, timeout=120)


def test_drain_lets_streams_finish_refuses_new_ones_and_turns_unready(tmp_path, onnx_dir, tiny):
    server = start_server(tmp_path, onnx_dir, capacity=2)
    env = dict(os.environ, FLOWACT_DRAIN_FILE=str(tmp_path / "draining"))
    urls = ["--http-url", f"http://127.0.0.1:{server.http_port}", "--metrics-url", f"http://127.0.0.1:{server.metrics_port}/metrics"]
    try:
        ready = flowact("probe", "ready", *urls, env=env)
        assert ready.returncode == 0, ready.stdout

        in_flight = {}
        first_chunk = threading.Event()

        def long_stream():
            with AvatarStream(url(server), stream_id=1) as stream:
                in_flight["result"] = stream.run(ref_image(tiny), speech_chunks(10), seed=0, realtime=True,
                                                 on_chunk=lambda frames: first_chunk.set())

        thread = threading.Thread(target=long_stream)
        thread.start()
        assert first_chunk.wait(30)
        drain = subprocess.Popen([sys.executable, "-m", "flowact.cli", "drain", "--deadline", "60", "--metrics-url", urls[3]],
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 30
        while not (tmp_path / "draining").exists() and time.monotonic() < deadline:
            time.sleep(0.1)

        not_ready = flowact("probe", "ready", *urls, env=env)
        assert not_ready.returncode == 1 and "draining" in not_ready.stdout
        with pytest.raises(StreamError, match="draining"):
            with AvatarStream(url(server), stream_id=2) as refused:
                refused.run(ref_image(tiny), speech_chunks(1), seed=0)
        assert drain.poll() is None  # still waiting for stream 1

        thread.join(timeout=60)
        assert len(in_flight["result"].frames) == 10  # the stream in flight completed
        out, _ = drain.communicate(timeout=30)
        assert drain.returncode == 0 and "no active streams" in out
    finally:
        server.stop()
