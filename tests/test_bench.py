"""`flowact bench serve`: statistics on synthetic timings, then short real runs against the tiny server."""

import json
import urllib.request

import numpy as np
import pytest

from flowact.benchmarks import report
from flowact.benchmarks.loadgen import (ClientMetrics, LoadSpec, StreamTiming, playback_deadline, realtime_capacity,
                                        run_point, summarise)
from flowact.benchmarks.serve_bench import main
from flowact.benchmarks.serve_modes import soak_verdict
from flowact.presets import CHUNK_SECONDS
from flowact.stats import count_stalls, percentile

C = CHUNK_SECONDS


def stream(latencies, start=100.0, expected=None, sid=1) -> StreamTiming:
    """A paced stream whose chunk i is due at start + 0.48 i and arrives `latencies[i]` later."""
    due = [start + i * C for i in range(len(latencies))]
    return StreamTiming(sid, expected=expected or len(latencies), due=due, sent=list(due),
                        arrivals=[d + lat for d, lat in zip(due, latencies)])


# --- statistics ------------------------------------------------------------------------------------------


def test_percentiles_on_known_values():
    values = [i / 1000 for i in range(1, 101)]  # 1..100 ms
    assert percentile(values, 50) == pytest.approx(0.0505)
    assert percentile(values, 99) == pytest.approx(0.09901)
    assert np.isnan(percentile([], 50))
    s = stream([0.3] + values)  # chunk 0 is TTFF, not a chunk latency
    point = summarise([s], jitter_buffer=0.2)
    assert point["ttff_p50_s"] == pytest.approx(0.3)
    assert point["chunk_latency_p50_s"] == pytest.approx(0.0505)
    assert point["chunk_latency_p99_s"] == pytest.approx(0.09901)


def test_steady_stream_has_no_stalls_and_full_fps():
    s = stream([0.25] + [0.1] * 40)
    assert s.stalls(0.0) == 0
    point = summarise([s], jitter_buffer=0.0)
    assert point["stall_rate"] == 0 and point["realtime"]
    assert point["fps_per_stream_min"] == pytest.approx(25.0)


def test_a_late_chunk_stalls_unless_the_jitter_buffer_absorbs_it():
    # playback starts at chunk 0's arrival (+ buffer); chunk 5 is 0.15 s later than chunk 0 was
    lat = [0.1] * 10
    lat[5] = 0.25
    s = stream(lat)
    assert s.stalls(0.0) == 1
    assert s.stalls(0.1) == 1
    assert s.stalls(0.2) == 0
    assert s.stalls(0.0) == count_stalls(s.arrivals, s.arrivals[0], 0.0)


def test_falling_behind_stalls_every_later_chunk():
    lat = [0.1 + 0.1 * i for i in range(20)]  # 0.58 s per chunk for 0.48 s of video
    s = stream(lat)
    assert s.stalls(0.2) == sum(1 for x in lat if x > 0.1 + 0.2 + 1e-9)
    point = summarise([s], 0.2)
    assert not point["realtime"] and point["fps_per_stream_min"] < 25 * 0.48 / 0.58 + 0.5


def test_missing_chunks_count_as_stalls():
    s = stream([0.1] * 8, expected=10)
    assert s.missing == 2 and s.stalls(1.0) == 2
    point = summarise([s], 1.0)
    assert point["chunks_expected"] == 10 and point["stall_rate"] == pytest.approx(0.2)


def test_online_stall_rule_matches_count_stalls():
    rng = np.random.default_rng(0)
    for _ in range(50):
        s = stream(list(rng.uniform(0.05, 0.6, size=30)))
        for jitter in (0.0, 0.1, 0.3):
            online = sum(1 for i, a in enumerate(s.arrivals) if a > playback_deadline(i, s.arrivals[0], jitter))
            assert online == count_stalls(s.arrivals, s.arrivals[0], jitter) == s.stalls(jitter)


def point(n, realtime=True, **over):
    base = {"streams": n, "errors": [], "chunks": 100, "stall_rate": 0.0, "chunk_latency_p99_s": 0.1}
    if not realtime:
        base["stall_rate"] = 0.2
    base.update(over)
    from flowact.benchmarks.loadgen import is_realtime

    base["realtime"] = is_realtime(base)
    return base


