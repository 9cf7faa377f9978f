"""`flowact bench serve`: how many real-time avatar streams one server holds, against what a team
would build without this project, and what serving costs.

    flowact bench serve --preset cpu --streams 1,2,3,4 --duration 30 [--url HOST:PORT]
        [--jitter-buffer 0.2] [--prometheus-port 9500] [--modes capacity,baseline,overhead,pipeline]
        [--soak-minutes 30] [--out FILE | --publish]
    flowact bench report        # plots and the README table again, from benchmarks/results/serve_*.json

A run writes its JSON and plots to its own directory, runs/serve-PRESET-TIMESTAMP/ (or --out); only
--publish writes the published benchmarks/results/serve_PRESET.json and regenerates the README table.

Modes (one run, one machine; each section records the load average it started under):
  capacity  N concurrent streams through the server's gRPC ensemble, paced at real time, each with
            its own id and audio (the shipped client, benchmarks/loadgen.py). Per N: TTFF, chunk
            latency p50/p99, stall rate, fps per stream, server CPU and RSS.
            Real-time capacity = the largest N with stall rate <= 1 % and p99 chunk latency < 0.48 s.
  baseline  the same rule for the in-process PyTorch StreamSession, one unbatched stream per worker
            process (multiprocessing; torch threads per worker: cores // N and 1 both tried where they
            differ, the better kept). ratio = ours / baseline.
  overhead  at N = 1: chunk latency through the server vs the same ONNX files in process
            (flowact.runtime.onnx.load_onnx_runners, ONNX Runtime, the server's thread count).
  pipeline  throughput (chunks/s, streams sending as fast as a 2-chunk window allows) with the
            repository rendered `overlap` (decode of chunk n overlaps denoise of n+1) vs `serial`.
  soak      one stream for --soak-minutes of looped audio: latency and server memory over time.

Without --url the benchmark renders the embedded repository, starts tritonserver on free loopback
ports, and samples its process group with psutil. With --url it drives that server, reads host-wide
CPU/memory from its metrics endpoint (nv_cpu_utilization, nv_cpu_memory_used_bytes), and skips the
pipeline mode (it needs to render repositories); overhead then assumes --onnx-dir holds the ONNX files
that server runs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from flowact.benchmarks.loadgen import (LoadSpec, StreamTiming, realtime_capacity, run_point, stream_audio, summarise,
                                        throughput)
from flowact.benchmarks.resources import (CpuClock, MetricsSource, ProcessGroupSource, ResourceSampler, load_snapshot,
                                          machine_facts, metric_value, scrape)
from flowact.contract import ACTIVE_STREAMS, CHUNK_SECONDS_COUNT, CHUNK_SECONDS_SUM, DRAIN_FILE_ENV, STREAM_CAPACITY
from flowact.presets import CHUNK_SECONDS

RESULTS = Path(__file__).parent / "results"  # the published results (`--publish`), with README.md's table
RUNS = Path("runs")  # default parent of a run's own directory, relative to the working directory
MODES = ("capacity", "baseline", "overhead", "pipeline", "soak")
DEFAULT_MODES = "capacity,baseline,overhead,pipeline"
# The product default. Shorter would free the streams a point abandons (overload) sooner, but Triton
# then drops the sequence of a stream that could not send for that long because the server was
# behind, and its next chunk fails ("must specify the START flag").
IDLE_TTL_S = 30.0


@dataclass
class BenchConfig:
    preset: str
    streams: list[int]
    duration_s: float
    modes: list[str]
    jitter_buffer: float = 0.2
    url: str | None = None
    metrics_url: str | None = None
    prometheus_port: int | None = None
    prometheus_addr: str = "127.0.0.1"
    soak_minutes: float = 0.0
    pipeline_streams: list[int] = field(default_factory=list)
    onnx_dir: Path | None = None
    work_dir: Path = Path("artifacts/bench")
    out: Path | None = None
    max_in_flight: int = 3
    grace_s: float = 5.0
    engine_threads: int = 2
    device: str = "cpu"
    baseline_threads: int | None = None  # torch threads per baseline worker; None: try cores // N and 1
    repeat: int = 1  # attempts per N for ours, the baseline and the in-process reference; the best is kept
    plots: bool = True

    def __post_init__(self):
        self.onnx_dir = Path(self.onnx_dir or Path("artifacts") / self.preset / "onnx")
        self.out = Path(self.out or run_dir(self.preset) / f"serve_{self.preset}.json")
        self.pipeline_streams = self.pipeline_streams or sorted({min(self.streams), max(self.streams)})


def run_dir(preset: str, root: Path = RUNS) -> Path:
    """Where a run writes by default: ./runs/serve-PRESET-UTCSTAMP (not the published results/)."""
    return root / f"serve-{preset}-{dt.datetime.now(dt.timezone.utc).strftime('%Y%m%dT%H%M%SZ')}"


def say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def inputs(preset_name: str) -> tuple[np.ndarray, np.ndarray]:
    """The shipped reference image at the preset's size and the shipped speech (16 kHz)."""
    from flowact.media import REFERENCE_IMAGE, SPEECH_WAV, load_audio, load_image
    from flowact.presets import get_preset

    p = get_preset(preset_name)
    return load_image(REFERENCE_IMAGE, p.height, p.width), load_audio(SPEECH_WAV)


