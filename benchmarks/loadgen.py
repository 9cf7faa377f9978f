"""Load generator for `flowact bench serve`: per-stream timings, their statistics, and a driver that
runs many avatar streams at once, a thread each, through the shipped client (`AvatarStream.run`,
so streams fail over as `flowact stream` does, and the timings count their failovers).

Timing model. Chunk i of a stream is *due* at `t_start + i * 0.48 s` (its audio exists from then
on: a live speaker); its latency is arrival minus due time, so a client that falls behind (a full
in-flight window, a slow server) shows up as latency and is not hidden by a late send. TTFF is the
latency of chunk 0 (it carries START: reference image upload, VAE encode, session setup). Playback
starts when chunk 0 arrives plus the jitter buffer; a chunk arriving after its playback time is a
stall (`flowact.stats.count_stalls`). Chunks that never arrive before the point's deadline count as
stalls too.

The statistics here know nothing about gRPC or processes: the in-process baseline workers fill the
same `StreamTiming` and are judged by the same rules.
"""

from __future__ import annotations

import itertools
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
import numpy as np

from flowact.client.stream import AvatarStream, FailoverPolicy, StreamError, new_stream_id
from flowact.contract import ENSEMBLE_MODEL
from flowact.presets import CHUNK_SECONDS, FRAMES_PER_CHUNK, SAMPLES_PER_CHUNK
from flowact.stats import count_stalls, percentile

MAX_STALL_RATE = 0.01  # real time: at most 1 % of chunks late for playback ...
MAX_P99_LATENCY_S = CHUNK_SECONDS  # ... and p99 chunk latency under one chunk's duration


# --- per-stream timings and their statistics ---------------------------------------------------


@dataclass
class StreamTiming:
    """What one stream saw. Times are time.monotonic() seconds (one clock for all processes)."""

    stream_id: int | str
    expected: int = 0  # chunks the stream meant to send (0: open-ended, unpaced mode)
    due: list[float] = field(default_factory=list)  # when chunk i's audio existed (latency is measured from here)
    sent: list[float] = field(default_factory=list)  # when chunk i actually left
    arrivals: list[float] = field(default_factory=list)  # when chunk i's frames arrived, in order
    error: str | None = None  # the server's (or the client's) message when the stream failed
    failovers: list[dict] = field(default_factory=list)  # flowact.client.stream.Failover, as dicts

    @property
    def latencies(self) -> list[float]:
        return [a - d for d, a in zip(self.due, self.arrivals)]

    @property
    def ttff(self) -> float:
        return self.arrivals[0] - self.due[0] if self.arrivals else float("nan")

    @property
    def missing(self) -> int:
        """Chunks meant to be played that never arrived (stream failed or point deadline passed)."""
        return max(0, self.expected - len(self.arrivals))

    def stalls(self, jitter_buffer: float) -> int:
        late = count_stalls(self.arrivals, self.arrivals[0], jitter_buffer) if self.arrivals else 0
        return late + self.missing

    def fps(self) -> float:
        """Frames delivered per second after the first chunk: chunks 1.. over the span from chunk 1's
        arrival to the end of the last one's playback slot (25 when the stream keeps up; chunk 0 is
        left out because its START work makes TTFF differ from the steady latency)."""
        if len(self.arrivals) < 2:
            return float("nan")
        return FRAMES_PER_CHUNK * (len(self.arrivals) - 1) / (self.arrivals[-1] - self.arrivals[1] + CHUNK_SECONDS)

    def to_json(self) -> dict:
        return asdict(self)


def playback_deadline(index: int, first_arrival: float, jitter_buffer: float) -> float:
    """When chunk `index` must have arrived (the rule of flowact.stats.count_stalls)."""
    return first_arrival + jitter_buffer + index * CHUNK_SECONDS + 1e-9


def summarise(streams: list[StreamTiming], jitter_buffer: float) -> dict:
    """One load point (N streams) -> the figures the benchmark reports.

    Chunk latency pools chunks 1.. of every stream (chunk 0 is TTFF); stall rate is stalled (late or
    missing) chunks over chunks expected."""
    ttffs = [s.ttff for s in streams if s.arrivals]
    latencies = [x for s in streams for x in s.latencies[1:]]
    expected = sum(max(s.expected, len(s.arrivals)) for s in streams)
    stalls = sum(s.stalls(jitter_buffer) for s in streams)
    fps = [s.fps() for s in streams]
    errors = [f"{s.stream_id}: {s.error}" for s in streams if s.error]
    point = {
        "streams": len(streams),
        "chunks": sum(len(s.arrivals) for s in streams),
        "chunks_expected": expected,
        "missing_chunks": sum(s.missing for s in streams),
        "failovers": sum(len(s.failovers) for s in streams),
        "errors": errors,
        "ttff_p50_s": percentile(ttffs, 50), "ttff_p99_s": percentile(ttffs, 99),
        "ttff_max_s": max(ttffs) if ttffs else float("nan"),
        "chunk_latency_p50_s": percentile(latencies, 50), "chunk_latency_p99_s": percentile(latencies, 99),
        "chunk_latency_max_s": max(latencies) if latencies else float("nan"),
        "jitter_buffer_s": jitter_buffer,
        "stalls": stalls,
        "stall_rate": stalls / expected if expected else float("nan"),
        "fps_per_stream_mean": float(np.nanmean(fps)) if fps else float("nan"),
        "fps_per_stream_min": float(np.nanmin(fps)) if fps else float("nan"),
    }
    point["realtime"] = is_realtime(point)
    return point