def test_capacity_is_the_largest_real_time_n():
    assert realtime_capacity([point(1), point(2), point(4, False)]) == {
        "capacity": 2, "lower_bound": False, "non_monotonic": False, "tested": [1, 2, 4]}
    assert realtime_capacity([point(4), point(1), point(2)])["capacity"] == 4
    assert realtime_capacity([point(1), point(2)])["lower_bound"]
    noisy = realtime_capacity([point(1), point(2, False), point(3)])
    assert noisy["capacity"] == 3 and noisy["non_monotonic"]
    assert realtime_capacity([point(1, False)])["capacity"] == 0
    assert realtime_capacity([])["capacity"] == 0


def test_capacity_rule_edges():
    assert point(1, stall_rate=0.01)["realtime"]  # <= 1 %
    assert not point(1, stall_rate=0.0101)["realtime"]
    assert not point(1, chunk_latency_p99_s=C)["realtime"]  # strictly under 0.48 s
    assert not point(1, errors=["7: at capacity"])["realtime"]
    assert not point(1, chunks=0)["realtime"]


def test_soak_verdict():
    t = list(np.arange(0, 600, C))
    mem_t = list(np.arange(0, 600, 5.0))
    flat = soak_verdict(t, [0.3] + [0.1] * (len(t) - 1), mem_t, [800 + 30 * (x < 60) for x in mem_t])
    assert flat["flat"] and abs(flat["memory_slope_mb_per_min"]) < 0.01
    leaking = soak_verdict(t, [0.3] + [0.1] * (len(t) - 1), mem_t, [800 + 0.1 * x for x in mem_t])  # 6 MB/min
    assert not leaking["flat"] and leaking["memory_slope_mb_per_min"] == pytest.approx(6.0)
    slowing = soak_verdict(t, [0.3] + list(np.linspace(0.1, 0.2, len(t) - 1)), mem_t, [800.0] * len(mem_t))
    assert not slowing["flat"]
    speeding_up = soak_verdict(t, [0.3] + list(np.linspace(0.2, 0.1, len(t) - 1)), mem_t, [800.0] * len(mem_t))
    assert speeding_up["flat"] and speeding_up["latency_drift"] < -0.3


def test_readme_block_is_replaced_in_place(tmp_path):
    result = {"preset": "tiny", "runs": {"x": {"settings": {"duration_s": 1, "jitter_buffer_s": 0.2}}},
              "capacity": {"run_id": "x", "points": [summarise([stream([0.2] + [0.1] * 5)], 0.2)],
                           "result": {"capacity": 1, "lower_bound": True}},
              "summary": {"capacity": 1}}
    (tmp_path / "serve_tiny.json").write_text(json.dumps(result))
    readme = tmp_path / "README.md"
    readme.write_text(f"# Bench\n\nintro\n\n{report.BEGIN}\nold\n{report.END}\n\nfooter\n")
    report.write_readme(tmp_path, readme)
    once = readme.read_text()
    report.write_readme(tmp_path, readme)
    assert readme.read_text() == once
    assert once.startswith("# Bench\n\nintro") and once.rstrip().endswith("footer") and "old" not in once
    assert "| tiny | 1+ |" in once and "| 1 | 200 / 200 | 100 / 100 |" in once


# --- real runs against the tiny server --------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory, onnx_dir):
    from test_serving import start_server

    srv = start_server(tmp_path_factory.mktemp("bench"), onnx_dir, capacity=4)
    yield srv
    srv.stop()


def test_load_point_against_the_tiny_server(server, tiny):
    from conftest import ref_image, speech_chunks

    metrics = ClientMetrics(port=0)
    spec = LoadSpec(f"127.0.0.1:{server.grpc_port}", "tiny", ref_image(tiny), np.concatenate(speech_chunks(4)),
                    jitter_buffer=0.2)
    timings = run_point(spec, 2, duration_s=2.0, metrics=metrics)
    assert len({t.stream_id for t in timings}) == 2
    result = summarise(timings, 0.2)
    assert result["errors"] == [] and result["missing_chunks"] == 0
    assert result["chunks"] == result["chunks_expected"] == 2 * 5
    assert 0 < result["chunk_latency_p50_s"] < result["chunk_latency_max_s"] + 1e-9
    for t in timings:  # paced: nothing left before its due time
        assert all(s >= d - 1e-3 for d, s in zip(t.due, t.sent))
        assert all(a > d for d, a in zip(t.due, t.arrivals))
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics.port}/metrics", timeout=5) as r:
        text = r.read().decode()
    assert 'flowact_client_chunk_latency_seconds_count{preset="tiny"} 8.0' in text
    assert 'flowact_client_ttff_seconds_count{preset="tiny"} 2.0' in text
    assert 'flowact_client_chunks_total{preset="tiny",stream="1"} 5.0' in text


