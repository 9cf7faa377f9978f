"""Failover in the shipped client against real tritonservers (tiny preset, CPU): a stream whose replica
is killed, stops or is full continues by itself, every chunk exactly once, with the frames of an
uninterrupted run.

"The same address" without a gateway: the gRPC target `ipv4:127.0.0.1:A,127.0.0.1:B` (pick_first)
reaches the victim A while it listens and the survivor B once A is gone. Both share the snapshot key.
Run with -s to see each failover's figures (cause, chunks replayed, the viewer's gap).
"""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from conftest import metrics, ref_image, run_stream, speech_chunks, start_server, url
from test_reliability import assert_frames_match
from flowact.benchmarks.loadgen import LoadSpec, run_point, summarise
from flowact.client.stream import AvatarStream, FailoverPolicy, StreamError
from flowact.contract import DRAIN_EVACUATE, DRAIN_FILE_ENV, SNAPSHOT_KEY_ENV
from flowact.presets import SAMPLE_RATE
from flowact.serving.cli import metric_value
from flowact.snapshot import max_snapshot_bytes

KEY = "test-snapshot-key-failover-0123456789"
CHUNKS = 12
MAX_KILL_GAP_S = 1.5  # issue 20: the viewer's gap when its replica is SIGKILLed, tiny


def launch(tmp, onnx_dir, capacity: int):
    # open streams hold Triton's shutdown for its whole exit timeout: 3 s here
    return start_server(tmp, onnx_dir, capacity, idle_ttl_s=3.0, extra_env={SNAPSHOT_KEY_ENV: KEY},
                        extra_args=["--exit-timeout-secs=3"])


@pytest.fixture(scope="module")
def survivor(tmp_path_factory, onnx_dir):
    srv = launch(tmp_path_factory.mktemp("survivor"), onnx_dir, capacity=2)
    yield srv
    srv.stop()


@pytest.fixture
def victim(tmp_path, onnx_dir):
    srv = launch(tmp_path, onnx_dir, capacity=4)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def reference(tiny, tiny_runners):
    """The uninterrupted run of the test stream, in process."""
    chunks = speech_chunks(CHUNKS, seed=3)
    return chunks, run_stream(tiny, tiny_runners, 3, chunks, ref_image(tiny, 3))


def both(victim, survivor) -> str:
    """One gRPC target: the victim while it listens, then the survivor (pick_first)."""
    return f"ipv4:127.0.0.1:{victim.grpc_port},127.0.0.1:{survivor.grpc_port}"


def resumed(srv) -> float:
    return metric_value(metrics(srv), "flowact_streams_resumed_total") or 0.0


def stream_with(target: str, tiny, chunks, on_chunk, policy=FailoverPolicy()):
    with AvatarStream(target, failover=policy, timeout_s=30) as stream:
        return stream.run(ref_image(tiny, 3), chunks, seed=3, realtime=True, on_chunk=on_chunk)


def report(name, result) -> None:
    for f in result.failovers:
        print(f"\n{name}: {f.cause} at chunk {f.at_chunk}, resumed from {f.resumed_from}, {f.replayed} replayed, "
              f"{f.attempts} START(s), gap {f.gap_s * 1000:.0f} ms")


