"""The fleet rehearsal: replicas behind `flowact gateway`, streams that survive a drain, a kill and a scale-up.

    python -m flowact.benchmarks.fleet --preset tiny --replicas 3 --streams 12 --out benchmarks/results/fleet_tiny.json

Starts `--replicas` `flowact serve` processes (one shared FLOWACT_SNAPSHOT_KEY, each its own ports,
work folder and drain file) and `flowact gateway` in front of them, rendered with every replica the
plan starts (replica 4, the scale-up, fails its health check until it is started). Then it runs
`--streams` real-time paced streams through the gateway with the shipped client (failover on) and,
during the run: starts replica 4, drains replica 1 (preStop `flowact drain`, then SIGTERM, as
Kubernetes removes a pod) and SIGKILLs replica 2 (its launcher's process group and tritonserver at
once, as a pod dies).

Reported per event: streams affected, chunks replayed, the viewer's gap (p50/p99/max), chunks lost
and duplicated, every failed-over stream's frames against an uninterrupted run of the same inputs;
streams per replica over time (sampled from each replica's flowact_active_streams, with the HPA
formula's desired replica count at each sample) and a plot with the events marked.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil

from flowact.contract import ACTIVE_STREAMS, DRAIN_FILE_ENV, SNAPSHOT_KEY_ENV, STREAM_CAPACITY
from flowact.serving.health import metric_value
from flowact.serving.processes import free_ports


def flowact_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "flowact.cli", *args]


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

    def wait_host_healthy(self, address: str, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while address not in self.healthy():
            if time.monotonic() > deadline:
                raise TimeoutError(f"gateway: {address} not healthy within {timeout_s:.0f} s: {self.upstreams()}")
            time.sleep(0.1)

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
    preset: str = "tiny"
    drain_timeout_s: float = 1.0  # `flowact serve --drain-timeout`: after SIGTERM, then streams are told to move
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
        """Launch `flowact serve` (returns at once; `wait_ready` waits). A replica started again takes the
        same ports, once its previous process has exited."""
        if self.process is not None:
            self.process.wait(timeout=60)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, **{SNAPSHOT_KEY_ENV: self.snapshot_key, DRAIN_FILE_ENV: str(self.drain_file)})
        args = ["serve", "--preset", self.preset, "--repository", str(self.repository), "--work-dir", str(self.work_dir / "triton"),
                "--drain-timeout", str(self.drain_timeout_s), *(x for k, v in self.ports.items() for x in (f"--{k}-port", str(v)))]
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

    def drain(self, deadline_s: float) -> None:
        """What Kubernetes does to a pod it removes: preStop `flowact drain --deadline` (new streams refused,
        wait for active ones), then SIGTERM (`flowact serve` tells the streams still active to resume
        elsewhere after --drain-timeout, and stops)."""
        env = dict(os.environ, **{DRAIN_FILE_ENV: str(self.drain_file)})
        subprocess.run(flowact_command("drain", "--deadline", str(deadline_s), "--metrics-url", self.metrics_url),
                       env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, timeout=deadline_s + 30)
        self.process.terminate()  # its streams move now; the process exits when Triton has stopped

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


# --- the rehearsal ---------------------------------------------------------------------------------

REPO_ROOT = Path(__file__).resolve().parents[1]
VALUES = REPO_ROOT / "helm" / "flowact" / "values.yaml"
DRAIN_DEADLINE_S = 2.0  # the preStop's `flowact drain --deadline` in the rehearsal (the chart's default is 600)
SAMPLE_PERIOD_S = 0.5
STAGGER_S = 0.5  # between the STARTs of streams launched together
FRAME_TOLERANCE = 1  # max |difference| of a frame against the uninterrupted run (batched streams, tests' tolerance)

# (event, argument): "streams" n (start n streams), "start" i (start replica i; wait until ready), "drain" i,
# "kill" i, "wait" seconds; i counts from 0 (replica i + 1 in reports). Replicas 0..replicas-1 run before the
# plan; a plan may start more.
BENCHMARK_PLAN = [("streams", 8), ("wait", 3), ("start", 3), ("streams", 4), ("wait", 2), ("drain", 0), ("wait", 3),
                  ("kill", 1)]


def hpa_settings() -> dict[str, float]:
    """The chart's HPA: minReplicas, maxReplicas and targetUtilization (a quantity: 750m = 0.75) from values.yaml."""
    text = VALUES.read_text()
    found = {k: re.search(rf"^  {k}: (\S+)", text, re.MULTILINE).group(1) for k in ("minReplicas", "maxReplicas", "targetUtilization")}
    target = found["targetUtilization"]
    return {"min": int(found["minReplicas"]), "max": int(found["maxReplicas"]),
            "target": float(target[:-1]) / 1000 if target.endswith("m") else float(target)}