def test_cli_run_writes_json_plots_and_table(tmp_path):
    """The whole CLI run; its own export directory: the run serves the shipped tiny checkpoint, and
    the session's onnx_dir holds seeded random weights that other tests compare against."""
    out = tmp_path / "results" / "serve_tiny.json"
    rc = main(["serve", "--preset", "tiny", "--streams", "1,2", "--duration", "1", "--grace", "2",
               "--modes", "capacity,baseline,overhead,pipeline,precision", "--pipeline-streams", "2", "--soak-minutes", "0.05",
               "--onnx-dir", str(tmp_path / "onnx"), "--work-dir", str(tmp_path / "work"), "--out", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert [p["streams"] for p in result["capacity"]["points"]] == [1, 2]
    assert [p["streams"] for p in result["baseline"]["points"]] == [1, 2]
    assert result["capacity"]["run_id"] == result["baseline"]["run_id"] == result["soak"]["run_id"]
    for p in result["capacity"]["points"]:
        assert p["errors"] == [] and p["chunks"] == p["chunks_expected"] == p["streams"] * 3
        assert p["server_resources"]["cpu_cores"] >= 0 and p["server_resources"]["rss_mb_max"] > 50
    assert result["overhead"]["inprocess_onnx"]["chunks"] == 3 and "overhead_chunk_latency_p50_ms" in result["overhead"]
    assert result["pipeline"]["overlap"][0]["chunks"] > 0 and result["pipeline"]["serial"][0]["chunks"] > 0
    assert result["soak"]["chunk_latency_s"] and result["soak"]["memory_mb"]
    assert {"capacity", "baseline_capacity", "ratio", "overlap_vs_serial", "soak_flat", "precision"} <= set(result["summary"])
    assert (result["capacity"]["server_precision"], result["precision"]["server_precision"]) == ("fp32", "int8")
    assert [p["chunks"] for p in result["precision"]["points"]] == [3, 6]  # the int8 server, interleaved per N
    assert result["summary"]["precision"]["same_run"] and result["summary"]["precision"]["chunk_p50_n1_ratio"] > 0
    run = result["runs"][result["capacity"]["run_id"]]
    assert run["load_at_start"]["loadavg_1_5_15"] and run["machine"]["cores"] and run["settings"]["streams"] == [1, 2]
    for name in ("latency", "stalls", "ttff", "longstream", "pipeline"):
        assert (out.parent / f"serve_tiny_{name}.png").stat().st_size > 1000
    readme = report.write_readme(out.parent, tmp_path / "README.md").read_text()
    assert "| tiny |" in readme and "Serving overhead at N=1" in readme
    assert "load with int8 networks" in readme and "server networks fp32" in readme


def test_add_parser_plugs_into_the_flowact_cli(monkeypatch, capsys):
    from flowact import cli

    monkeypatch.setitem(cli.COMMANDS, "bench", "flowact.benchmarks.serve_bench")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "serve", "--help"])
    assert exit_info.value.code == 0
    assert "--jitter-buffer" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["bench", "serve", "--streams", "0,2"])
    assert "positive integers" in capsys.readouterr().err


def test_baseline_tries_both_thread_counts_and_keeps_the_better(monkeypatch):
    from flowact.benchmarks import serve_baseline

    monkeypatch.setattr(serve_baseline.os, "cpu_count", lambda: 2)
    assert serve_baseline.baseline_threads(1) == [2, 1]
    assert serve_baseline.baseline_threads(2) == serve_baseline.baseline_threads(4) == [1]
    assert serve_baseline.baseline_threads(1, fixed=3) == [3]
    fast, slow = point(1, chunk_latency_p99_s=0.2), point(1, chunk_latency_p99_s=0.3)
    assert serve_baseline.better(slow, fast) is fast and serve_baseline.better(fast, slow) is fast
    failing = point(1, False)
    assert serve_baseline.better(failing, slow) is slow