@pytest.mark.parametrize("snapshot_every", [4, 0], ids=["snapshots", "replay-from-0"])
def test_a_killed_replica_fails_over_with_every_chunk_once(victim, survivor, tiny, reference, snapshot_every):
    """SIGKILL of the victim's whole process group after chunk 6: the stream continues on the survivor
    from its snapshot after chunk 4 (or, without snapshots, from chunk 0), chunks 5-6 are regenerated
    but not delivered again."""
    chunks, want = reference
    delivered = []
    before = resumed(survivor)

    def on_chunk(frames):
        delivered.append(frames)
        if len(delivered) == 7:
            os.killpg(victim.process.pid, signal.SIGKILL)

    result = stream_with(both(victim, survivor), tiny, chunks, on_chunk, FailoverPolicy(snapshot_every=snapshot_every))
    report(f"SIGKILL (snapshot every {snapshot_every})", result)
    assert len(delivered) == len(result.frames) == CHUNKS
    assert_frames_match(result.frames, want)  # in order: none lost, none twice
    [failover] = result.failovers
    assert failover.cause == "connection lost" and failover.at_chunk == 7
    assert failover.resumed_from == (5 if snapshot_every else 0)
    assert failover.replayed >= 7 - failover.resumed_from
    assert failover.gap_s <= MAX_KILL_GAP_S
    assert resumed(survivor) - before == (1 if snapshot_every else 0)
    if snapshot_every:  # what snapshots cost: one of the preset's fixed size every K chunks
        assert len(result.snapshot) == max_snapshot_bytes(tiny)
        print(f"snapshot {len(result.snapshot):,} bytes every {snapshot_every} chunks = "
              f"{len(result.snapshot) / snapshot_every / result.frames[0].nbytes:.1%} of the frames' bytes")


def test_a_stopping_replica_hands_its_stream_over(victim, survivor, tiny, reference):
    """The victim evacuates (what `flowact serve` does when its drain timeout passed): the stream is told
    to resume on another replica, its STARTs there are refused while the victim still listens, and it
    resumes on the survivor once the victim has stopped."""
    chunks, want = reference
    evacuated = threading.Event()

    def on_chunk(frames):
        if not evacuated.is_set():
            evacuated.set()
            drain_file(victim).write_text(DRAIN_EVACUATE)
            threading.Timer(1.0, victim.stop).start()

    result = stream_with(both(victim, survivor), tiny, chunks, on_chunk)
    report("evacuated", result)
    assert_frames_match(result.frames, want)
    [failover] = result.failovers
    assert failover.cause == "stopping" and failover.at_chunk == 1 and failover.resumed_from == 1
    assert failover.attempts >= 2  # refused ("server is stopping: no new streams") until the victim was gone
    assert "continue it on another replica" in failover.message


def hold(srv, tiny, n: int) -> list[AvatarStream]:
    """n streams started on `srv` and left open: it is full."""
    streams = []
    for k in range(n):
        stream = AvatarStream(url(srv), timeout_s=30)
        stream.send(speech_chunks(1, seed=k)[0], start=True, image=ref_image(tiny, k), seed=k)
        stream.receive()
        streams.append(stream)
    return streams


def rejected(srv) -> float:
    return metric_value(metrics(srv), "flowact_streams_rejected_total") or 0.0


def after_refusals(srv, refusals: int, action) -> threading.Thread:
    """Run `action` once `srv` has refused `refusals` more STARTs (a client is retrying)."""
    target = rejected(srv) + refusals

    def run():
        deadline = time.monotonic() + 60
        while rejected(srv) < target and time.monotonic() < deadline:
            time.sleep(0.05)
        action()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def release(streams: list[AvatarStream]) -> None:
    for stream in streams:
        stream.send(speech_chunks(1)[0], end=True)
        stream.receive()
        stream.close()


def drain_file(srv) -> Path:
    return Path(srv.extra_env[DRAIN_FILE_ENV])


def test_a_full_server_is_retried_with_backoff(survivor, tiny, reference):
    chunks, want = reference
    holders = hold(survivor, tiny, 2)
    releaser = after_refusals(survivor, 2, lambda: release(holders))
    with AvatarStream(url(survivor), failover=FailoverPolicy(), timeout_s=30) as stream:
        result = stream.run(ref_image(tiny, 3), chunks[:4], seed=3)
    releaser.join(timeout=30)
    report("at capacity", result)
    assert_frames_match(result.frames, want[:4])
    [failover] = result.failovers
    assert failover.cause == "capacity" and failover.at_chunk == 0 and failover.resumed_from == 0
    assert failover.attempts >= 2  # the first START and at least one retry refused, then one admitted
    assert "at capacity (2/2 streams)" in failover.message


