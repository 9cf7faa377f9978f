"""`flowact web` keeps a viewer watching when the replica under its session dies (issue 20): a real edge
in front of two real tiny replicas that share a snapshot key, reached as one gRPC target
(`ipv4:A,B`, pick_first: A while it listens, then B, as a gateway would), and an aiortc viewer. A is
SIGKILLed mid-session; the session goes on from its last snapshot on B, the viewer's video keeps
coming, and the edge reports the failover (cause, chunks replayed, the gap) on the data channel."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from conftest import metrics, start_server, wait_for
from flowact.benchmarks.edge_hostile import EdgeProcess
from flowact.contract import ACTIVE_STREAMS, SNAPSHOT_KEY_ENV
from flowact.media import SPEECH_WAV
from flowact.serving.cli import metric_value

KEY = "test-snapshot-key-web-failover-0123456789"


def launch(tmp, onnx_dir):
    return start_server(tmp, onnx_dir, capacity=4, idle_ttl_s=30.0, extra_env={SNAPSHOT_KEY_ENV: KEY},
                        extra_args=["--exit-timeout-secs=3"])


@pytest.fixture
def replicas(tmp_path, onnx_dir):
    victim, survivor = launch(tmp_path / "a", onnx_dir), launch(tmp_path / "b", onnx_dir)
    yield victim, survivor
    victim.stop()
    survivor.stop()


def active(srv) -> float:
    return metric_value(metrics(srv), ACTIVE_STREAMS) or 0.0


def test_a_killed_replica_costs_the_viewer_a_short_gap_not_the_session(replicas, tmp_path):
    from flowact.web.viewer import Viewer

    victim, survivor = replicas
    edge = EdgeProcess(f"ipv4:127.0.0.1:{victim.grpc_port},127.0.0.1:{survivor.grpc_port}", tmp_path / "edge.log")

    async def watch() -> dict:
        v = await Viewer(edge.base, str(SPEECH_WAV), keep_frames=False).connect()
        await asyncio.sleep(3.0)
        seen = {"on_victim": active(victim), "before": len(v.video)}
        killed = time.monotonic()
        os.killpg(victim.process.pid, signal.SIGKILL)
        await asyncio.sleep(5.0)
        after = [t for t, _ in v.video if t > killed]
        seen.update(frames_after=len(after), on_survivor=active(survivor),
                    failovers=[m for m in v.messages if m.get("type") == "failover"],
                    errors=[m for m in v.messages if m.get("type") == "error"],
                    longest_gap=max((b - a for a, b in zip(after, after[1:])), default=99.0))
        seen["delete"] = await v.close()
        return seen

    try:
        seen = asyncio.run(watch())
    finally:
        log = edge.stop()
        print(log)
    print(f"\nweb failover: {seen['failovers']}, longest gap between frames received after the kill "
          f"{seen['longest_gap'] * 1000:.0f} ms")
    assert seen["on_victim"] == 1 and seen["before"] > 50, seen
    assert not seen["errors"] and len(seen["failovers"]) == 1, (seen, log[-2000:])
    failover = seen["failovers"][0]
    assert failover["cause"] == "connection lost" and failover["gap_ms"] < 1500, failover
    assert failover["replayed"] <= 4 + 2, failover  # at most K = 4 chunks since the snapshot, plus those in flight
    assert seen["on_survivor"] == 1 and seen["frames_after"] > 5 * 25 * 0.9, seen  # the video kept its 25 fps
    assert seen["delete"] == 204


def test_the_voice_agent_avatar_fails_over_the_same_way(replicas, tiny):
    """The voice-agent avatar (flowact.integrations.avatar, under Pipecat and LiveKit) runs the same gRPC
    side (flowact.client.live.LiveStream): its replica SIGKILLed mid-speech, its frames go on."""
    import soundfile as sf

    from conftest import ref_image
    from flowact.integrations.avatar import AgentAvatar

    victim, survivor = replicas
    speech, rate = sf.read(SPEECH_WAV, dtype="float32")
    assert rate == 16_000

    async def run() -> dict:
        avatar = AgentAvatar(f"ipv4:127.0.0.1:{victim.grpc_port},127.0.0.1:{survivor.grpc_port}", ref_image(tiny))
        await avatar.start()
        avatar.push_speech(speech)  # (n,) float32, 16 kHz mono
        arrivals: list[float] = []

        async def watch():
            while True:
                await avatar.video.recv()
                arrivals.append(time.monotonic())

        watcher = asyncio.create_task(watch())
        await asyncio.sleep(3.0)
        on_victim = active(victim)
        killed = time.monotonic()
        os.killpg(victim.process.pid, signal.SIGKILL)
        await asyncio.sleep(4.0)
        seen = {"on_victim": on_victim, "on_survivor": active(survivor), "error": avatar.error,
                "failovers": list(avatar.upstream.failovers), "late": avatar.stats.frames_late,
                "frames_after": sum(t > killed for t in arrivals)}
        watcher.cancel()
        await avatar.close()
        return seen

    seen = asyncio.run(run())
    print(f"\navatar failover: {seen['failovers']}")
    assert seen["on_victim"] == 1 and seen["error"] is None, seen
    assert len(seen["failovers"]) == 1 and seen["failovers"][0].gap_s < 1.5, seen
    assert seen["on_survivor"] == 1 and seen["frames_after"] > 4 * 25 * 0.9, seen  # 25 fps held
    wait_for(lambda: active(survivor) == 0, 10, "END to reach the survivor")