def test_a_later_run_keeps_earlier_sections_and_their_run_facts(tmp_path):
    from flowact.benchmarks.serve_bench import merge_previous

    path = tmp_path / "serve_cpu.json"
    path.write_text(json.dumps({"preset": "cpu", "run_id": "r1", "command": "c1", "settings": {"streams": [1, 2]},
                                "load_at_start": {"loadavg_1_5_15": [1, 1, 1]}, "capacity": {"run_id": "r1"}}))
    merged = merge_previous(path, "cpu")
    assert merged["runs"] == {"r1": {"command": "c1", "settings": {"streams": [1, 2]},
                                     "load_at_start": {"loadavg_1_5_15": [1, 1, 1]}}}
    assert merged["capacity"] == {"run_id": "r1"} and "run_id" not in merged
    assert merge_previous(path, "tiny") == {}


def test_best_of_repeats_keeps_every_attempt():
    from flowact.benchmarks.serve_baseline import best_of

    noisy, clean = point(2, False, loadavg_at_start=6.0), point(2, loadavg_at_start=1.0)
    best = best_of([noisy, clean])
    assert best["realtime"] and best["loadavg_at_start"] == 1.0
    assert [a["realtime"] for a in best["attempts"]] == [False, True]
    assert best_of([clean]) is clean


def test_results_written_meanwhile_by_another_run_are_kept(tmp_path, monkeypatch):
    from flowact.benchmarks import serve_bench
    from flowact.benchmarks.serve_config import BenchConfig

    out = tmp_path / "serve_tiny.json"

    def fake_sweep(cfg, modes, endpoint, spec, metrics, other=None, other_spec=None):  # another run writes its soak while this one measures
        out.write_text(json.dumps({"preset": "tiny", "runs": {"other": {"command": "soak"}},
                                   "soak": {"run_id": "other", "minutes": 30, "flat": True}}))
        return {"baseline": {"points": [], "result": {"capacity": 0}}}

    monkeypatch.setattr(serve_bench, "run_sweep", fake_sweep)
    monkeypatch.setattr(serve_bench, "load_snapshot", lambda exclude=None: {})
    cfg = BenchConfig("tiny", [1], 1.0, ["baseline"], out=out)
    result = serve_bench.run(cfg)
    assert result["soak"]["run_id"] == "other" and set(result["runs"]) == {"other", result["baseline"]["run_id"]}
    assert json.loads(out.read_text())["soak"]["minutes"] == 30


def test_server_crashes_in_the_log_are_reported(tmp_path):
    from flowact.benchmarks.serve_server import log_faults

    log = tmp_path / "tritonserver.log"
    log.write_text("I1122 started\nSignal (11) received.\n 0# 0x1 in tritonserver\nmalloc(): invalid size (unsorted)\n")
    assert log_faults(log) == ["Signal (11) received.", "malloc(): invalid size (unsorted)"]
    assert log_faults(tmp_path / "missing.log") == []
    log.write_text("I1206 started\nSignal (15) received.\nE main.cc] failed to stop server: Exit timeout expired.\n"
                   "I pb_stub.cc]  Non-graceful termination detected.\nSignal (11) received.\n")
    assert log_faults(log) == ["Signal (11) received."]  # stopping with requests queued is not a crash


def test_serve_writes_a_run_directory_and_publishes_only_when_asked(tmp_path, monkeypatch):
    """A quick local run must not replace the published results or the README table."""
    from flowact.benchmarks import report, serve_bench

    seen = []
    monkeypatch.setattr(serve_bench, "run", lambda cfg: seen.append(cfg) or {"summary": {}})
    monkeypatch.setattr(serve_bench, "_stop_on_sigterm", lambda: None)
    monkeypatch.setattr(report, "write_readme", lambda *a: pytest.fail("README regenerated without --publish"))
    monkeypatch.chdir(tmp_path)
    assert main(["serve", "--preset", "tiny", "--no-report"]) == 0
    out = seen[-1].out
    assert out.name == "serve_tiny.json" and str(out.parent.parent) == "runs" and out.parent.name.startswith("serve-tiny-")
    assert main(["serve", "--preset", "tiny", "--out", str(tmp_path / "x.json"), "--no-report"]) == 0
    assert seen[-1].out == tmp_path / "x.json"
    assert main(["serve", "--preset", "tiny", "--publish", "--no-report"]) == 0
    assert seen[-1].out == serve_bench.RESULTS / "serve_tiny.json"
    with pytest.raises(SystemExit, match="drop --out"):
        main(["serve", "--preset", "tiny", "--publish", "--out", "x.json"])