# --- the server under test -------------------------------------------------------------------------


@dataclass
class Endpoint:
    url: str
    metrics_url: str
    sampler: ResourceSampler
    server: object | None = None  # TritonServer when the benchmark started it
    pipeline: str | None = None

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


FAULTS = ("Signal (11)", "Signal (6)", "Non-graceful termination", "malloc()")


def log_faults(path: Path, limit: int = 8) -> list[str]:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [line.strip()[:200] for line in lines if any(f in line for f in FAULTS)][:limit]


def start_local(cfg: BenchConfig, pipeline: str) -> Endpoint:
    from flowact.serving.repository import Pipeline, RepositoryOptions, build_embedded_repository
    from flowact.serving.server import TritonServer, free_ports

    capacity = max([*cfg.streams, *cfg.pipeline_streams, 1])
    opts = RepositoryOptions(capacity=capacity, idle_ttl_s=IDLE_TTL_S, pipeline=Pipeline(pipeline),
                             engine_threads=cfg.engine_threads)
    work = cfg.work_dir / cfg.preset
    repo = build_embedded_repository(cfg.preset, work / f"repository-{pipeline}", opts=opts, onnx_dir=cfg.onnx_dir)
    http, grpc, metrics = free_ports(3)
    server = TritonServer(repo, grpc, http, metrics, work_dir=work / f"triton-{pipeline}",
                          extra_env={DRAIN_FILE_ENV: str(work / "draining")})
    say(f"starting tritonserver ({cfg.preset}, {pipeline}, capacity {capacity}) on 127.0.0.1:{grpc} ...")
    t = time.monotonic()
    server.start(timeout_s=240)
    say(f"ready in {time.monotonic() - t:.1f} s")
    sampler = ResourceSampler(ProcessGroupSource(pgid=server.process.pid)).start()
    return Endpoint(f"127.0.0.1:{grpc}", f"http://127.0.0.1:{metrics}/metrics", sampler, server, pipeline)


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


# --- in-process runs (the baseline and the overhead reference) ---------------------------------------


def server_like_onnx_runners(onnx_dir: str, preset, threads: int):
    """The ONNX files with the options the server's network models use (`threads` intra-op threads,
    no spinning: with ONNX Runtime's default spinning, the idle pools of six sessions spin on the
    same two cores and the in-process reference gets slower than the server)."""
    from flowact.runtime.onnx import load_onnx_runners

    return load_onnx_runners(onnx_dir, preset, threads=threads, spin=False)


def inprocess_worker(kind: str, preset_name: str, index: int, n: int, chunks: int, threads: int, onnx_dir: str,
                     device: str, jitter_buffer: float, grace_s: float, ready, go, t_start, results) -> None:
    """One stream in its own process: a StreamSession stepped at real time, unbatched.

    kind "torch": the PyTorch modules (the baseline a team writes without us); kind "onnx": the
    ONNX files the server runs, through ONNX Runtime in process (the overhead reference)."""
    try:
        import torch

        from flowact.runtime import Runners
        from flowact.session import StreamSession
        from flowact.networks import build_networks
        from flowact.presets import get_preset

        torch.set_num_threads(threads)
        preset = get_preset(preset_name)
        if kind == "torch":
            runners = Runners.from_networks(build_networks(preset, seed=0).to(device))
        else:
            runners = server_like_onnx_runners(onnx_dir, preset, threads)
        image, audio = inputs(preset_name)
        loop = stream_audio(audio, index)
        warm = StreamSession(preset, runners, device=device if kind == "torch" else "cpu")
        warm.start(image, seed=index)
        for i in range(2):
            warm.step(loop.chunk(i))
        ready.put(("ready", index, None))
    except BaseException:
        ready.put(("error", index, traceback.format_exc()))
        return
    go.wait()
    t0 = t_start.value + index * CHUNK_SECONDS / n  # streams spread over one chunk period, like the load generator
    until = t_start.value + (chunks + 1) * CHUNK_SECONDS + grace_s
    timing = StreamTiming(f"{kind}-{index}", expected=chunks)
    session = StreamSession(preset, runners, device=device if kind == "torch" else "cpu")
    try:
        for i in range(chunks):
            due = t0 + i * CHUNK_SECONDS
            time.sleep(max(0.0, due - time.monotonic()))
            if time.monotonic() > until:
                break
            timing.due.append(due)
            timing.sent.append(time.monotonic())
            if i == 0:
                session.start(image, seed=index)
            session.step(loop.chunk(i))
            timing.arrivals.append(time.monotonic())
    except BaseException:
        timing.error = traceback.format_exc(limit=3)
    results.put(timing.to_json())


