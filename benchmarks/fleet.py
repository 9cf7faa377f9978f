"""The fleet rehearsal: replicas behind `flowact gateway`, streams that survive a drain, a kill and a scale-up.

    python -m flowact.benchmarks.fleet --preset tiny --replicas 3 --streams 12 --out benchmarks/results/fleet_tiny.json

Starts `--replicas` `flowact serve` processes (one shared FLOWACT_SNAPSHOT_KEY, each its own ports,
work folder and drain file) and `flowact gateway` in front of them, rendered with one replica more
than runs at first (the scale-up: it fails its health check until it is started). Then it runs
`--streams` real-time paced streams through the gateway with the shipped client and, during the run:
drains replica 1 (`flowact drain`, as the chart's preStop), SIGKILLs replica 2 (its launcher's
process group and tritonserver at once, as a pod's death) and starts the spare replica.

Reported per event: streams affected, chunks replayed, the viewer's gap (p50/p99/max), chunks lost
and duplicated, every failed-over stream's frames against an uninterrupted run of the same inputs;
streams per replica over time (sampled from each replica's flowact_active_streams, with the HPA
formula's desired replica count at each sample) and a plot with the events marked.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from flowact.contract import ACTIVE_STREAMS, DRAIN_FILE_ENV, SNAPSHOT_KEY_ENV
from flowact.serving.health import metric_value


def flowact_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "flowact.cli", *args]


def free_ports(n: int) -> list[int]:
    from flowact.serving.server import free_ports as free

    return free(n)


def get(url: str, timeout_s: float = 3.0) -> tuple[int, str]:
    """(status, body) of a GET; status 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError:
        return 0, ""


@dataclass
class Gateway:
    """`flowact gateway` as a process, with Envoy's admin interface on loopback to see its upstreams."""
    replicas: list[str]  # HOST:GRPCPORT:HEALTHPORT
    work_dir: Path
    idle_ttl_s: float | None = None
    listen_port: int = 0
    admin_port: int = 0
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.listen_port}"

    def start(self, healthy: int, timeout_s: float = 60.0) -> "Gateway":
        """Start Envoy and wait until `healthy` replicas pass their health checks."""
        self.listen_port, self.admin_port = free_ports(2)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        args = ["gateway", "--listen", self.url, "--admin", f"127.0.0.1:{self.admin_port}"]
        for r in self.replicas:
            args += ["--replica", r]
        if self.idle_ttl_s is not None:
            args += ["--idle-ttl", str(self.idle_ttl_s)]
        log = open(self.work_dir / "gateway.log", "wb")
        self.process = subprocess.Popen(flowact_command(*args), stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        self.wait_healthy(healthy, timeout_s)
        return self

    def upstreams(self) -> dict[str, dict[str, str]]:
        """Envoy's view of each replica: host:port -> {health_flags, rq_active, ...} (admin /clusters)."""
        status, text = get(f"http://127.0.0.1:{self.admin_port}/clusters")
        hosts: dict[str, dict[str, str]] = {}
        for line in text.splitlines() if status == 200 else []:
            parts = line.split("::")
            if len(parts) == 4 and parts[0] == "flowact":
                hosts.setdefault(parts[1], {})[parts[2]] = parts[3]
        return hosts

    def healthy(self) -> list[str]:
        return [h for h, v in self.upstreams().items() if v.get("health_flags") == "healthy"]

    def wait_healthy(self, n: int, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.healthy()) != n:
            if self.process.poll() is not None:
                raise RuntimeError(f"flowact gateway exited ({self.process.returncode}):\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"gateway: {n} healthy replicas expected within {timeout_s:.0f} s, "
                                   f"Envoy sees {self.upstreams()}\n{self.log_tail()}")
            time.sleep(0.2)

    def log_tail(self) -> str:
        return (self.work_dir / "gateway.log").read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclass
class ServeReplica:
    """One `flowact serve` process: its own ports, work folder and drain file; the fleet's snapshot key."""
    name: str
    repository: Path
    work_dir: Path
    snapshot_key: str
    ports: dict[str, int] = field(default_factory=dict)
    process: subprocess.Popen | None = None

    def __post_init__(self):
        if not self.ports:
            self.ports = dict(zip(("grpc", "http", "metrics", "health"), free_ports(4)))

    @property
    def drain_file(self) -> Path:
        return self.work_dir / "draining"

    @property
    def gateway_replica(self) -> str:
        return f"127.0.0.1:{self.ports['grpc']}:{self.ports['health']}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['metrics']}/metrics"

    def start(self) -> "ServeReplica":
        """Launch `flowact serve` (returns at once; `wait_ready` waits)."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, **{SNAPSHOT_KEY_ENV: self.snapshot_key, DRAIN_FILE_ENV: str(self.drain_file)})
        args = ["serve", "--preset", "tiny", "--repository", str(self.repository), "--work-dir", str(self.work_dir / "triton"),
                *(x for k, v in self.ports.items() for x in (f"--{k}-port", str(v)))]
        log = open(self.work_dir / "serve.log", "wb")
        self.process = subprocess.Popen(flowact_command(*args), stdout=log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
        return self

    def wait_ready(self, timeout_s: float = 120.0) -> "ServeReplica":
        deadline = time.monotonic() + timeout_s
        while get(f"http://127.0.0.1:{self.ports['health']}/ready")[0] != 200:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"replica {self.name} did not become ready:\n"
                                   f"{(self.work_dir / 'serve.log').read_text(errors='replace')[-3000:]}")
            time.sleep(0.3)
        return self

    def active_streams(self) -> float | None:
        status, text = get(self.metrics_url, timeout_s=2.0)
        return metric_value(text, ACTIVE_STREAMS) if status == 200 else None

    def drain(self) -> subprocess.Popen:
        """`flowact drain` (the chart's preStop) against this replica; returns the running process."""
        env = dict(os.environ, **{DRAIN_FILE_ENV: str(self.drain_file)})
        return subprocess.Popen(flowact_command("drain", "--deadline", "120", "--metrics-url", self.metrics_url),
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)

    def kill(self) -> None:
        """A pod's death: SIGKILL the launcher's process group and tritonserver at once (its connections
        break now); the launcher's guard then reaps the python stubs and their shared memory."""
        servers = [p for p in psutil.Process(self.process.pid).children(recursive=True) if p.name() == "tritonserver"]
        os.killpg(self.process.pid, signal.SIGKILL)
        for p in servers:
            p.kill()
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            time.sleep(0.5)
            self.process.send_signal(signal.SIGINT)  # a second signal skips the drain
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