def hpa_desired(utilizations: list[float], hpa: dict[str, float]) -> int:
    """The HPA formula on the chart's Pods metric (active/capacity per pod, AverageValue target):
    ceil(pods x mean / target) = ceil(sum / target), clamped to [min, max] (its 10 % tolerance left out)."""
    if not utilizations:
        return int(hpa["min"])
    return int(min(hpa["max"], max(hpa["min"], math.ceil(round(sum(utilizations) / hpa["target"], 9)))))


@dataclass
class StreamRun:
    index: int
    seed: int
    chunks: int
    image: np.ndarray  # (H, W, 3) uint8
    speech: np.ndarray  # (S,) float32, looped from this stream's own offset
    result: object = None  # StreamResult
    error: str | None = None
    thread: threading.Thread | None = None

    def audio(self) -> list[np.ndarray]:
        from flowact.benchmarks.loadgen import stream_audio

        loop = stream_audio(self.speech, self.index)
        return [loop.chunk(i) for i in range(self.chunks)]

    def start(self, url: str) -> "StreamRun":
        def run():
            from flowact.client.stream import AvatarStream, FailoverPolicy

            stream = AvatarStream(url, failover=FailoverPolicy())
            try:
                self.result = stream.run(self.image, self.audio(), seed=self.seed, realtime=True)
            except Exception as e:  # reported: a stream that did not complete
                self.result, self.error = stream.result, str(e)
            finally:
                stream.close()
        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        return self


def compare(frames: list[np.ndarray], reference: list[np.ndarray]) -> dict:
    """Chunks lost, duplicated (a chunk equal to the one before it in the reference instead of its own) and
    differing, and the largest pixel difference, of a stream against the uninterrupted run of its inputs."""
    def same(a, b):
        return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max()) <= FRAME_TOLERANCE
    n = min(len(frames), len(reference))
    diffs = [int(np.abs(frames[i].astype(np.int16) - reference[i].astype(np.int16)).max()) for i in range(n)]
    duplicated = sum(1 for i in range(1, n) if not same(frames[i], reference[i]) and same(frames[i], reference[i - 1]))
    duplicated += max(0, len(frames) - len(reference))
    return {"lost": max(0, len(reference) - len(frames)), "duplicated": duplicated,
            "differing": sum(d > FRAME_TOLERANCE for d in diffs), "max_abs_diff": max(diffs, default=0)}


def summarize_gaps(gaps: list[float]) -> dict:
    from flowact.stats import percentile

    return {"n": len(gaps), **({"p50_s": round(percentile(gaps, 50), 3), "p99_s": round(percentile(gaps, 99), 3),
                                "max_s": round(max(gaps), 3)} if gaps else {})}


