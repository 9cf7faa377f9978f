"""Statistics shared by the in-process generator, the gRPC client and the benchmarks: latency, stalls, frame PSNR."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flowact.presets import CHUNK_SECONDS


def percentile(values, q: float) -> float:
    """q-th percentile (0..100) with linear interpolation; NaN for no values."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else float("nan")


def psnr_db(mse: float) -> float:
    """PSNR (dB) of 8-bit frames from their mean squared error (floored at 1e-12: identical frames give 168 dB)."""
    return float(10 * np.log10(255.0 ** 2 / max(mse, 1e-12)))


def count_stalls(arrivals: list[float], first_arrival: float, jitter_buffer: float = 0.0) -> int:
    """Chunks that arrive after their playback deadline.

    Playback of chunk 0 starts when it arrives plus `jitter_buffer` seconds; chunk i is due
    CHUNK_SECONDS * i later. Times are seconds on one clock."""
    start = first_arrival + jitter_buffer
    return sum(1 for i, t in enumerate(arrivals) if t > start + i * CHUNK_SECONDS + 1e-9)


@dataclass(frozen=True)
class StreamSummary:
    chunks: int
    ttff_s: float  # time to first frame
    p50_s: float  # chunk latency percentiles
    p99_s: float
    stalls: int
    realtime_factor: float  # wall time generating / media time generated (< 1 is faster than real time)

    @classmethod
    def from_timings(cls, ttff: float, latencies: list[float], arrivals: list[float], busy_s: float,
                     jitter_buffer: float = 0.0) -> "StreamSummary":
        """arrivals: seconds since the stream began; busy_s: wall seconds spent producing the chunks."""
        n = len(latencies)
        stalls = count_stalls(arrivals, arrivals[0], jitter_buffer) if arrivals else 0
        return cls(n, ttff, percentile(latencies, 50), percentile(latencies, 99), stalls, busy_s / max(n * CHUNK_SECONDS, 1e-9))

    def lines(self) -> str:
        return (f"chunks            {self.chunks}\n"
                f"time to 1st frame {self.ttff_s * 1000:.1f} ms\n"
                f"chunk latency     p50 {self.p50_s * 1000:.1f} ms  p99 {self.p99_s * 1000:.1f} ms "
                f"(real time: < {CHUNK_SECONDS * 1000:.0f} ms)\n"
                f"stalls            {self.stalls}\n"
                f"real-time factor  {self.realtime_factor:.3f}")
