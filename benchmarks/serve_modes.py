"""The modes of `flowact bench serve` past the server's start: the capacity / baseline / overhead sweep
(interleaved per N), overlap vs serial pipeline, and the soak with its flatness verdict."""

from __future__ import annotations

import os
import time

import numpy as np

from flowact.benchmarks.kit import say
from flowact.benchmarks.loadgen import LoadSpec, realtime_capacity
from flowact.benchmarks.serve_baseline import baseline_point, best_of, has_export, inprocess_point
from flowact.benchmarks.serve_config import BenchConfig, now_iso
from flowact.benchmarks.serve_server import Endpoint, describe, server_point
from flowact.runtime import RuntimeKind


def section_header() -> dict:
    return {"measured_at": now_iso(), "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]}


def run_sweep(cfg: BenchConfig, modes: set[str], endpoint: Endpoint | None, spec: LoadSpec | None, metrics,
              other: Endpoint | None = None, other_spec: LoadSpec | None = None) -> dict:
    """capacity, baseline, precision and overhead, interleaved per N (ours N, baseline N, the server at the
    other precision N, [in-process ONNX at N=1]) so that every side sees the same background load on a
    shared machine."""
    sections: dict[str, dict] = {}
    if "capacity" in modes:
        sections["capacity"] = section_header() | {"server_pipeline": endpoint.pipeline or "unknown (remote)",
                                                   "server_precision": endpoint.precision or "unknown (remote)",
                                                   "points": []}
    if other is not None:
        sections["precision"] = section_header() | {
            "what": f"the same server and load with the networks at {other.precision} (ours: {endpoint.precision})",
            "server_precision": other.precision, "points": []}
    if "baseline" in modes:
        sections["baseline"] = section_header() | {
            "what": "in-process PyTorch StreamEngine, one unbatched stream per worker process (spawned), "
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
        tries: dict[str, list[dict]] = {"capacity": [], "baseline": [], "precision": [], "inproc": []}
        for attempt in range(cfg.repeat):
            if "capacity" in modes:
                point, _ = server_point(endpoint, spec, n, cfg.duration_s, cfg.grace_s, metrics)
                tries["capacity"].append(point)
                say(f"ours     {endpoint.precision or ''} " + describe(point))
            if other is not None:
                point, _ = server_point(other, other_spec, n, cfg.duration_s, cfg.grace_s, metrics)
                tries["precision"].append(point)
                say(f"ours     {other.precision} " + describe(point))
            if "baseline" in modes:
                point = baseline_point(cfg, n)
                tries["baseline"].append(point)
                say("baseline " + describe(point))
            if n == 1 and overhead and "capacity" in modes:
                point, _ = inprocess_point(cfg, RuntimeKind.ONNX, 1, cfg.engine_threads)
                tries["inproc"].append(point)
                say("in-proc  " + describe(point))
        for name in ("capacity", "baseline", "precision"):
            if tries[name]:
                sections[name]["points"].append(best_of(tries[name]))
        if n == 1 and tries["capacity"]:
            server_n1 = sections["capacity"]["points"][-1]
        if tries["inproc"]:
            inproc_n1 = best_of(tries["inproc"])
    for name in ("capacity", "baseline", "precision"):
        if name in sections:
            sections[name]["result"] = realtime_capacity(sections[name]["points"])
    if overhead:
        header = section_header()
        if server_n1 is None and endpoint is not None:
            server_n1, _ = server_point(endpoint, spec, 1, cfg.duration_s, cfg.grace_s, metrics)
            say("ours     " + describe(server_n1))
        if inproc_n1 is None:
            inproc_n1, _ = inprocess_point(cfg, RuntimeKind.ONNX, 1, cfg.engine_threads)
            say("in-proc  " + describe(inproc_n1))
        sections["overhead"] = overhead_section(cfg, header, server_n1, inproc_n1)
    return sections


def overhead_section(cfg: BenchConfig, header: dict, server_n1: dict | None, inproc: dict) -> dict:
    section = header | {
        "what": "N=1 paced at real time: chunk latency through the server (gRPC ensemble, ONNX Runtime in the "
                "stream model) vs the same ONNX files in process via flowact.runtime.build_runners(\"onnx\") "
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