def rehearse(repository: Path, work: Path, replicas: int, plan: list[tuple[str, int | float]], chunks: int,
             preset: str = "tiny", say=print) -> dict:
    """Run the plan against `replicas` `flowact serve` replicas of `repository` behind `flowact gateway`."""
    from flowact.client.stream import AvatarStream
    from flowact.benchmarks.kit import reference_inputs
    from flowact.presets import get_preset

    image, speech, _ = reference_inputs(get_preset(preset))
    key = secrets.token_hex(32)  # one FLOWACT_SNAPSHOT_KEY for the whole fleet
    names = sorted({*range(replicas), *(int(a) for e, a in plan if e == "start")})
    fleet = {i: ServeReplica(f"replica {i + 1}", repository, work / f"replica{i + 1}", key, preset) for i in names}
    capacity = {}
    gateway = Gateway([fleet[i].gateway_replica for i in names], work / "gateway")
    runs: list[StreamRun] = []
    events: list[dict] = []
    samples: list[dict] = []
    hpa = hpa_settings()
    sampling = threading.Event()
    t0 = time.monotonic()

    def sample():
        while not sampling.wait(SAMPLE_PERIOD_S):
            active = {}
            for i, r in fleet.items():
                status, text = get(r.metrics_url, timeout_s=1.0) if r.process and r.process.poll() is None else (0, "")
                if status == 200 and metric_value(text, ACTIVE_STREAMS) is not None:
                    active[i] = metric_value(text, ACTIVE_STREAMS)
                    capacity[str(i + 1)] = metric_value(text, STREAM_CAPACITY)
            samples.append({"t": round(time.monotonic() - t0, 2), "active": {str(i + 1): a for i, a in active.items()},
                            "hpa_desired": hpa_desired([a / capacity[str(i + 1)] for i, a in active.items()], hpa)})

    try:
        for i in range(replicas):
            fleet[i].start()
        for i in range(replicas):
            fleet[i].wait_ready()
        gateway.start(healthy=replicas)
        say(f"{replicas} replicas ready behind the gateway on {gateway.url}")
        t0 = time.monotonic()
        threading.Thread(target=sample, daemon=True).start()
        for event, arg in plan:
            at = time.monotonic() - t0
            if event == "wait":
                time.sleep(arg)
                continue
            if event == "streams":
                for _ in range(int(arg)):
                    n = len(runs)
                    runs.append(StreamRun(n, n + 1, chunks, image, speech).start(gateway.url))
                    time.sleep(STAGGER_S)
            elif event == "start":
                replica = fleet[int(arg)].start().wait_ready()
                gateway.wait_host_healthy(f"127.0.0.1:{replica.ports['grpc']}")
            elif event == "drain":
                fleet[int(arg)].drain(DRAIN_DEADLINE_S)
            elif event == "kill":
                fleet[int(arg)].kill()
            else:
                raise ValueError(f"unknown event {event!r}: one of streams, start, drain, kill, wait")
            events.append({"event": event, "arg": arg if event == "streams" else f"replica {int(arg) + 1}",
                           "t_s": round(at, 2), "done_t_s": round(time.monotonic() - t0, 2)})
            say(f"{at:6.1f} s  {event} {events[-1]['arg']}")
        for run in runs:
            run.thread.join(timeout=chunks * 0.48 + 120)
        sampling.set()
        # The same inputs once more, uninterrupted (no failover: an interruption would raise), through the gateway.
        references: dict[int, list] = {}
        failures: list[Exception] = []

        def reference(run: StreamRun):
            try:
                with AvatarStream(gateway.url) as s:
                    references[run.index] = s.run(run.image, run.audio(), seed=run.seed).frames
            except Exception as e:
                failures.append(e)
        threads = [threading.Thread(target=reference, args=(run,)) for run in runs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if failures:
            raise RuntimeError(f"the uninterrupted reference runs failed: {failures[0]}")
    finally:
        sampling.set()
        gateway.stop()
        for r in fleet.values():
            r.stop()
    return report(runs, references, events, samples, t0, hpa, capacity)


def report(runs, references, events, samples, t0, hpa, capacity) -> dict:
    streams, by_event = [], {id(e): [] for e in events}
    disruptive = [e for e in events if e["event"] in ("drain", "kill")]  # a scale-up moves no stream
    for run in runs:
        result = run.result
        check = compare(result.frames if result else [], references[run.index])
        failovers = []
        for f in result.failovers if result else []:
            # The failure lies between the last chunk delivered before it and the next new one (gap_s later):
            # it belongs to the latest event before that delivery.
            failed_at = (result.arrival_times[f.at_chunk - 1] if f.at_chunk else result.send_times[0]) - t0
            event = max((e for e in disruptive if e["t_s"] <= failed_at + f.gap_s), key=lambda e: e["t_s"], default=None)
            entry = {"cause": f.cause, "at_chunk": f.at_chunk, "resumed_from": f.resumed_from, "replayed": f.replayed,
                     "attempts": f.attempts, "gap_s": round(f.gap_s, 3), "t_s": round(failed_at, 2),
                     "event": f"{event['event']} {event['arg']}" if event else None}
            failovers.append(entry)
            if event is not None:
                by_event[id(event)].append(entry)
        streams.append({"stream": run.index + 1, "chunks": run.chunks, "delivered": len(result.frames) if result else 0,
                        "error": run.error, "failovers": failovers, **check})
    per_event = []
    for e in disruptive:
        hits = by_event[id(e)]
        per_event.append({**e, "streams_affected": len(hits), "chunks_replayed": sum(h["replayed"] for h in hits),
                          "causes": sorted({h["cause"] for h in hits}), "gap": summarize_gaps([h["gap_s"] for h in hits])})
    failed_over = [s for s in streams if s["failovers"]]
    return {"streams": streams, "events": per_event, "samples": samples, "capacity_per_replica": capacity,
            "hpa": hpa, "plan": events,
            "totals": {"streams": len(streams), "completed": sum(s["error"] is None and s["lost"] == 0 for s in streams),
                       "failed_over": len(failed_over), "chunks_lost": sum(s["lost"] for s in streams),
                       "chunks_duplicated": sum(s["duplicated"] for s in streams),
                       "chunks_differing": sum(s["differing"] for s in streams),
                       "max_abs_diff_failed_over": max((s["max_abs_diff"] for s in failed_over), default=0),
                       "gap": summarize_gaps([f["gap_s"] for s in streams for f in s["failovers"]])}}


def plot(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, hx) = plt.subplots(2, 1, figsize=(9, 5.5), sharex=True, height_ratios=[3, 1])
    ts = [s["t"] for s in result["samples"]]
    for name in sorted({k for s in result["samples"] for k in s["active"]}, key=int):
        ax.step(ts, [s["active"].get(name, np.nan) for s in result["samples"]], where="post", label=f"replica {name}")
    hx.step(ts, [s["hpa_desired"] for s in result["samples"]], where="post", color="k")
    for e in result["plan"]:
        if e["event"] != "wait":
            for a in (ax, hx):
                a.axvline(e["t_s"], color="grey", ls=":", lw=1)
            ax.annotate(f"{e['event']} {e['arg']}", (e["t_s"], ax.get_ylim()[1]), rotation=90, va="top", ha="right",
                        fontsize=7, color="grey")
    ax.set_ylabel("active streams")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title("streams per replica behind flowact gateway (flowact_active_streams)")
    hx.set_ylabel("HPA desired")
    hx.set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv=None) -> int:
    import argparse

    from flowact.benchmarks.resources import machine_facts
    from flowact.networks import shipped_checkpoint
    from flowact.serving.repository import RepositoryOptions, build_embedded_repository

    ap = argparse.ArgumentParser(prog="python -m flowact.benchmarks.fleet", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", choices=["tiny"], help="the rehearsal runs the tiny preset on the CPU")
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--streams", type=int, default=12)
    ap.add_argument("--chunks", type=int, default=80, help="chunks per stream (0.48 s each): long enough to outlast the events")
    ap.add_argument("--capacity", type=int, default=6, help="streams per replica: 12 streams fit the 2 replicas left after the drain and the kill")
    ap.add_argument("--work", type=Path, default=Path("artifacts/fleet"))
    ap.add_argument("--out", type=Path, required=True, help="JSON results; the plot goes beside it (.png)")
    args = ap.parse_args(argv)
    if (args.replicas, args.streams) != (3, 12):
        raise SystemExit("the rehearsal's plan is written for --replicas 3 --streams 12 (drain 1, kill 2, start 4)")
    repo = build_embedded_repository(args.preset, args.work / "repo", shipped_checkpoint(args.preset),
                                     RepositoryOptions(capacity=args.capacity))
    result = rehearse(repo, args.work, args.replicas, BENCHMARK_PLAN, args.chunks, args.preset)
    result["config"] = {"preset": args.preset, "replicas": args.replicas, "streams": args.streams, "chunks": args.chunks,
                        "capacity": args.capacity, "drain_deadline_s": DRAIN_DEADLINE_S, "machine": machine_facts()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    plot(result, args.out.with_suffix(".png"))
    print(json.dumps({"totals": result["totals"], "events": [{k: e[k] for k in ("event", "arg", "t_s", "streams_affected",
                                                                               "chunks_replayed", "gap")}
                                                             for e in result["events"]]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
