"""Server CPU and memory during a benchmark, and the facts about the machine it ran on.

Two sources of server resources:
- `ProcessGroupSource`: psutil over every process of the tritonserver process group (the server
  and its python-backend stubs; the launcher starts it with its own group). CPU is exact (cpu_times
  deltas); memory is the sum of RSS, which counts shared pages (libraries, the backend's /dev/shm
  regions) once per process, so it overstates the true footprint but tracks growth faithfully.
- `MetricsSource`: a server the benchmark did not start (`--url`): Triton's nv_cpu_utilization and
  nv_cpu_memory_used_bytes from its metrics endpoint. These are HOST-wide (whatever else runs on
  that machine counts too), and are reported as such.
"""

from __future__ import annotations

import os
import platform
from importlib import metadata
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import psutil

from flowact.serving.health import metric_value, scrape


class ProcessGroupSource:
    """Cumulative CPU seconds and summed RSS of a set of processes (a process group, or given pids)."""

    kind = "psutil"

    def __init__(self, pgid: int | None = None, pids: Callable[[], list[int]] | None = None):
        self.pgid, self.pids_fn = pgid, pids
        self.procs: dict[int, psutil.Process] = {}
        self.last_cpu: dict[int, float] = {}
        self.cpu_total = 0.0  # seconds, accumulated from per-process deltas (a process that exits keeps its share)
        self.first = True

    def pids(self) -> list[int]:
        if self.pids_fn is not None:
            return self.pids_fn()
        found = []
        for pid in psutil.pids():
            try:
                if os.getpgid(pid) == self.pgid:
                    found.append(pid)
            except OSError:
                pass
        return found

    def __call__(self) -> dict:
        rss, count = 0, 0
        for pid in self.pids():
            try:
                proc = self.procs.get(pid) or self.procs.setdefault(pid, psutil.Process(pid))
                with proc.oneshot():
                    t = proc.cpu_times()
                    cpu = t.user + t.system
                    rss += proc.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            self.cpu_total += cpu - self.last_cpu.get(pid, cpu if self.first else 0.0)
            self.last_cpu[pid] = cpu
            count += 1
        self.first = False
        return {"t": time.monotonic(), "cpu_s": self.cpu_total, "rss_bytes": rss, "processes": count}


class MetricsSource:
    """Host-wide CPU utilisation and used memory from a Triton metrics endpoint."""

    kind = "metrics"

    def __init__(self, metrics_url: str):
        self.url = metrics_url

    def __call__(self) -> dict | None:
        try:
            text = scrape(self.url, timeout=2.0)
        except OSError:
            return None
        util, used = metric_value(text, "nv_cpu_utilization"), metric_value(text, "nv_cpu_memory_used_bytes")
        if util is None and used is None:
            return None
        return {"t": time.monotonic(), "host_cpu_utilization": util, "host_memory_used_bytes": used}


@dataclass
class ResourceSampler:
    """Samples a source every `interval` seconds on a thread; `window(t0, t1)` summarises a span."""

    source: Callable[[], dict | None]
    interval: float = 1.0
    samples: list[dict] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> "ResourceSampler":
        self.sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def sample(self) -> None:
        s = self.source()
        if s is not None:
            self.samples.append(s)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.sample()

    def window(self, t0: float, t1: float) -> dict:
        inside = [s for s in self.samples if t0 <= s["t"] <= t1]
        if len(inside) < 2:
            return {}
        out: dict = {}
        if "cpu_s" in inside[0]:
            out["cpu_cores"] = (inside[-1]["cpu_s"] - inside[0]["cpu_s"]) / (inside[-1]["t"] - inside[0]["t"])
            rss = [s["rss_bytes"] for s in inside]
            out["rss_mb_mean"], out["rss_mb_max"] = sum(rss) / len(rss) / 2**20, max(rss) / 2**20
            out["processes"] = inside[-1]["processes"]
            out["source"] = "psutil: sum over the server's process group (RSS counts shared pages per process)"
        else:
            util = [s["host_cpu_utilization"] for s in inside if s["host_cpu_utilization"] is not None]
            used = [s["host_memory_used_bytes"] for s in inside if s["host_memory_used_bytes"] is not None]
            if util:
                out["host_cpu_utilization_mean"] = sum(util) / len(util)
            if used:
                out["host_memory_used_mb_mean"] = sum(used) / len(used) / 2**20
                out["host_memory_used_mb_max"] = max(used) / 2**20
            out["source"] = "Triton metrics nv_cpu_utilization / nv_cpu_memory_used_bytes (host-wide, not the server alone)"
        return out

    def series(self) -> list[dict]:
        return list(self.samples)


class CpuClock:
    """CPU seconds of this process (the load generator itself competes with the server for cores)."""

    def __init__(self):
        self.proc = psutil.Process()

    def __call__(self) -> float:
        t = self.proc.cpu_times()
        return t.user + t.system


def other_processes(top: int = 6, exclude: set[int] | None = None) -> list[dict]:
    """The busiest processes over one second (what else was running when we measured)."""
    exclude = exclude or set()
    procs = []
    for p in psutil.process_iter(["pid", "cmdline", "name", "nice"]):
        if p.pid in exclude:
            continue
        try:
            p.cpu_percent(None)
            procs.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    time.sleep(1.0)
    busy = []
    for p in procs:
        try:
            pct = p.cpu_percent(None)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if pct >= 5.0:
            cmd = " ".join(p.info.get("cmdline") or [p.info.get("name") or "?"])
            busy.append({"pid": p.pid, "cpu_percent": round(pct, 1), "nice": p.info.get("nice"), "command": cmd[:120]})
    return sorted(busy, key=lambda x: -x["cpu_percent"])[:top]


def load_snapshot(exclude: set[int] | None = None) -> dict:
    return {"loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()], "cpu_count": os.cpu_count(),
            "busy_processes": other_processes(exclude=exclude)}


def machine_facts() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    facts = {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
             "os": platform.platform(), "python": platform.python_version(), "hostname": platform.node()}
    for dist in ("torch", "onnxruntime", "numpy", "tritonclient", "nvidia-pytriton"):
        try:
            facts[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            facts[dist] = None
    try:  # with autogroup, CPU is shared per session first: nice values of other sessions' processes do not count
        facts["sched_autogroup"] = Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip() == "1"
    except OSError:
        facts["sched_autogroup"] = None
    try:
        import torch

        facts["torch_threads"] = torch.get_num_threads()
        facts["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        pass
    return facts