def is_realtime(point: dict) -> bool:
    """The capacity rule: no failed stream, stall rate <= 1 %, p99 chunk latency < 0.48 s."""
    p99 = point["chunk_latency_p99_s"]
    return (not point["errors"] and point["chunks"] > 0 and point["stall_rate"] <= MAX_STALL_RATE
            and p99 == p99 and p99 < MAX_P99_LATENCY_S)


def realtime_capacity(points: list[dict]) -> dict:
    """Real-time capacity = the largest N whose point is real time (0 if none is).

    `lower_bound`: the largest N tried was still real time, so the true capacity may be higher.
    `non_monotonic`: a smaller N failed although a larger one passed (noise: rerun on a quiet machine)."""
    by_n = sorted(points, key=lambda p: p["streams"])
    passing = [p["streams"] for p in by_n if p["realtime"]]
    capacity = max(passing, default=0)
    return {"capacity": capacity,
            "lower_bound": bool(by_n) and capacity == by_n[-1]["streams"],
            "non_monotonic": any(not p["realtime"] and p["streams"] < capacity for p in by_n),
            "tested": [p["streams"] for p in by_n]}


# --- inputs --------------------------------------------------------------------------------------


class AudioLoop:
    """Endless audio for one stream: a recording looped, starting at a per-stream offset so that
    concurrent streams do not send identical chunks."""

    def __init__(self, audio: np.ndarray, offset_samples: int = 0):
        self.audio = np.asarray(audio, dtype=np.float32)
        self.offset = offset_samples % len(self.audio)

    def chunk(self, i: int) -> np.ndarray:
        start = self.offset + i * SAMPLES_PER_CHUNK
        return np.take(self.audio, np.arange(start, start + SAMPLES_PER_CHUNK), mode="wrap")  # (7680,) f32


def stream_audio(audio: np.ndarray, index: int) -> AudioLoop:
    return AudioLoop(audio, offset_samples=int(index * 1.37 * 16_000))


# --- client-side Prometheus view -----------------------------------------------------------------