def inprocess_point(cfg: BenchConfig, kind: str, n: int, threads: int) -> tuple[dict, list[StreamTiming]]:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    ready, results, go, t_start = ctx.Queue(), ctx.Queue(), ctx.Event(), ctx.Value("d", 0.0)
    chunks = max(2, math.ceil(cfg.duration_s / CHUNK_SECONDS))
    procs = [ctx.Process(target=inprocess_worker, daemon=True,
                         args=(kind, cfg.preset, k, n, chunks, threads, str(cfg.onnx_dir), cfg.device,
                               cfg.jitter_buffer, cfg.grace_s, ready, go, t_start, results))
             for k in range(n)]
    for p in procs:
        p.start()
    try:
        for _ in range(n):
            status, index, error = ready.get(timeout=600)
            if status == "error":
                raise RuntimeError(f"{kind} worker {index} failed to start:\n{error}")
        sampler = ResourceSampler(ProcessGroupSource(pids=lambda: [p.pid for p in procs if p.is_alive()])).start()
        load0 = round(os.getloadavg()[0], 2)
        t_start.value = time.monotonic() + 0.5
        go.set()
        timings = [StreamTiming(**results.get(timeout=chunks * CHUNK_SECONDS + cfg.grace_s + 120)) for _ in range(n)]
        t_end = time.monotonic()
        sampler.stop()
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
    point = summarise(sorted(timings, key=lambda s: int(str(s.stream_id).rsplit("-", 1)[1])), cfg.jitter_buffer)
    point["loadavg_at_start"] = load0
    point["worker_resources"] = sampler.window(t_start.value, t_end + 0.01)
    point["threads_per_worker"] = threads
    point["ttffs_s"] = [s.ttff for s in timings if s.arrivals]
    first = min(timings, key=lambda s: str(s.stream_id))
    if first.arrivals:
        point["stream0_latencies_s"] = first.latencies
    return point, timings


def has_export(onnx_dir: Path) -> bool:
    from flowact.runtime.manifest import resolve

    try:
        resolve(onnx_dir)
        return True
    except FileNotFoundError:
        return False


