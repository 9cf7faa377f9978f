"""`flowact bench serve`'s settings: one run's configuration and where its results go."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

from flowact.runtime.manifest import CPU_PRECISIONS, cpu_precision
from flowact.serving.repository import embedded_export_root

RUNS = Path("runs")  # default parent of a run's own directory, relative to the working directory
MODES = ("capacity", "baseline", "overhead", "pipeline", "soak", "precision")
DEFAULT_MODES = "capacity,baseline,overhead,pipeline"
# The product default. Shorter would free the streams a point abandons (overload) sooner, but Triton
# then drops the sequence of a stream that could not send for that long because the server was
# behind, and its next chunk fails ("must specify the START flag").
IDLE_TTL_S = 30.0


@dataclass
class BenchConfig:
    preset: str
    streams: list[int]  # concurrent streams per load point of capacity and baseline
    duration_s: float  # seconds of audio per stream per point
    modes: list[str]  # of MODES
    jitter_buffer: float = 0.2  # seconds the player buffers after the first chunk (the stall rule)
    url: str | None = None  # a running server's gRPC HOST:PORT; None: the benchmark starts one
    metrics_url: str | None = None  # that server's metrics endpoint (None: http://HOST:8002/metrics)
    prometheus_port: int | None = None  # expose the load generator's own metrics here
    prometheus_addr: str = "127.0.0.1"
    soak_minutes: float = 0.0
    pipeline_streams: list[int] = field(default_factory=list)  # streams per point of overlap vs serial
    onnx_dir: Path | None = None  # the ONNX export the server and the overhead reference run
    work_dir: Path = Path("artifacts/bench")  # repositories and server logs
    out: Path | None = None  # the results JSON; plots beside it
    max_in_flight: int = 3  # chunks a paced stream may have outstanding
    grace_s: float = 5.0  # seconds a point waits past its last due chunk
    engine_threads: int = 2  # ONNX Runtime intra-op threads per network (server and overhead reference)
    device: str = "cpu"  # of the in-process PyTorch baseline
    baseline_threads: int | None = None  # torch threads per baseline worker; None: try cores // N and 1
    repeat: int = 1  # attempts per N for ours, the baseline and the in-process reference; the best is kept
    plots: bool = True
    precision: str | None = None  # the server's (embedded) networks; None: the preset's default

    def __post_init__(self):
        self.precision = cpu_precision(self.preset, self.precision).value
        self.onnx_dir = Path(self.onnx_dir or embedded_export_root(self.preset))
        self.out = Path(self.out or run_dir(self.preset) / f"serve_{self.preset}.json")
        self.pipeline_streams = self.pipeline_streams or sorted({min(self.streams), max(self.streams)})

    @property
    def other_precisions(self) -> list[str]:
        """What the precision mode compares the server's precision with."""
        return [p.value for p in CPU_PRECISIONS if p.value != self.precision]


def run_dir(preset: str, root: Path = RUNS) -> Path:
    """Where a run writes by default: ./runs/serve-PRESET-UTCSTAMP (not the published results/)."""
    return root / f"serve-{preset}-{dt.datetime.now(dt.timezone.utc).strftime('%Y%m%dT%H%M%SZ')}"


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")

