"""The fleet rehearsal, small: 2 real tiny replicas behind a real `flowact gateway`, 4 real-time streams
with the shipped client's failover; replica 2 is SIGKILLed and comes back, then replica 1 drains
(preStop `flowact drain`, then SIGTERM). Every stream completes with every chunk exactly once and the frames
of an uninterrupted run of its inputs (benchmarks/fleet.py's rehearsal, the benchmark's own code)."""
from __future__ import annotations

from flowact.benchmarks.fleet import rehearse
from flowact.serving.repository import RepositoryOptions, build_embedded_repository

PLAN = [("streams", 4), ("wait", 2), ("kill", 1), ("start", 1), ("drain", 0)]


def test_streams_survive_a_drain_and_a_kill(tmp_path, onnx_dir):
    repo = build_embedded_repository("tiny", tmp_path / "repo", opts=RepositoryOptions(capacity=4), onnx_dir=onnx_dir)
    result = rehearse(repo, tmp_path, replicas=2, plan=PLAN, chunks=40, say=lambda msg: None)
    totals = result["totals"]
    assert totals["completed"] == 4, result["streams"]
    assert (totals["chunks_lost"], totals["chunks_duplicated"], totals["chunks_differing"]) == (0, 0, 0), result["streams"]
    kill, drain = result["events"]
    assert drain["streams_affected"] >= 1 and kill["streams_affected"] >= 1, result["events"]
    assert drain["causes"] != ["connection lost"] and kill["causes"] == ["connection lost"], result["events"]
