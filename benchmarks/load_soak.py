"""Load soak: N real-time avatar streams against a real tritonserver for a bounded time.

    python -m flowact.benchmarks.load_soak --streams 4 --minutes 3          # starts its own tiny server
    python -m flowact.benchmarks.load_soak --streams 4 --minutes 30         # the full soak
    python -m flowact.benchmarks.load_soak --url 127.0.0.1:8001 --metrics-url http://127.0.0.1:8002/metrics

Each of `--streams` workers runs consecutive streams of `--stream-seconds` each (START, chunks paced
at real time, END), so the soak exercises long streams and stream churn at once. Per window it
reports chunks, errors, stalls (a chunk arriving after its playback time, with `--jitter-buffer`
seconds of client buffer), latency percentiles, the server's memory (its whole process group,
when this script started it: RSS, and PSS, which counts the python backend's shared memory once)
and its active-stream gauge. It passes when there is no error, stalls do not grow (the last window
has no more than the first, plus `--stall-slack`), and server RSS grows by less than
`--rss-growth-mib` over the second half of the run (the first half warms up: ONNX Runtime's
arenas grow in steps to the largest batch seen, measured +120-230 MiB for 20 tiny streams, then
stay flat). Writes benchmarks/results/load_soak.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from flowact.benchmarks.kit import RESULTS
from flowact.client.stream import AvatarStream, StreamError
from flowact.contract import ACTIVE_STREAMS, DRAIN_FILE_ENV
from flowact.presets import CHUNK_SECONDS, SAMPLES_PER_CHUNK
from flowact.stats import percentile


@dataclass
class Chunk:
    worker: int
    sent: float  # seconds since the soak started
    latency: float
    late: bool  # arrived after its playback time


@dataclass
class Window:
    start_s: float
    chunks: int
    errors: int
    stalls: int
    p50_ms: float
    p99_ms: float
    server_rss_mib: float | None  # at the window's last sample
    server_pss_mib: float | None
    active_streams: float | None


@dataclass
class SoakReport:
    streams: int
    duration_s: float
    stream_seconds: float
    jitter_buffer_s: float
    chunks: int
    streams_completed: int
    errors: list[str]
    stalls: int
    p50_ms: float
    p99_ms: float
    rss_cold_mib: float | None  # before the first stream
    rss_start_mib: float | None  # half way (warm)
    rss_end_mib: float | None
    pss_start_mib: float | None
    pss_end_mib: float | None
    windows: list[Window] = field(default_factory=list)
    machine: str = field(default_factory=platform.processor)

    @property
    def rss_growth_mib(self) -> float | None:
        if self.rss_start_mib is None or self.rss_end_mib is None:
            return None
        return self.rss_end_mib - self.rss_start_mib

    def verdict(self, stall_slack: int = 0, rss_growth_mib: float = 64.0) -> list[str]:
        """What failed (empty: passed)."""
        failed = []
        if self.errors:
            failed.append(f"{len(self.errors)} errors, first: {self.errors[0]}")
        if len(self.windows) >= 2 and self.windows[-1].stalls > self.windows[0].stalls + stall_slack:
            failed.append(f"stalls grew: {self.windows[0].stalls} in the first window, {self.windows[-1].stalls} in the last")
        growth = self.rss_growth_mib
        if growth is not None and growth > rss_growth_mib:
            failed.append(f"server RSS grew by {growth:.0f} MiB (bound {rss_growth_mib:.0f})")
        return failed

    def table(self) -> str:
        def mib(v):
            return "-" if v is None else f"{v:.0f}"

        rows = [f"{'window':>8} {'chunks':>7} {'errors':>6} {'stalls':>6} {'p50 ms':>7} {'p99 ms':>7} "
                f"{'RSS MiB':>8} {'PSS MiB':>8} {'active':>6}"]
        for w in self.windows:
            rows.append(f"{w.start_s:>7.0f}s {w.chunks:>7} {w.errors:>6} {w.stalls:>6} {w.p50_ms:>7.1f} {w.p99_ms:>7.1f} "
                        f"{mib(w.server_rss_mib):>8} {mib(w.server_pss_mib):>8} {mib(w.active_streams):>6}")
        rows.append(f"total: {self.chunks} chunks in {self.streams_completed} streams, {len(self.errors)} errors, "
                    f"{self.stalls} stalls, p50 {self.p50_ms:.1f} ms, p99 {self.p99_ms:.1f} ms"
                    + ("" if self.rss_growth_mib is None else
                       f"; server RSS {mib(self.rss_cold_mib)} cold, {mib(self.rss_start_mib)} half way -> "
                       f"{mib(self.rss_end_mib)} MiB (PSS {mib(self.pss_start_mib)} -> {mib(self.pss_end_mib)})"))
        return "\n".join(rows)


def speech(n: int, seed: int) -> list[np.ndarray]:
    """n chunks of speech-like audio (modulated tone + noise), float32 (7680,) each."""
    rng = np.random.default_rng(seed)
    t = np.arange(n * SAMPLES_PER_CHUNK) / 16_000
    audio = 0.3 * np.sin(2 * np.pi * 180 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)) + 0.02 * rng.standard_normal(t.shape)
    return list(audio.astype(np.float32).reshape(n, SAMPLES_PER_CHUNK))


def soak(url: str, streams: int, duration_s: float, stream_seconds: float = 60.0, jitter_buffer_s: float = 0.5,
         window_s: float = 60.0, image: np.ndarray | None = None, server_pgid: int | None = None,
         metrics_url: str | None = None, say=print) -> SoakReport:
    """Run `streams` real-time streams back to back until `duration_s` has passed (bounded: every
    stream ends by the deadline, every wait has a timeout)."""
    from flowact.serving.processes import group_rss

    height = width = None
    if image is None:
        height, width = _geometry(url)
        image = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    chunks_per_stream = max(1, int(round(stream_seconds / CHUNK_SECONDS)))
    t0 = time.monotonic()
    deadline = t0 + duration_s
    lock = threading.Lock()
    records: list[Chunk] = []
    errors: list[tuple[float, str]] = []
    completed = [0]

    def worker(w: int):
        n = 0
        while True:
            left = deadline - time.monotonic()
            count = min(chunks_per_stream, int(left / CHUNK_SECONDS) - 1)
            if count < min(chunks_per_stream, 4):  # too little time left for a stream worth the name
                return
            n += 1
            try:
                with AvatarStream(url, stream_id=f"soak-{w}-{n}", timeout_s=30) as stream:
                    result = stream.run(image, speech(count, seed=w * 1000 + n), seed=n, realtime=True)
            except (StreamError, OSError) as e:
                with lock:
                    errors.append((time.monotonic() - t0, str(e)))
                time.sleep(1.0)  # do not spin on a failing server
                continue
            first = result.arrival_times[0] + jitter_buffer_s
            with lock:
                completed[0] += 1
                for i, (s, a) in enumerate(zip(result.send_times, result.arrival_times)):
                    records.append(Chunk(w, s - t0, a - s, a > first + i * CHUNK_SECONDS + 1e-9))

    samples: list[tuple[float, float | None, float | None, float | None]] = []  # (t, RSS, PSS MiB, active streams)
    stop = threading.Event()

    def sample():
        rss = None if server_pgid is None else group_rss(server_pgid) / 2**20
        pss = None if server_pgid is None else group_rss(server_pgid, proportional=True) / 2**20
        active = None
        if metrics_url is not None:
            try:
                from flowact.serving.health import metric_value

                with urllib.request.urlopen(metrics_url, timeout=5) as r:
                    active = metric_value(r.read().decode(), ACTIVE_STREAMS)
            except OSError:
                pass
        samples.append((time.monotonic() - t0, rss, pss, active))

    def sampler():
        while not stop.wait(min(10.0, window_s / 2, duration_s / 4)):
            sample()

    sample()
    threads = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(streams)]
    monitor = threading.Thread(target=sampler, daemon=True)
    monitor.start()
    for t in threads:
        t.start()
        time.sleep(CHUNK_SECONDS / streams)  # stagger the streams over one chunk period
    for t in threads:
        t.join(timeout=duration_s + 120)
    stop.set()
    monitor.join(timeout=30)
    sample()
    hung = sum(t.is_alive() for t in threads)
    if hung:
        errors.append((time.monotonic() - t0, f"{hung} stream workers still running after the deadline"))

    windows = []
    for start in np.arange(0.0, max(duration_s, 1e-9), window_s):
        end = start + window_s
        rows = [r for r in records if start <= r.sent < end]
        lat = [r.latency for r in rows]
        in_window = [s for s in samples if start <= s[0] < end] or samples[-1:]
        windows.append(Window(float(start), len(rows), sum(start <= t < end for t, _ in errors),
                              sum(r.late for r in rows), 1e3 * percentile(lat, 50), 1e3 * percentile(lat, 99),
                              in_window[-1][1], in_window[-1][2], in_window[-1][3]))
        say(f"window {start:.0f}s: {len(rows)} chunks, {windows[-1].stalls} stalls, {windows[-1].errors} errors")
    lat = [r.latency for r in records]
    half = [s for s in samples if s[0] <= duration_s / 2][-1]  # the second half must not grow
    return SoakReport(streams, duration_s, stream_seconds, jitter_buffer_s, len(records), completed[0],
                      [e for _, e in errors], sum(r.late for r in records), 1e3 * percentile(lat, 50),
                      1e3 * percentile(lat, 99), samples[0][1], half[1], samples[-1][1], half[2], samples[-1][2],
                      windows)


def _geometry(url: str) -> tuple[int, int]:
    from flowact.client.cli import server_geometry

    return server_geometry(url)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=4, help="concurrent real-time streams (the preset's capacity)")
    ap.add_argument("--minutes", type=float, default=3.0, help="soak duration (30 for the full soak)")
    ap.add_argument("--stream-seconds", type=float, default=60.0, help="length of each stream before it ENDs")
    ap.add_argument("--jitter-buffer", type=float, default=0.5, help="client playback buffer, seconds")
    ap.add_argument("--window", type=float, default=60.0, help="report window, seconds")
    ap.add_argument("--url", default=None, help="gRPC HOST:PORT of a running server (default: start a tiny server)")
    ap.add_argument("--metrics-url", default=None)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--capacity", type=int, default=None, help="server capacity when starting one (default: streams + 2)")
    ap.add_argument("--stall-slack", type=int, default=0)
    ap.add_argument("--rss-growth-mib", type=float, default=64.0)
    ap.add_argument("--out", type=Path, default=RESULTS / "load_soak.json")
    args = ap.parse_args(argv)

    server = None
    url, metrics_url, pgid = args.url, args.metrics_url, None
    if url is None:
        from flowact.serving.repository import RepositoryOptions, build_embedded_repository
        from flowact.serving.processes import free_ports
        from flowact.serving.server import TritonServer

        work = Path(tempfile.mkdtemp(prefix="flowact-soak-"))
        opts = RepositoryOptions(capacity=args.capacity or args.streams + 2, idle_ttl_s=10.0)
        repo = build_embedded_repository(args.preset, work / "repository", opts=opts)
        ports = free_ports(3)
        server = TritonServer(repo, ports[0], ports[1], ports[2], work_dir=work / "triton",
                              extra_env={DRAIN_FILE_ENV: str(work / "draining")}).start(timeout_s=180)
        url, metrics_url, pgid = f"127.0.0.1:{ports[0]}", f"http://127.0.0.1:{ports[2]}/metrics", server.process.pid
        print(f"started a {args.preset} server on {url} (log {server.log_path})", flush=True)
    try:
        report = soak(url, args.streams, args.minutes * 60, args.stream_seconds, args.jitter_buffer, args.window,
                      server_pgid=pgid, metrics_url=metrics_url)
    finally:
        if server is not None:
            server.stop()
    print(report.table())
    failed = report.verdict(args.stall_slack, args.rss_growth_mib)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**asdict(report), "rss_growth_mib": report.rss_growth_mib, "failed": failed},
                                   indent=2))
    print(f"wrote {args.out}")
    print("PASS" if not failed else "FAIL: " + "; ".join(failed))
    return 0 if not failed else 1


if __name__ == "__main__":
    raise SystemExit(main())