def test_a_draining_server_is_retried_until_it_admits(survivor, tiny, reference):
    """`flowact drain` (the chart's preStop) refuses new streams; behind a gateway the retry goes to
    another replica, here the same one once its drain has been called off."""
    chunks, want = reference
    drain_file(survivor).write_text("")
    undrain = after_refusals(survivor, 1, drain_file(survivor).unlink)
    with AvatarStream(url(survivor), failover=FailoverPolicy(), timeout_s=30) as stream:
        result = stream.run(ref_image(tiny, 3), chunks[:2], seed=3)
    undrain.join(timeout=30)
    report("draining", result)
    assert_frames_match(result.frames, want[:2])
    [failover] = result.failovers
    assert failover.cause == "draining" and "retry on another replica" in failover.message


def test_the_load_generator_fails_over_and_counts_it(survivor, tiny):
    """Three paced streams on a server for two: the third is refused, and retries until one has ended."""
    spec = LoadSpec(url(survivor), "tiny", ref_image(tiny), np.concatenate(speech_chunks(4)), jitter_buffer=0.2)
    point = summarise(run_point(spec, 3, duration_s=1.0, grace_s=8.0), 0.2)
    assert point["errors"] == [] and point["missing_chunks"] == 0 and point["chunks"] == 3 * 3
    assert point["failovers"] == 1


def flowact_stream(srv, tmp_path, *flags):
    wav = tmp_path / "speech.wav"
    sf.write(wav, np.concatenate(speech_chunks(3)), SAMPLE_RATE)
    return subprocess.run([sys.executable, "-m", "flowact.cli", "stream", "--url", url(srv), "--audio", str(wav),
                           "--out", str(tmp_path / "out.mp4"), *flags], capture_output=True, text=True, timeout=120)


def test_flowact_stream_fails_over_by_default_and_not_with_no_failover(survivor, tiny, tmp_path):
    holders = hold(survivor, tiny, 2)
    refused = flowact_stream(survivor, tmp_path, "--no-failover")
    releaser = after_refusals(survivor, 1, lambda: release(holders))  # the default run's first START
    done = flowact_stream(survivor, tmp_path)
    releaser.join(timeout=30)
    assert refused.returncode != 0 and "at capacity (2/2 streams)" in refused.stderr
    assert done.returncode == 0, done.stderr
    assert "failover at chunk 0: capacity; resumed from chunk 0" in done.stdout, done.stdout
    print("\n" + done.stdout.strip().splitlines()[-1])


def test_without_failover_a_killed_replica_raises(victim, tiny, reference):
    chunks, _ = reference
    killed = threading.Event()

    def kill(frames):
        if not killed.is_set():
            killed.set()
            os.killpg(victim.process.pid, signal.SIGKILL)

    with AvatarStream(url(victim), timeout_s=30) as stream:  # the library's default: no failover
        with pytest.raises(StreamError, match="connection to the server lost"):
            stream.run(ref_image(tiny, 3), chunks, seed=3, realtime=True, on_chunk=kill)


def test_the_refusals_of_a_replica_going_away_name_their_cause():
    """What tritonserver and the stream model answer while a replica goes away (verbatim), and what is not."""
    from flowact.client.stream import refusal_cause

    assert refusal_cause("in ensemble 'flowact', server is stopping: no new streams; retry on another replica") == "stopping"
    assert refusal_cause("Server is stopping, scheduler for model has stopped accepting new inference requests") == "stopping"
    assert refusal_cause("Request for unknown model: 'flowact' has no available versions") == "stopping"
    assert refusal_cause("at capacity (2/2 streams): retry later or on another replica") == "capacity"
    assert refusal_cause("Stub process 'stream_0_0' is not healthy.") == "replica failed"
    assert refusal_cause("REF_IMAGE: shape must be (64, 64, 3)") is None
    assert refusal_cause("Request for unknown model: 'flowakt' is not found") is None  # a typo fails at once
