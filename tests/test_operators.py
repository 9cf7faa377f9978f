"""What a Triton operator does with `flowact serve`: the admin key, NVIDIA's perf_analyzer, probe and
drain, against one real tiny server started by the CLI with FLOWACT_ADMIN_KEY.

perf_analyzer comes from benchmarks/install_perf_analyzer.sh (`make test` runs it): tools/bin/perf_analyzer,
or $FLOWACT_PERF_ANALYZER. Without it that test skips. Run with -s to see its figures.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from conftest import ref_image, speech_chunks
from flowact.client.stream import AvatarStream
from flowact.contract import (ADMIN_KEY_ENV, ADMIN_KEY_GRPC_HEADER, ADMIN_KEY_HTTP_HEADER, AUDIO, ENSEMBLE_MODEL,
                              REF_IMAGE, STREAM_MODEL)
from flowact.presets import SAMPLES_PER_CHUNK, get_preset

REPO = Path(__file__).resolve().parents[1]
KEY = "operator-key-0123456789+/=abcdef"  # base64's characters included: they survive Triton's flag parsing
PERF_ANALYZER = os.environ.get("FLOWACT_PERF_ANALYZER") or str(REPO / "tools" / "bin" / "perf_analyzer")
TINY = get_preset("tiny")


class Served:
    def __init__(self, proc, grpc, http, metrics, tmp: Path):
        self.proc, self.grpc_port, self.http_port, self.metrics_port, self.tmp = proc, grpc, http, metrics, tmp

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def env(self) -> dict:
        return dict(os.environ, FLOWACT_DRAIN_FILE=str(self.tmp / "draining"))


@pytest.fixture(scope="module")
def served(tmp_path_factory, onnx_dir):
    """`flowact serve --preset tiny` (the tiny repository, seed-0 weights) with FLOWACT_ADMIN_KEY set."""
    from flowact.serving.repository import RepositoryOptions, build_embedded_repository
    from flowact.serving.processes import free_ports

    tmp = tmp_path_factory.mktemp("operators")
    repo = build_embedded_repository("tiny", tmp / "repo", opts=RepositoryOptions(capacity=8, idle_ttl_s=10.0),
                                     onnx_dir=onnx_dir)
    http, grpc, metrics, health = free_ports(4)
    env = dict(os.environ, FLOWACT_DRAIN_FILE=str(tmp / "draining"), **{ADMIN_KEY_ENV: KEY})
    out, err = open(tmp / "stdout", "w"), open(tmp / "stderr", "w")
    proc = subprocess.Popen([sys.executable, "-m", "flowact.cli", "serve", "--preset", "tiny", "--repository", str(repo),
                             "--work-dir", str(tmp / "triton"), "--grpc-port", str(grpc), "--http-port", str(http),
                             "--metrics-port", str(metrics), "--health-port", str(health)], stdout=out, stderr=err, env=env,
                            cwd=tmp)
    srv = Served(proc, grpc, http, metrics, tmp)
    deadline = time.monotonic() + 180
    while "flowact serving" not in (tmp / "stdout").read_text():
        assert proc.poll() is None, (tmp / "stderr").read_text()
        assert time.monotonic() < deadline, "flowact serve not ready in 180 s"
        time.sleep(0.5)
    yield srv
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=90)
    out.close()
    err.close()


def admin(headers: bool = True) -> dict:
    return {"headers": {ADMIN_KEY_GRPC_HEADER: KEY}} if headers else {}


def http(srv: Served, path: str, method: str = "GET", key: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(srv.http_url + path, method=method, data=b"{}" if method == "POST" else None)
    if key is not None:
        request.add_header(ADMIN_KEY_HTTP_HEADER, key)
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


# --- the admin key ----------------------------------------------------------------------------------


def test_admin_key_opens_config_and_statistics_over_grpc(served):
    client = grpcclient.InferenceServerClient(served.url)
    config = client.get_model_config(STREAM_MODEL, as_json=True, **admin())
    assert config["config"]["name"] == STREAM_MODEL and config["config"]["sequence_batching"]
    stats = client.get_inference_statistics(ENSEMBLE_MODEL, as_json=True, **admin())
    assert stats["model_stats"][0]["name"] == ENSEMBLE_MODEL
    for call in (lambda **h: client.get_model_config(STREAM_MODEL, **h),
                 lambda **h: client.get_inference_statistics(ENSEMBLE_MODEL, **h)):
        for headers in ({}, {"headers": {ADMIN_KEY_GRPC_HEADER: KEY[:-1] + "x"}}, {"headers": {ADMIN_KEY_HTTP_HEADER: KEY}}):
            with pytest.raises(InferenceServerException, match="(?i)restricted"):
                call(**headers)
    # model control stays `none`: the key does not let anyone load, unload or upload models
    for call in (lambda: client.load_model(ENSEMBLE_MODEL, **admin()), lambda: client.unload_model(ENSEMBLE_MODEL, **admin()),
                 lambda: client.load_model("evil", config='{"backend": "python"}',
                                           files={"file:1/model.py": b"import os"}, **admin())):
        with pytest.raises(InferenceServerException, match="(?i)not allowed|polling is enabled|explicit model"):
            call()
    # health and metadata need no key
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(ENSEMBLE_MODEL)
    assert client.get_model_metadata(ENSEMBLE_MODEL).name == ENSEMBLE_MODEL
    assert client.get_server_metadata().name == "triton"
    client.close()


def test_admin_key_opens_config_and_statistics_over_http(served):
    for path in (f"/v2/models/{STREAM_MODEL}/config", f"/v2/models/{ENSEMBLE_MODEL}/stats", "/v2/models/stats"):
        status, body = http(served, path, key=KEY)
        assert status == 200, (path, body)
        for key in (None, "wrong-key-0123456789abcdef"):
            status, body = http(served, path, key=key)
            assert status == 403 and "restricted" in body, (path, status, body)
    assert json.loads(http(served, f"/v2/models/{STREAM_MODEL}/config", key=KEY)[1])["name"] == STREAM_MODEL
    for path in (f"/v2/repository/models/{ENSEMBLE_MODEL}/load", f"/v2/repository/models/{ENSEMBLE_MODEL}/unload"):
        status, body = http(served, path, "POST", key=KEY)
        assert status >= 400 and "not allowed" in body, (path, status, body)  # refused by model control none
    for path in ("/v2/health/live", "/v2/health/ready", f"/v2/models/{ENSEMBLE_MODEL}", f"/v2/models/{ENSEMBLE_MODEL}/ready"):
        assert http(served, path)[0] == 200, path


def test_inference_needs_no_key(served):
    with AvatarStream(served.url, stream_id="operator-no-key") as stream:
        result = stream.run(ref_image(TINY), speech_chunks(3))
    assert len(result.frames) == 3 and result.frames[0].shape == (12, TINY.height, TINY.width, 3)


def test_key_is_never_printed_nor_given_to_the_stubs(served):
    import psutil

    for name in ("stdout", "stderr", "triton/tritonserver.log"):
        text = (served.tmp / name).read_text()
        assert KEY not in text, name
    assert "admin    key from $FLOWACT_ADMIN_KEY" in (served.tmp / "stdout").read_text()
    procs = psutil.Process(served.proc.pid).children(recursive=True)
    server = next(p for p in procs if p.name() == "tritonserver")
    assert any(KEY in arg for arg in server.cmdline())  # on tritonserver's command line: see the README's security section
    stubs = [p for p in procs if "triton_python_backend_stub" in p.name()]
    assert stubs and all(ADMIN_KEY_ENV not in p.environ() for p in [server, *stubs])


# --- the key's sources, without a server --------------------------------------------------------------


def test_admin_key_sources_and_validation(tmp_path, monkeypatch, capsys):
    from flowact.serving.cli import admin_key

    monkeypatch.delenv(ADMIN_KEY_ENV, raising=False)
    assert admin_key(None) == (None, "random per start (admin protocols unreachable)")
    monkeypatch.setenv(ADMIN_KEY_ENV, KEY + "\n")
    assert admin_key(None) == (KEY, f"from ${ADMIN_KEY_ENV}")
    key_file = tmp_path / "key"
    key_file.write_text("file-key-0123456789abcdef\n")  # the file wins over the environment
    assert admin_key(key_file) == ("file-key-0123456789abcdef", f"from {key_file}")
    for bad, why in (("short", "at least 16 characters"), ("has spaces in it 0123456789", "may hold only"),
                     ("colon:is:not:allowed:0123456789", "may hold only")):
        key_file.write_text(bad)
        with pytest.raises(SystemExit) as e:
            admin_key(key_file)
        assert why in str(e.value) and bad not in str(e.value)
    with pytest.raises(SystemExit, match="cannot read"):
        admin_key(tmp_path / "missing")


def test_without_a_key_each_start_gets_a_random_one(tmp_path):
    from flowact.serving.server import TritonServer

    a, b = TritonServer(tmp_path), TritonServer(tmp_path)
    assert a.admin_key != b.admin_key and len(a.admin_key) >= 32
    flag = next(f for f in a.command() if f.startswith("--grpc-restricted-protocol="))
    assert flag.endswith(f":admin-key={a.admin_key}") and "model-config" in flag and "statistics" in flag


# --- perf_analyzer ------------------------------------------------------------------------------------


def test_perf_data_follows_the_contract(tmp_path):
    from flowact.benchmarks.perf_data import perf_data
    from flowact.media import SPEECH_WAV, load_audio, split_chunks

    data = perf_data("tiny", sequences=2)["data"]
    speech, _ = split_chunks(load_audio(SPEECH_WAV))
    assert len(data) == 2 and all(len(seq) == len(speech) for seq in data)
    for k, seq in enumerate(data):
        assert set(seq[0]) == {AUDIO, REF_IMAGE} and all(set(step) == {AUDIO} for step in seq[1:])
        assert seq[0][REF_IMAGE]["shape"] == [TINY.height, TINY.width, 3]
        assert len(seq[0][REF_IMAGE]["content"]) == TINY.height * TINY.width * 3
        audio = np.array(seq[1][AUDIO]["content"], np.float32)
        assert seq[1][AUDIO]["shape"] == [SAMPLES_PER_CHUNK] and np.array_equal(audio, speech[(k + 1) % len(speech)])
    assert np.abs(np.array(data[0][3][AUDIO]["content"])).max() > 0.05  # real speech, not silence


def test_bench_perf_data_cli(tmp_path, capsys):
    from flowact.cli import main

    out = tmp_path / "perf.json"
    assert main(["bench", "perf-data", "--preset", "tiny", "--out", str(out), "--sequences", "1", "--chunks", "4"]) == 0
    data = json.loads(out.read_text())["data"]
    assert len(data) == 1 and len(data[0]) == 4
    assert "1 sequence(s) of 4 requests" in capsys.readouterr().out


def perf_analyzer_available() -> bool:
    return Path(PERF_ANALYZER).exists() and subprocess.run([PERF_ANALYZER, "--version"], capture_output=True).returncode == 0


@pytest.mark.skipif(not perf_analyzer_available(), reason=f"perf_analyzer not installed ({PERF_ANALYZER}); "
                                                          "bash benchmarks/install_perf_analyzer.sh")
def test_perf_analyzer_recipe_runs_against_the_tiny_server(served, tmp_path):
    """The command of benchmarks/README.md, with shorter measurement windows: concurrency 1 and 2 over
    gRPC streaming, no failed request."""
    from flowact.benchmarks.perf_data import write_perf_data

    data = write_perf_data("tiny", tmp_path / "perf-tiny.json", sequences=2)
    client = grpcclient.InferenceServerClient(served.url)

    def failures() -> int:
        stats = client.get_inference_statistics(as_json=True, **admin())["model_stats"]
        return sum(int(m["inference_stats"]["fail"].get("count", 0)) for m in stats)

    failed_before = failures()
    report = tmp_path / "perf.csv"
    proc = subprocess.run([PERF_ANALYZER, "-m", ENSEMBLE_MODEL, "-u", served.url, "-i", "grpc", "--streaming",
                           "-H", f"{ADMIN_KEY_GRPC_HEADER}:{KEY}", "--input-data", str(data),
                           "--concurrency-range", "1:2", "--measurement-interval", "3000",
                           "--stability-percentage", "100", "--max-trials", "4", "-f", str(report)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert KEY not in proc.stdout
    rows = {int(r["Concurrency"]): r for r in csv.DictReader(report.open())}
    assert set(rows) == {1, 2}
    figures = {c: {"throughput_per_s": float(r["Inferences/Second"]), "p50_ms": float(r["p50 latency"]) / 1000,
                   "p99_ms": float(r["p99 latency"]) / 1000} for c, r in rows.items()}
    print(f"\nperf_analyzer (tiny, gRPC streaming, 2 sequences of {len(json.loads(data.read_text())['data'][0])} "
          f"requests): {json.dumps(figures)}")
    assert all(f["throughput_per_s"] > 0 for f in figures.values())
    assert failures() == failed_before, "requests failed during the perf_analyzer run"
    assert "Request count" in proc.stdout and "error" not in proc.stderr.lower()
    client.close()


# --- probe and drain (last: drain leaves the server draining) ------------------------------------------


def test_probe_and_drain_work_with_a_keyed_server(served):
    cli = [sys.executable, "-m", "flowact.cli"]
    probe = subprocess.run([*cli, "probe", "ready", "--http-url", served.http_url, "--metrics-url", served.metrics_url],
                           capture_output=True, text=True, env=served.env(), timeout=60)
    assert probe.returncode == 0 and probe.stdout.startswith("ready ("), probe.stdout + probe.stderr
    drain = subprocess.run([*cli, "drain", "--deadline", "30", "--metrics-url", served.metrics_url],
                           capture_output=True, text=True, env=served.env(), timeout=60)
    assert drain.returncode == 0 and "no active streams" in drain.stdout, drain.stdout + drain.stderr
    probe = subprocess.run([*cli, "probe", "ready", "--http-url", served.http_url, "--metrics-url", served.metrics_url],
                           capture_output=True, text=True, env=served.env(), timeout=60)
    assert probe.returncode == 1 and "draining" in probe.stdout
    (served.tmp / "draining").unlink()


# --- docs match the code ------------------------------------------------------------------------------


def test_readme_documents_every_published_metric():
    from flowact.contract import METRICS

    readme = (REPO / "README.md").read_text()
    rows = {line.split("|")[1].strip().strip("`"): line for line in readme.splitlines() if line.startswith("| `flowact_")}
    assert set(rows) == set(METRICS), set(METRICS) ^ set(rows)
    for name, (kind, _help) in METRICS.items():
        cells = [c.strip() for c in rows[name].split("|")]
        assert cells[2] == kind.lower() and len(cells[3]) > 20, rows[name]  # the kind and a meaning


def test_readme_figures_have_a_results_file():
    """The headline lip-sync figures quote benchmarks/results/quality_demo.json, the CPU precision
    paragraph serve_cpu.json and quality_cpu_int8.json, rounded."""
    demo = json.loads((REPO / "benchmarks" / "results" / "quality_demo.json").read_text())["rows"]
    readme = (REPO / "README.md").read_text()
    assert f"sync {demo['cpu']['lip_sync']:.2f} on the shipped samples" in readme
    assert f"{demo['cpu int8 (as make demo serves it)']['lip_sync']:.2f} in int8 as the demo serves it" in readme
    assert f"random weights {demo['cpu random weights']['lip_sync']:.2f}" in readme
    assert "benchmarks/results/quality_demo.json" in readme
    results = REPO / "benchmarks" / "results"
    summary = json.loads((results / "serve_cpu.json").read_text())["summary"]
    serve = summary["precision"]
    q = json.loads((results / "quality_cpu_int8.json").read_text())["rows"]
    int8, fp32 = q["onnx int8"], q["onnx fp32"]
    readme = " ".join(readme.split())  # the CPU precision paragraph, wrapped
    assert (f"held {summary['capacity']} real-time streams where {serve['other']} held "
            f"{serve['other_capacity']} ({serve['capacity_ratio']:.1f}x; chunk p50 at N=1 fp32 / int8 "
            f"{serve['chunk_p50_n1_ratio']:.2f}x") in readme and serve["same_run"] and serve["ours"] == "int8"
    assert f"lip sync {int8['lip_sync']:.3f} vs fp32 {fp32['lip_sync']:.3f}" in readme
    assert (f"{int8['one_chunk_psnr_vs_fp32_db']:.1f} dB from fp32's frames (worst "
            f"{int8['one_chunk_psnr_vs_fp32_worst_db']:.1f})") in readme
    assert f"2-minute streams {int8['psnr_vs_fp32_db']:.1f} dB" in readme
    bench = (REPO / "benchmarks" / "README.md").read_text()
    assert "results/perf_analyzer_tiny.csv" in bench and (REPO / "benchmarks" / "results" / "perf_analyzer_tiny.csv").exists()
