"""The gateway: two real `flowact serve` replicas (tiny) behind a real `flowact gateway` (Envoy).

Checks the readiness endpoint each replica serves for gateways (and that `flowact probe ready`
says the same), the rendered config against Envoy's own validator, that streams through the
gateway spread over the replicas (each replica's flowact_active_streams), that a drained replica
gets no new streams while its live stream continues through the gateway, and that the gateway
keeps a message over its cap from the replicas.
"""
from __future__ import annotations

import os
import subprocess
import threading
import time

import pytest

from conftest import ref_image, speech_chunks, wait_for
from flowact.benchmarks.fleet import Gateway, ServeReplica, flowact_command, get
from flowact.client.stream import AvatarStream, StreamError
from flowact.contract import DRAIN_FILE_ENV, GATEWAY_MAX_REQUEST_BYTES
from flowact.presets import get_preset
from flowact.serving.repository import RepositoryOptions, build_embedded_repository

CAPACITY = 4


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, onnx_dir):
    tmp = tmp_path_factory.mktemp("gateway")
    repo = build_embedded_repository("tiny", tmp / "repo", opts=RepositoryOptions(capacity=CAPACITY, idle_ttl_s=10.0),
                                     onnx_dir=onnx_dir)
    replicas = [ServeReplica(f"r{i}", repo, tmp / f"r{i}", snapshot_key="k" * 32).start() for i in range(2)]
    gateway = Gateway([r.gateway_replica for r in replicas], tmp / "gateway")
    try:
        for r in replicas:
            r.wait_ready()
        gateway.start(healthy=2)
        yield replicas, gateway
    finally:
        gateway.stop()
        for r in replicas:
            r.stop()


def stream_in_thread(url: str, chunks: int, seed: int, results: dict) -> threading.Thread:
    """A real-time paced stream through `url`; its frames (or error) land in results[seed]. Streams start
    0.3 s apart: STARTs at the same instant on two Envoy workers may both see the same counts."""
    time.sleep(0.3)
    def run():
        try:
            with AvatarStream(url) as s:
                results[seed] = s.run(ref_image(get_preset("tiny")), speech_chunks(chunks, seed), seed=seed, realtime=True)
        except StreamError as e:
            results[seed] = e
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_ready_endpoint_and_probe_agree(fleet):
    replicas, _ = fleet
    r = replicas[0]
    health = f"http://127.0.0.1:{r.ports['health']}"
    probe = flowact_command("probe", "ready", "--http-url", f"http://127.0.0.1:{r.ports['http']}",
                            "--metrics-url", r.metrics_url)
    env = dict(os.environ, **{DRAIN_FILE_ENV: str(r.drain_file)})
    assert get(f"{health}/ready") == (200, f"ready (0/{CAPACITY} streams)\n")
    assert get(f"{health}/live") == (200, "live\n")
    assert get(f"{health}/metrics")[0] == 404
    assert subprocess.run(probe, env=env, capture_output=True, text=True).stdout == f"ready (0/{CAPACITY} streams)\n"
    r.drain_file.touch()
    try:
        assert get(f"{health}/ready") == (503, "not ready: draining\n")
        proc = subprocess.run(probe, env=env, capture_output=True, text=True)
        assert (proc.returncode, proc.stdout) == (1, "not ready: draining\n")
    finally:
        r.drain_file.unlink()
    assert get(f"{health}/ready")[0] == 200


def test_a_full_replica_reads_not_ready(fleet):
    replicas, gateway = fleet
    r = replicas[0]
    results: dict = {}
    streams = [stream_in_thread(f"127.0.0.1:{r.ports['grpc']}", 8, seed, results) for seed in range(10, 10 + CAPACITY)]
    wait_for(lambda: r.active_streams() == CAPACITY, 15, "the replica full")
    assert get(f"http://127.0.0.1:{r.ports['health']}/ready") == (503, f"not ready: at capacity ({CAPACITY}/{CAPACITY})\n")
    for t in streams:
        t.join(timeout=60)
    assert all(len(results[seed].frames) == 8 for seed in range(10, 10 + CAPACITY)), results
    gateway.wait_healthy(2)  # its /ready passes again


def test_a_bad_replica_is_refused_by_name():
    proc = subprocess.run(flowact_command("gateway", "--replica", "10.0.0.5", "--print-config"), capture_output=True, text=True)
    assert proc.returncode != 0
    assert "replica '10.0.0.5': expected HOST:GRPCPORT[:HEALTHPORT], e.g. 10.0.0.5:8001:8003" in proc.stderr, proc.stderr


def test_config_passes_envoys_validator(fleet, tmp_path):
    _, gateway = fleet
    args = ["gateway", "--listen", "127.0.0.1:9001", "--print-config"]
    for r in gateway.replicas:
        args += ["--replica", r]
    config = tmp_path / "envoy.json"
    config.write_text(subprocess.run(flowact_command(*args), capture_output=True, text=True, check=True).stdout)
    from flowact.serving.gateway import envoy_binary

    proc = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(config)], capture_output=True, text=True)
    assert proc.returncode == 0 and f"configuration '{config}' OK" in proc.stdout + proc.stderr, proc.stderr[-2000:]


def test_streams_spread_and_a_drained_replica_gets_no_new_ones(fleet):
    replicas, gateway = fleet
    results: dict = {}
    first = [stream_in_thread(gateway.url, 16, seed, results) for seed in (1, 2)]
    wait_for(lambda: [r.active_streams() for r in replicas] == [1, 1], 15, "one stream on each replica")
    draining = replicas[0]
    draining.drain_file.touch()
    try:
        wait_for(lambda: len(gateway.healthy()) == 1, 15, "the gateway to see the drain")
        later = [stream_in_thread(gateway.url, 4, seed, results) for seed in (3, 4)]
        wait_for(lambda: replicas[1].active_streams() == 3, 15, "the new streams on the other replica")
        assert draining.active_streams() == 1  # its live stream goes on; no new one came
        for t in first + later:
            t.join(timeout=60)
    finally:
        draining.drain_file.unlink()
    for seed, chunks in ((1, 16), (2, 16), (3, 4), (4, 4)):
        assert not isinstance(results[seed], Exception), results[seed]
        assert len(results[seed].frames) == chunks
    gateway.wait_healthy(2)


def test_a_message_over_the_cap_never_reaches_a_replica(fleet):
    _, gateway = fleet
    tiny = get_preset("tiny")
    with AvatarStream(gateway.url, timeout_s=5) as s:  # the replica gets the message's prefix only: no answer
        with pytest.raises(StreamError, match="no response within 5 s"):
            s.run(ref_image(tiny), speech_chunks(1), prompt="x" * (GATEWAY_MAX_REQUEST_BYTES + 1))
    with AvatarStream(gateway.url) as s:  # under the cap (the model refuses the text, by name) and after: served
        with pytest.raises(StreamError, match="PROMPT"):
            s.run(ref_image(tiny), speech_chunks(1), prompt="x" * (GATEWAY_MAX_REQUEST_BYTES // 2))
    with AvatarStream(gateway.url) as s:
        assert len(s.run(ref_image(tiny), speech_chunks(2)).frames) == 2