def finite(obj):
    """NaN/inf -> None, so the results file is strict JSON."""
    if isinstance(obj, float):
        return round(obj, 6) if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def baseline_threads(n: int, fixed: int | None = None) -> list[int]:
    """Torch threads per worker to try: `fixed`, else cores // N and 1 (the better one is kept: on a
    shared machine one thread per process often beats two that wait for each other)."""
    return [fixed] if fixed else sorted({max(1, (os.cpu_count() or 1) // n), 1}, reverse=True)


def better(a: dict, b: dict) -> dict:
    """The point a team would pick: real time first, then fewer stalls, then lower p99."""
    def key(p):
        return (not p["realtime"], p["stall_rate"], p["chunk_latency_p99_s"])
    return a if key(a) <= key(b) else b


def best_of(tries: list[dict]) -> dict:
    """Of repeated points (--repeat), the best (`better`), with every attempt summarised beside it:
    on a shared machine a neighbour's burst spoils single runs, and both sides get the same chances."""
    best = tries[0]
    for point in tries[1:]:
        best = better(best, point)
    if len(tries) == 1:
        return best
    best = dict(best)
    best["attempts"] = [{k: p.get(k) for k in ("chunk_latency_p50_s", "chunk_latency_p99_s", "stall_rate", "realtime",
                                                "loadavg_at_start")} for p in tries]
    return best


def baseline_point(cfg: BenchConfig, n: int) -> dict:
    tried = []
    for threads in baseline_threads(n, cfg.baseline_threads):
        point, _ = inprocess_point(cfg, "torch", n, threads)
        tried.append(point)
        if len(baseline_threads(n, cfg.baseline_threads)) > 1:
            say(f"baseline ({threads} thread{'s' if threads > 1 else ''}) " + describe(point))
    best = tried[0]
    for point in tried[1:]:
        best = better(best, point)
    best = dict(best)
    best["threads_tried"] = [{"threads": p["threads_per_worker"], "chunk_latency_p50_s": p["chunk_latency_p50_s"],
                              "chunk_latency_p99_s": p["chunk_latency_p99_s"], "stall_rate": p["stall_rate"],
                              "realtime": p["realtime"]} for p in tried]
    return best


# --- modes ---------------------------------------------------------------------------------------------


def section_header() -> dict:
    return {"measured_at": now_iso(), "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]}


def run_sweep(cfg: BenchConfig, modes: set[str], endpoint: Endpoint | None, spec: LoadSpec | None, metrics) -> dict:
    """capacity, baseline and overhead, interleaved per N (ours N, baseline N, [in-process ONNX at N=1]) so
    that both sides see the same background load on a shared machine."""
    sections: dict[str, dict] = {}
    if "capacity" in modes:
        sections["capacity"] = section_header() | {"server_pipeline": endpoint.pipeline or "unknown (remote)",
                                                   "points": []}
    if "baseline" in modes:
        sections["baseline"] = section_header() | {
            "what": "in-process PyTorch StreamSession, one unbatched stream per worker process (spawned), "
                    "stepping at real time; torch threads per worker: "
                    + (f"{cfg.baseline_threads}" if cfg.baseline_threads else
                       "cores // N and 1 both tried where they differ, the better kept (threads_tried)"),
            "device": cfg.device, "points": []}
    overhead = "overhead" in modes and has_export(cfg.onnx_dir)
    if "overhead" in modes and not overhead:
        say(f"overhead skipped: no ONNX export in {cfg.onnx_dir} (--onnx-dir)")
    server_n1 = inproc_n1 = None
    sweep = cfg.streams if {"capacity", "baseline"} & modes else []
    for n in sweep:
        tries: dict[str, list[dict]] = {"capacity": [], "baseline": [], "inproc": []}
        for attempt in range(cfg.repeat):
            if "capacity" in modes:
                point, _ = server_point(endpoint, spec, n, cfg.duration_s, cfg.grace_s, metrics)
                tries["capacity"].append(point)
                say("ours     " + describe(point))
            if "baseline" in modes:
                point = baseline_point(cfg, n)
                tries["baseline"].append(point)
                say("baseline " + describe(point))
            if n == 1 and overhead and "capacity" in modes:
                point, _ = inprocess_point(cfg, "onnx", 1, cfg.engine_threads)
                tries["inproc"].append(point)
                say("in-proc  " + describe(point))
        for name in ("capacity", "baseline"):
            if tries[name]:
                sections[name]["points"].append(best_of(tries[name]))
        if n == 1 and tries["capacity"]:
            server_n1 = sections["capacity"]["points"][-1]
        if tries["inproc"]:
            inproc_n1 = best_of(tries["inproc"])
    for name in ("capacity", "baseline"):
        if name in sections:
            sections[name]["result"] = realtime_capacity(sections[name]["points"])
    if overhead:
        header = section_header()
        if server_n1 is None and endpoint is not None:
            server_n1, _ = server_point(endpoint, spec, 1, cfg.duration_s, cfg.grace_s, metrics)
            say("ours     " + describe(server_n1))
        if inproc_n1 is None:
            inproc_n1, _ = inprocess_point(cfg, "onnx", 1, cfg.engine_threads)
            say("in-proc  " + describe(inproc_n1))
        sections["overhead"] = overhead_section(cfg, header, server_n1, inproc_n1)
    return sections


def overhead_section(cfg: BenchConfig, header: dict, server_n1: dict | None, inproc: dict) -> dict:
    section = header | {
        "what": "N=1 paced at real time: chunk latency through the server (gRPC ensemble, ONNX Runtime in the "
                "stream model) vs the same ONNX files in process via flowact.runtime.onnx.load_onnx_runners "
                f"(ONNX Runtime, {cfg.engine_threads} intra-op threads and no spinning, like the server's "
                "stream model), measured right after each other",
        "inprocess_onnx": inproc}
    if server_n1 is not None:
        section["server"] = server_n1
        for key in ("chunk_latency_p50_s", "chunk_latency_p99_s", "ttff_p50_s"):
            section[f"overhead_{key[:-2]}_ms"] = (server_n1[key] - inproc[key]) * 1000
        section["overhead_ratio_p50"] = server_n1["chunk_latency_p50_s"] / inproc["chunk_latency_p50_s"]
    return section


def run_pipeline(cfg: BenchConfig, endpoints: dict[str, Endpoint], specs: dict[str, LoadSpec], metrics) -> dict:
    """overlap vs serial, alternating per N (both servers are up; the idle one costs next to nothing)."""
    section = section_header() | {
        "what": "unpaced streams (2 chunks in flight each) for the duration; overlap: ensemble stream -> "
                "vae_decoder; serial: the stream model decodes before answering",
        "overlap": [], "serial": []}
    for n in cfg.pipeline_streams:
        for name in ("overlap", "serial"):
            unpaced = LoadSpec(**{**specs[name].__dict__, "paced": False, "max_in_flight": 2})
            point, _ = server_point(endpoints[name], unpaced, n, cfg.duration_s, cfg.grace_s, metrics)
            point["pipeline"] = name
            section[name].append(point)
            say(f"{name:8s} " + describe(point))
    return section


def run_soak(cfg: BenchConfig, endpoint: Endpoint, spec: LoadSpec, metrics) -> dict:
    section = section_header() | {"minutes": cfg.soak_minutes, "server_pipeline": endpoint.pipeline}
    seconds = cfg.soak_minutes * 60
    say(f"soak: one stream for {cfg.soak_minutes:g} min of looped audio ...")
    t0 = time.monotonic()
    point, timings = server_point(endpoint, spec, 1, seconds, cfg.grace_s, metrics)
    point.pop("stream0_latencies_s", None)
    timing = timings[0]
    section["point"] = point
    section["chunk_t_s"] = [d - timing.due[0] for d in timing.due[:len(timing.arrivals)]]
    section["chunk_latency_s"] = timing.latencies
    samples = [s for s in endpoint.sampler.series() if s["t"] >= t0]
    mem_key = "rss_bytes" if samples and "rss_bytes" in samples[0] else "host_memory_used_bytes"
    section["memory_source"] = "server process group RSS (psutil)" if mem_key == "rss_bytes" else "host used memory (metrics)"
    section["memory_t_s"] = [s["t"] - timing.due[0] for s in samples if s.get(mem_key) is not None]
    section["memory_mb"] = [s[mem_key] / 2**20 for s in samples if s.get(mem_key) is not None]
    section |= soak_verdict(section["chunk_t_s"], section["chunk_latency_s"], section["memory_t_s"], section["memory_mb"])
    say(f"soak: latency p50 {section['latency_p50_first_ms']:.0f} -> {section['latency_p50_last_ms']:.0f} ms, "
        f"memory {section['memory_first_mb']:.0f} -> {section['memory_last_mb']:.0f} MB "
        f"({section['memory_slope_mb_per_min']:+.2f} MB/min after warm-up): {'flat' if section['flat'] else 'NOT flat'}")
    return section


SOAK_MAX_LATENCY_DRIFT = 0.2  # p50 of the last tenth at most 20 % above the first tenth's ...
SOAK_MAX_MEMORY_SLOPE_MB_PER_MIN = 1.0  # ... and memory grows by less than 1 MB per minute after the first fifth


def soak_verdict(chunk_t: list[float], latency: list[float], mem_t: list[float], mem_mb: list[float]) -> dict:
    """Is the long stream flat? Latency: first vs last tenth of the chunks (chunk 0, TTFF, excluded).
    Memory: a least-squares slope over the run after its first fifth (allocators settle first)."""
    lat = np.asarray(latency[1:]) * 1000
    tenth = max(1, len(lat) // 10)
    out = {"latency_p50_first_ms": float(np.median(lat[:tenth])), "latency_p50_last_ms": float(np.median(lat[-tenth:])),
           "latency_p99_ms": float(np.percentile(lat, 99)),
           "latency_slope_ms_per_min": float(np.polyfit(np.asarray(chunk_t[1:]) / 60, lat, 1)[0]) if len(lat) > 2 else 0.0}
    m_t, m = np.asarray(mem_t), np.asarray(mem_mb)
    settled = m_t >= (m_t[-1] * 0.2 if len(m_t) else 0)
    out["memory_first_mb"] = float(m[0]) if len(m) else float("nan")
    out["memory_last_mb"] = float(m[-1]) if len(m) else float("nan")
    out["memory_slope_mb_per_min"] = (float(np.polyfit(m_t[settled] / 60, m[settled], 1)[0])
                                      if settled.sum() > 2 else float("nan"))
    drift = (out["latency_p50_last_ms"] - out["latency_p50_first_ms"]) / out["latency_p50_first_ms"]
    out["latency_drift"] = drift  # > 0: slower at the end (a stream that gets faster is not a soak failure)
    out["flat_rule"] = (f"p50 latency of the last tenth at most {SOAK_MAX_LATENCY_DRIFT:.0%} above the first tenth's, "
                        f"and memory slope after the first fifth <= {SOAK_MAX_MEMORY_SLOPE_MB_PER_MIN} MB/min")
    out["flat"] = bool(drift <= SOAK_MAX_LATENCY_DRIFT and out["memory_slope_mb_per_min"] <= SOAK_MAX_MEMORY_SLOPE_MB_PER_MIN)
    return out


# --- the run ----------------------------------------------------------------------------------------------


RUN_FIELDS = ("command", "modes", "machine", "settings", "load_at_start", "load_at_end", "server")


def merge_previous(path: Path, preset: str) -> dict:
    """Sections of an earlier run that this run does not redo are kept (e.g. a later long soak), with
    what their run recorded (`runs[run_id]`: command, machine, settings, load)."""
    try:
        old = json.loads(path.read_text()) if path.exists() else {}
    except json.JSONDecodeError:
        return {}
    if old.get("preset") != preset:
        return {}
    if "run_id" in old:  # the first format kept one run's facts at the top level
        old.setdefault("runs", {})[old.pop("run_id")] = {k: old.pop(k) for k in RUN_FIELDS if k in old}
    return old


def summary(result: dict) -> dict:
    """The headline figures, recomputed from the sections present."""
    out = {}
    cap, base = result.get("capacity"), result.get("baseline")
    if cap:
        out["capacity"] = cap["result"]["capacity"]
    if base:
        out["baseline_capacity"] = base["result"]["capacity"]
    if cap and base:
        out["ratio"] = (cap["result"]["capacity"] / base["result"]["capacity"]) if base["result"]["capacity"] else None
        out["ratio_same_run"] = cap.get("run_id") == base.get("run_id")
    over = result.get("overhead")
    if over and "overhead_chunk_latency_p50_ms" in over:
        out["overhead_p50_ms"] = over["overhead_chunk_latency_p50_ms"]
        out["overhead_p99_ms"] = over["overhead_chunk_latency_p99_ms"]
    pipe = result.get("pipeline")
    if pipe and pipe.get("overlap") and pipe.get("serial"):
        out["overlap_vs_serial"] = {str(a["streams"]): a["chunks_per_s"] / b["chunks_per_s"]
                                    for a, b in zip(pipe["overlap"], pipe["serial"]) if b.get("chunks_per_s")}
    soak = result.get("soak")
    if soak:
        out["soak_minutes"], out["soak_flat"] = soak["minutes"], soak["flat"]
    return out


def run(cfg: BenchConfig) -> dict:
    from flowact.benchmarks.loadgen import ClientMetrics

    run_id = now_iso()
    result = merge_previous(cfg.out, cfg.preset)
    result["preset"] = cfg.preset
    info = result.setdefault("runs", {})[run_id] = {
        "command": " ".join(sys.argv), "modes": sorted(cfg.modes), "machine": machine_facts()}
    info["settings"] = {
        "streams": cfg.streams, "duration_s": cfg.duration_s, "jitter_buffer_s": cfg.jitter_buffer,
        "max_in_flight_per_stream": cfg.max_in_flight, "grace_s": cfg.grace_s, "engine_threads": cfg.engine_threads,
        "pipeline_streams": cfg.pipeline_streams, "repeat": cfg.repeat,
        "capacity_rule": "largest N with stall rate <= 1 % and p99 chunk latency < 0.48 s, no failed stream",
        "latency": "arrival of a chunk's frames minus the time its audio existed (chunk i due 0.48 s * i after "
                   "the stream's start; streams start spread over one chunk period)",
        "stall": "a chunk arriving after its playback time: first arrival + jitter buffer + 0.48 s * i; chunks "
                 "that never arrived before the point's end count as stalls",
        "client": "asyncio tritonclient (tritonclient.grpc.aio), one gRPC stream per avatar stream, in the "
                  "benchmark's process (on the same cores as the server when it runs locally)"}
    say(f"load before measuring: {os.getloadavg()}")
    info["load_at_start"] = load_snapshot(exclude={os.getpid()})
    metrics = ClientMetrics(cfg.prometheus_port, cfg.prometheus_addr) if cfg.prometheus_port is not None else None
    if metrics is not None:
        say(f"client metrics on http://{cfg.prometheus_addr}:{metrics.port}/metrics")
    image, audio = inputs(cfg.preset)
    modes = set(cfg.modes)

    def stamp(section):
        section["run_id"] = run_id
        return section

    if "pipeline" in modes and cfg.url:
        say("pipeline mode skipped: it renders its own repositories (not with --url)")
        modes.discard("pipeline")
    endpoints: dict[str, Endpoint] = {}
    specs: dict[str, LoadSpec] = {}
    try:
        if modes & {"capacity", "overhead", "pipeline", "soak"}:
            endpoints["overlap"] = remote(cfg) if cfg.url else start_local(cfg, "overlap")
            if "pipeline" in modes:
                endpoints["serial"] = start_local(cfg, "serial")
            main = endpoints["overlap"]
            info["server"] = {"url": main.url, "started_by_benchmark": cfg.url is None,
                                "resources": "psutil over the tritonserver process group" if cfg.url is None else
                                "host-wide nv_cpu_* metrics from the server's metrics endpoint",
                                **server_version(main)}
            for name, endpoint in endpoints.items():
                specs[name] = LoadSpec(endpoint.url, cfg.preset, image, audio, max_in_flight=cfg.max_in_flight,
                                       jitter_buffer=cfg.jitter_buffer)
                warm_up(endpoint, specs[name], max([*cfg.streams, *cfg.pipeline_streams]))
        for name, section in run_sweep(cfg, modes, endpoints.get("overlap"), specs.get("overlap"), metrics).items():
            result[name] = stamp(section)
        if "pipeline" in modes:
            result["pipeline"] = stamp(run_pipeline(cfg, endpoints, specs, metrics))
        if "soak" in modes and cfg.soak_minutes > 0:
            result["soak"] = stamp(run_soak(cfg, endpoints["overlap"], specs["overlap"], metrics))
    finally:
        for name, endpoint in endpoints.items():
            faults = endpoint.stop()
            if faults:
                info.setdefault("server_faults", {})[name] = {"log": str(endpoint.server.log_path), "lines": faults}
                say(f"WARNING: the {name} server's log shows a crash ({endpoint.server.log_path}): {faults[0]}")
    info["load_at_end"] = {"loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()]}
    # Merge with the file as it is now, not as it was when this run started: another run (a long soak)
    # may have written its sections meanwhile.
    mine = {name: section for name, section in result.items()
            if isinstance(section, dict) and section.get("run_id") == run_id}
    result = merge_previous(cfg.out, cfg.preset) | {"preset": cfg.preset} | mine
    result["runs"] = result.get("runs", {}) | {run_id: info}
    used = {section["run_id"] for section in result.values() if isinstance(section, dict) and "run_id" in section}
    result["runs"] = {k: v for k, v in result["runs"].items() if k in used or k == run_id}
    result["summary"] = summary(result)
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    result = finite(result)
    cfg.out.write_text(json.dumps(result, indent=1))
    say(f"wrote {cfg.out}")
    return result


# --- CLI ----------------------------------------------------------------------------------------------------


def int_list(text: str) -> list[int]:
    values = [int(x) for x in text.split(",") if x.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,2,4, got {text!r}")
    return values


def mode_list(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    unknown = set(modes) - set(MODES)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown mode(s) {', '.join(sorted(unknown))}; choose from {', '.join(MODES)}")
    return modes


def add_parser(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks: `bench serve` (capacity vs baseline, overhead, pipeline, soak), "
                                         "`bench report`, `bench perf-data` (perf_analyzer input)")
    bsub = bench.add_subparsers(dest="bench_command", required=True, metavar="{serve,report,perf-data}")
    p = bsub.add_parser("serve", help="real-time capacity of the server vs the in-process baseline, and more",
                        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu")
    p.add_argument("--streams", type=int_list, default=[1, 2, 4], help="concurrent streams per load point, e.g. 1,2,4")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of audio per stream at each load point")
    p.add_argument("--url", default=None, help="HOST:PORT of a running server's gRPC endpoint (default: start one)")
    p.add_argument("--metrics-url", default=None, help="its metrics endpoint (default http://HOST:8002/metrics)")
    p.add_argument("--jitter-buffer", type=float, default=0.2,
                   help="seconds the player buffers after the first chunk before playback starts (stall rule)")
    p.add_argument("--prometheus-port", type=int, default=None,
                   help="expose the load generator's view (TTFF, chunk latency, stalls per stream) on this port")
    p.add_argument("--prometheus-addr", default="127.0.0.1", help="address of that endpoint (loopback by default)")
    p.add_argument("--modes", type=mode_list, default=mode_list(DEFAULT_MODES), help=f"comma list of {', '.join(MODES)}")
    p.add_argument("--soak-minutes", type=float, default=0.0, help="also run the soak mode for this long")
    p.add_argument("--pipeline-streams", type=int_list, default=None,
                   help="streams per point of the overlap-vs-serial mode (default: min and max of --streams)")
    p.add_argument("--onnx-dir", type=Path, default=None, help="ONNX export root (default artifacts/PRESET/onnx)")
    p.add_argument("--work-dir", type=Path, default=Path("artifacts/bench"), help="repositories and server logs")
    p.add_argument("--max-in-flight", type=int, default=3, help="chunks a paced stream may have outstanding")
    p.add_argument("--grace", type=float, default=None, help="seconds a point waits past its last due chunk "
                                                             "(default max(5, duration / 4))")
    p.add_argument("--engine-threads", type=int, default=2, help="ONNX Runtime threads per engine (server and overhead)")
    p.add_argument("--device", default="cpu", help="device of the in-process PyTorch baseline (cpu, cuda)")
    p.add_argument("--baseline-threads", type=int, default=None,
                   help="torch threads per baseline worker (default: try cores // N and 1, keep the better)")
    p.add_argument("--repeat", type=int, default=1,
                   help="attempts per N on each side, interleaved; the best is kept (noisy shared machines)")
    p.add_argument("--out", type=Path, default=None,
                   help="results JSON; plots go beside it (default runs/serve-PRESET-TIMESTAMP/serve_PRESET.json)")
    p.add_argument("--publish", action="store_true",
                   help="write to the published benchmarks/results/serve_PRESET.json (merged with its other sections) "
                        "and regenerate the table in benchmarks/README.md")
    p.add_argument("--no-report", action="store_true", help="do not draw the plots (nor, with --publish, the README table)")
    p.set_defaults(func=_serve)

    r = bsub.add_parser("report", help="redraw the plots and the README results table from the results JSON files")
    r.add_argument("--results", type=Path, default=RESULTS)
    r.add_argument("--readme", type=Path, default=Path(__file__).parent / "README.md")
    r.set_defaults(func=_report)

    from flowact.benchmarks import perf_data

    perf_data.add_parser(bsub)


def _stop_on_sigterm() -> None:
    """SIGTERM (a job runner, `kill`) unwinds like Ctrl-C, so the servers this run started are stopped."""
    import signal

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


def _serve(args) -> int:
    if args.publish and args.out is not None:
        raise SystemExit("--publish writes benchmarks/results/serve_PRESET.json: drop --out")
    _stop_on_sigterm()
    modes = list(args.modes)
    if args.soak_minutes > 0 and "soak" not in modes:
        modes.append("soak")
    if "soak" in modes and args.soak_minutes <= 0:
        raise SystemExit("--modes soak needs --soak-minutes")
    cfg = BenchConfig(preset=args.preset, streams=args.streams, duration_s=args.duration, modes=modes,
                      jitter_buffer=args.jitter_buffer, url=args.url, metrics_url=args.metrics_url,
                      prometheus_port=args.prometheus_port, prometheus_addr=args.prometheus_addr,
                      soak_minutes=args.soak_minutes,
                      pipeline_streams=args.pipeline_streams or [], onnx_dir=args.onnx_dir, work_dir=args.work_dir,
                      out=RESULTS / f"serve_{args.preset}.json" if args.publish else args.out, max_in_flight=args.max_in_flight,
                      grace_s=args.grace if args.grace is not None else max(5.0, args.duration / 4),
                      engine_threads=args.engine_threads, device=args.device,
                      baseline_threads=args.baseline_threads, repeat=max(1, args.repeat), plots=not args.no_report)
    result = run(cfg)
    s = result["summary"]
    say("summary: " + json.dumps(s))
    if cfg.plots:
        from flowact.benchmarks.report import plot, write_readme

        for png in plot(result, cfg.out.parent):
            say(f"wrote {png}")
        if args.publish:
            say(f"wrote {write_readme(RESULTS, Path(__file__).parent / 'README.md')}")
    say(f"results in {cfg.out}" + ("" if args.publish else " (not published; --publish writes benchmarks/results/ "
                                                             "and the README table)"))
    return 0


def _report(args) -> int:
    from flowact.benchmarks.report import plot, write_readme

    for path in sorted(args.results.glob("serve_*.json")):
        for png in plot(json.loads(path.read_text()), args.results):
            print(f"wrote {png}")
    print(f"wrote {write_readme(args.results, args.readme)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flowact")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
