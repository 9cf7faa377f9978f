"""The server under test of `flowact bench serve`: one it starts (the embedded repository on free
loopback ports, its process group sampled with psutil) or one at --url (host-wide CPU and memory from
its metrics endpoint), and one load point against it."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from flowact.benchmarks.kit import say
from flowact.benchmarks.loadgen import LoadSpec, StreamTiming, run_point, summarise, throughput
from flowact.benchmarks.resources import CpuClock, MetricsSource, ProcessGroupSource, ResourceSampler
from flowact.benchmarks.serve_config import IDLE_TTL_S, BenchConfig
from flowact.contract import ACTIVE_STREAMS, CHUNK_SECONDS_COUNT, CHUNK_SECONDS_SUM, DRAIN_FILE_ENV, STREAM_CAPACITY
from flowact.presets import CHUNK_SECONDS
from flowact.serving.health import metric_value, scrape


@dataclass
class Endpoint:
    url: str
    metrics_url: str
    sampler: ResourceSampler
    server: object | None = None  # TritonServer when the benchmark started it
    pipeline: str | None = None
    precision: str | None = None  # of its networks, when the benchmark started it

    def stream_metrics(self) -> dict:
        try:
            text = scrape(self.metrics_url)
        except OSError:
            return {}
        return {k: metric_value(text, k) for k in (ACTIVE_STREAMS, CHUNK_SECONDS_SUM, CHUNK_SECONDS_COUNT, STREAM_CAPACITY)}

    def wait_idle(self, timeout_s: float = IDLE_TTL_S + 30) -> None:
        """Until the server holds no stream (a previous point's cancelled streams wait for the idle TTL)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            active = self.stream_metrics().get(ACTIVE_STREAMS)
            if not active:
                return
            time.sleep(0.5)
        say(f"warning: server still reports {active} active streams after {timeout_s:.0f} s")

    def stop(self) -> list[str]:
        """Stop sampling (and the server, if this run started it) -> fatal signals in the server's log:
        a crash of the server under test is a result, not a footnote."""
        self.sampler.stop()
        if self.server is None:
            return []
        self.server.stop()
        return log_faults(self.server.log_path)


NON_GRACEFUL = "Non-graceful termination"  # a python stub whose tritonserver went away under it
FAULTS = ("Signal (11)", "Signal (6)", NON_GRACEFUL, "malloc()")
STOPPED = "Signal (15) received."  # our stop; then an overloaded server's stubs log NON_GRACEFUL when
#                                    tritonserver's exit timeout expires with requests still queued


def log_faults(path: Path, limit: int = 8) -> list[str]:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    stop = next((i for i, line in enumerate(lines) if STOPPED in line), len(lines))
    return [line.strip()[:200] for i, line in enumerate(lines) if any(f in line for f in FAULTS)
            and not (i > stop and NON_GRACEFUL in line)][:limit]


def start_local(cfg: BenchConfig, pipeline: str, precision: str | None = None) -> Endpoint:
    """The embedded repository at `precision` (None: cfg.precision) behind a tritonserver on free ports,
    with the weights `flowact serve` takes (the shipped checkpoint of the preset, else seeded random)."""
    from flowact.networks import shipped_checkpoint
    from flowact.serving.repository import Pipeline, RepositoryOptions, build_embedded_repository
    from flowact.serving.processes import free_ports
    from flowact.serving.server import TritonServer

    capacity = max([*cfg.streams, *cfg.pipeline_streams, 1])
    opts = RepositoryOptions(capacity=capacity, idle_ttl_s=IDLE_TTL_S, pipeline=Pipeline(pipeline),
                             engine_threads=cfg.engine_threads)
    precision = precision or cfg.precision
    work, name = cfg.work_dir / cfg.preset, f"{pipeline}-{precision}"
    repo = build_embedded_repository(cfg.preset, work / f"repository-{name}", shipped_checkpoint(cfg.preset),
                                     opts=opts, onnx_dir=cfg.onnx_dir, precision=precision)
    http, grpc, metrics = free_ports(3)
    server = TritonServer(repo, grpc, http, metrics, work_dir=work / f"triton-{name}",
                          extra_env={DRAIN_FILE_ENV: str(work / f"draining-{name}")})
    say(f"starting tritonserver ({cfg.preset}, {pipeline}, {precision}, capacity {capacity}) on 127.0.0.1:{grpc} ...")
    t = time.monotonic()
    server.start(timeout_s=240)
    say(f"ready in {time.monotonic() - t:.1f} s")
    sampler = ResourceSampler(ProcessGroupSource(pgid=server.process.pid)).start()
    return Endpoint(f"127.0.0.1:{grpc}", f"http://127.0.0.1:{metrics}/metrics", sampler, server, pipeline, precision)


def remote(cfg: BenchConfig) -> Endpoint:
    host = cfg.url.rsplit(":", 1)[0]
    metrics_url = cfg.metrics_url or f"http://{host}:8002/metrics"
    return Endpoint(cfg.url, metrics_url, ResourceSampler(MetricsSource(metrics_url)).start())


def server_version(endpoint: Endpoint) -> dict:
    import tritonclient.grpc as grpcclient

    try:
        with grpcclient.InferenceServerClient(endpoint.url) as client:
            meta = client.get_server_metadata()
            return {"name": meta.name, "version": meta.version}
    except Exception as e:  # informative only
        return {"error": str(e)}


def warm_up(endpoint: Endpoint, spec: LoadSpec, n: int) -> None:
    """A few unpaced chunks at the largest N first: ONNX Runtime allocates per batch size on first use."""
    endpoint.wait_idle()
    warm = LoadSpec(**{**spec.__dict__, "paced": False, "max_in_flight": 2})
    t = time.monotonic()
    timings = run_point(warm, n, duration_s=2 * CHUNK_SECONDS, grace_s=0.0)
    errors = [s.error for s in timings if s.error]
    say(f"warm-up: {n} streams, {sum(len(s.arrivals) for s in timings)} chunks in {time.monotonic() - t:.1f} s"
        + (f", errors: {errors[:2]}" if errors else ""))


def server_point(endpoint: Endpoint, spec: LoadSpec, n: int, duration_s: float, grace_s: float,
                 metrics=None) -> tuple[dict, list[StreamTiming]]:
    """One load point against the server -> its figures (paced: real-time stats; unpaced: throughput)."""
    endpoint.wait_idle()
    load0 = round(os.getloadavg()[0], 2)
    before = endpoint.stream_metrics()
    clock = CpuClock()
    cpu0, t0 = clock(), time.monotonic()
    timings = run_point(spec, n, duration_s, grace_s, metrics)
    cpu1, t1 = clock(), time.monotonic()
    endpoint.sampler.sample()
    after = endpoint.stream_metrics()
    point = summarise(timings, spec.jitter_buffer) if spec.paced else throughput(timings)
    point["loadavg_at_start"] = load0
    point["server_resources"] = endpoint.sampler.window(t0, t1 + 0.01)
    point["client_cpu_cores"] = (cpu1 - cpu0) / (t1 - t0)
    if after.get(CHUNK_SECONDS_COUNT) and before.get(CHUNK_SECONDS_COUNT) is not None:
        chunks = after[CHUNK_SECONDS_COUNT] - before[CHUNK_SECONDS_COUNT]
        if chunks:
            point["stream_model_chunk_s_mean"] = (after[CHUNK_SECONDS_SUM] - before[CHUNK_SECONDS_SUM]) / chunks
    point["ttffs_s"] = [s.ttff for s in timings if s.arrivals]
    if timings and timings[0].arrivals:
        point["stream0_latencies_s"] = timings[0].latencies
    return point, timings


def describe(point: dict) -> str:
    if "stall_rate" not in point:
        return (f"N={point['streams']:<3d} {point['chunks_per_s']:.2f} chunks/s ({point['fps_total']:.0f} fps total), "
                f"p50 {point.get('chunk_latency_p50_s', float('nan')) * 1000:.0f} ms")
    who, res = ("server", point["server_resources"]) if point.get("server_resources") else \
        ("workers", point.get("worker_resources") or {})
    cpu = f"  {who} {res['cpu_cores']:.2f} cores {res['rss_mb_max']:.0f} MB" if "cpu_cores" in res else ""
    return (f"N={point['streams']:<3d} TTFF p50 {point['ttff_p50_s'] * 1000:6.0f} ms  chunk p50 "
            f"{point['chunk_latency_p50_s'] * 1000:6.0f} p99 {point['chunk_latency_p99_s'] * 1000:6.0f} ms  "
            f"stalls {point['stall_rate'] * 100:5.1f} %  fps {point['fps_per_stream_min']:5.1f}{cpu}  "
            f"{'REAL TIME' if point['realtime'] else 'not real time'}"
            + (f"  errors: {point['errors'][:2]}" if point["errors"] else ""))