class ClientMetrics:
    """The load generator's own view on a Prometheus endpoint (prometheus-client), so a load test can
    be watched next to the server's metrics. Stream ids are labels: a load test has few streams."""

    def __init__(self, port: int | None = None, addr: str = "127.0.0.1"):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

        self.registry = CollectorRegistry()
        buckets = (0.05, 0.1, 0.2, 0.3, 0.4, 0.48, 0.6, 0.8, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
        self.ttff = Histogram("flowact_client_ttff_seconds", "time to first frame seen by the client",
                              ["preset"], buckets=buckets, registry=self.registry)
        self.latency = Histogram("flowact_client_chunk_latency_seconds", "chunk latency seen by the client (from the "
                                 "time its audio existed)", ["preset"], buckets=buckets, registry=self.registry)
        self.chunks = Counter("flowact_client_chunks", "chunks received", ["preset", "stream"], registry=self.registry)
        self.stalls = Counter("flowact_client_stalls", "chunks that arrived after their playback deadline",
                              ["preset", "stream"], registry=self.registry)
        self.errors = Counter("flowact_client_stream_errors", "streams that failed", ["preset"], registry=self.registry)
        self.failovers = Counter("flowact_client_failovers", "streams continued on another replica (or after a "
                                 "refused START) by the client's failover", ["preset"], registry=self.registry)
        self.active = Gauge("flowact_client_active_streams", "streams the load generator is running", ["preset"],
                            registry=self.registry)
        self.target = Gauge("flowact_client_target_streams", "streams of the current load point", ["preset"],
                            registry=self.registry)
        self.port = None
        if port is not None:
            server, _ = start_http_server(port, addr=addr, registry=self.registry)
            self.port = server.server_port

    def text(self) -> str:
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()


class _NoMetrics:
    def __getattr__(self, name):
        return self

    def __call__(self, *args, **kwargs):
        return self

    def labels(self, *args, **kwargs):
        return self


# --- the driver: the shipped client, a thread per stream -----------------------------------------


@dataclass
class LoadSpec:
    url: str
    preset: str
    image: np.ndarray  # (H, W, 3) uint8 reference image
    audio: np.ndarray  # (S,) float32 16 kHz, looped per stream
    model: str = ENSEMBLE_MODEL
    paced: bool = True  # real time; False: as fast as the in-flight window allows
    max_in_flight: int = 3  # chunks a stream may have outstanding
    jitter_buffer: float = 0.2
    timeout_s: float = 120.0
    failover: FailoverPolicy | None = FailoverPolicy()  # continue streams whose replica goes away (None: fail)


def drive_stream(spec: LoadSpec, index: int, t_start: float, until: float, chunks: int | None,
                 metrics=None) -> StreamTiming:
    """One avatar stream through the shipped client (`AvatarStream.run`, failover included), on its
    own gRPC stream. Paced: `chunks` chunks due every 0.48 s from `t_start`. Unpaced: chunks as fast
    as the window allows until `until`. Either way the stream gives up at `until` (paced) or
    `until + timeout` (unpaced)."""
    metrics = metrics or _NoMetrics()
    timing = StreamTiming(new_stream_id(), expected=chunks or 0)
    loop_audio = stream_audio(spec.audio, index)
    label = str(index)

    def audio():
        for i in itertools.count():
            if chunks is not None and i == chunks:
                return
            if chunks is None and i > 0 and time.monotonic() >= until:
                return
            yield loop_audio.chunk(i)

    def on_chunk(frames: np.ndarray) -> None:  # chunk k arrived: the live metrics
        arrivals = stream.result.arrival_times
        k = len(arrivals) - 1
        due = t_start + k * CHUNK_SECONDS if spec.paced else stream.result.send_times[k]
        if k == 0:
            metrics.ttff.labels(spec.preset).observe(arrivals[k] - due)
        else:
            metrics.latency.labels(spec.preset).observe(arrivals[k] - due)
            if arrivals[k] > playback_deadline(k, arrivals[0], spec.jitter_buffer):
                metrics.stalls.labels(spec.preset, label).inc()
        metrics.chunks.labels(spec.preset, label).inc()

    metrics.active.labels(spec.preset).inc()
    stream = AvatarStream(spec.url, timing.stream_id, spec.model, spec.timeout_s, failover=spec.failover)
    try:
        stream.run(spec.image, audio(), seed=index, realtime=spec.paced, max_in_flight=spec.max_in_flight,
                   on_chunk=on_chunk, start_at=t_start, deadline=until + (0.0 if spec.paced else spec.timeout_s))
    except StreamError as e:  # a broken stream is a result, not a crash of the benchmark
        timing.error = str(e)
        metrics.errors.labels(spec.preset).inc()
    finally:
        metrics.active.labels(spec.preset).dec()
        stream.close(cancel_requests=True)
    result = stream.result
    metrics.failovers.labels(spec.preset).inc(len(result.failovers))
    timing.stream_id = stream.stream_id  # the last one (each failover STARTs under a fresh id)
    timing.sent, timing.arrivals = result.send_times, result.arrival_times
    timing.due = [t_start + i * CHUNK_SECONDS for i in range(len(timing.sent))] if spec.paced else list(timing.sent)
    timing.failovers = [asdict(f) for f in result.failovers]
    if not spec.paced:
        if timing.error is None and len(timing.arrivals) < len(timing.sent):
            timing.error = f"no response within {spec.timeout_s:.0f} s"
        timing.expected = len(timing.arrivals) if timing.error is None else len(timing.sent)
    return timing


def run_point(spec: LoadSpec, n: int, duration_s: float, grace_s: float = 5.0, metrics=None,
              stagger: bool = True) -> list[StreamTiming]:
    """N streams at once, a thread each. Paced streams start spread over one chunk period (live
    streams do not arrive in lock step) and each sends ceil(duration / 0.48) chunks; the point ends
    when every chunk arrived or `grace_s` after the last one was due."""
    chunks = max(2, int(np.ceil(duration_s / CHUNK_SECONDS))) if spec.paced else None
    t0 = time.monotonic() + 0.2
    until = t0 + (chunks * CHUNK_SECONDS + CHUNK_SECONDS + grace_s if spec.paced else duration_s)
    if metrics is not None:
        metrics.target.labels(spec.preset).set(n)
    with ThreadPoolExecutor(max_workers=n) as pool:
        futures = [pool.submit(drive_stream, spec, k, t0 + (k * CHUNK_SECONDS / n if stagger else 0.0), until, chunks,
                               metrics) for k in range(n)]
        return [f.result() for f in futures]


def throughput(streams: list[StreamTiming]) -> dict:
    """Unpaced point: chunks and frames per second over the busy window, latency under load."""
    arrivals = [a for s in streams for a in s.arrivals]
    sent = [t for s in streams for t in s.sent]
    if not arrivals:
        return {"streams": len(streams), "chunks": 0, "chunks_per_s": 0.0, "fps_total": 0.0,
                "errors": [s.error for s in streams if s.error]}
    wall = max(arrivals) - min(sent)
    chunks = len(arrivals)
    latencies = [a - d for s in streams for d, a in zip(s.due[1:], s.arrivals[1:])]
    return {"streams": len(streams), "chunks": chunks, "wall_s": wall, "chunks_per_s": chunks / wall,
            "fps_total": FRAMES_PER_CHUNK * chunks / wall,
            "realtime_streams_equivalent": chunks / wall * CHUNK_SECONDS,
            "chunk_latency_p50_s": percentile(latencies, 50), "chunk_latency_p99_s": percentile(latencies, 99),
            "errors": [f"{s.stream_id}: {s.error}" for s in streams if s.error]}

