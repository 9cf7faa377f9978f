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


def test_each_server_has_its_own_private_drain_file_written_without_following_links(tmp_path, monkeypatch):
    from flowact.serving.drain import drain_file, private_dir, read_state, write_state

    monkeypatch.delenv("FLOWACT_DRAIN_FILE", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    a, b = drain_file(8002), drain_file(9002)
    assert a != b and a.parent == b.parent == private_dir()
    assert (a.parent.stat().st_mode & 0o777) == 0o700
    victim = tmp_path / "victim"
    victim.write_text("root-owned secret")
    a.symlink_to(victim)  # planted: the writer must replace the link, never write through it
    write_state(a, "")
    assert victim.read_text() == "root-owned secret" and not a.is_symlink() and read_state(a) == ""
    assert read_state(b) is None  # the other server admits
    a.parent.chmod(0o755)  # a directory others can enter is refused, naming why
    with pytest.raises(PermissionError, match="not a private directory"):
        drain_file(8002)


def test_drain_exits_nonzero_at_its_deadline_and_can_be_cancelled(tmp_path, onnx_dir, tiny, monkeypatch):
    from flowact.serving.drain import drain_file

    run = tmp_path / "run"
    env = dict(os.environ, XDG_RUNTIME_DIR=str(run))
    env.pop("FLOWACT_DRAIN_FILE", None)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(run))
    monkeypatch.delenv("FLOWACT_DRAIN_FILE", raising=False)
    server = start_server(tmp_path, onnx_dir, capacity=2, by_port=True)
    flag = drain_file(server.metrics_port)
    metrics_url = ["--metrics-url", f"http://127.0.0.1:{server.metrics_port}/metrics"]
    probe = ["probe", "ready", "--http-url", f"http://127.0.0.1:{server.http_port}", *metrics_url]
    try:
        with AvatarStream(url(server)) as stream:
            stream.send(speech_chunks(1)[0], start=True, image=ref_image(tiny), seed=0)
            stream.receive()  # one stream active, held open
            drained = flowact("drain", "--deadline", "2", *metrics_url, env=env)
            assert drained.returncode == 1 and "1 stream(s) still active" in drained.stdout, drained.stdout
            assert flag.exists() and flowact(*probe, env=env).returncode == 1
            with AvatarStream(url(server)) as refused:
                with pytest.raises(StreamError, match="draining"):
                    refused.run(ref_image(tiny), speech_chunks(1), seed=0)
            cancelled = flowact("drain", "--cancel", *metrics_url, env=env)
            assert cancelled.returncode == 0 and "drain cancelled" in cancelled.stdout and not flag.exists()
            assert flowact(*probe, env=env).returncode == 0
            with AvatarStream(url(server)) as admitted:
                assert len(admitted.run(ref_image(tiny), speech_chunks(1), seed=0).frames) == 1
    finally:
        server.stop()
