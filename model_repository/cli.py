"""`flowact serve`, `flowact drain`, `flowact probe`: run the embedded Triton server and operate it."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import urllib.request
from pathlib import Path

from flowact.presets import get_preset
from flowact.serving.repository import Pipeline, RepositoryOptions, Target, render_repository
from flowact.serving.server import TritonServer
from flowact.serving.streams import DEFAULT_DRAIN_FILE, DRAIN_FILE_ENV

ARTIFACTS = Path("artifacts")


def build_embedded_repository(preset_name: str, out: Path, checkpoint: str | None = None,
                              opts: RepositoryOptions = RepositoryOptions()) -> Path:
    """ONNX export (idempotent) + repository rendering for the embedded server."""
    from flowact.export.onnx import export_onnx

    preset = get_preset(preset_name)
    onnx_dir = ARTIFACTS / preset.name / "onnx"
    files = export_onnx(preset, onnx_dir, checkpoint=checkpoint)
    return render_repository(preset, Target.EMBEDDED, out, files, opts)


def metric_value(text: str, name: str) -> float | None:
    """Sum of a metric's samples in Prometheus text format (None if absent)."""
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith(name) and line[len(name):len(name) + 1] in ("{", " ")]
    return sum(values) if values else None


def scrape(metrics_url: str) -> str:
    with urllib.request.urlopen(metrics_url, timeout=5) as r:
        return r.read().decode()


def drain_file() -> Path:
    return Path(os.environ.get(DRAIN_FILE_ENV, DEFAULT_DRAIN_FILE))


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="run the embedded tritonserver with this project's model repository")
    p.add_argument("--preset", default="cpu")
    p.add_argument("--repository", type=Path, default=None, help="model repository (built if missing)")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (loopback by default)")
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--capacity", type=int, default=RepositoryOptions.capacity)
    p.add_argument("--idle-ttl", type=float, default=RepositoryOptions.idle_ttl_s)
    p.add_argument("--pipeline", choices=[x.value for x in Pipeline], default=Pipeline.OVERLAP.value)
    p.add_argument("--ready-timeout", type=float, default=180.0)
    p.set_defaults(func=_serve)

    d = sub.add_parser("drain", help="stop admitting streams, wait until active streams end (preStop)")
    d.add_argument("--deadline", type=float, default=300.0, help="seconds to wait for active streams")
    d.add_argument("--metrics-url", default="http://127.0.0.1:8002/metrics")
    d.set_defaults(func=_drain)

    r = sub.add_parser("probe", help="readiness for new streams: ready, not draining, below capacity")
    r.add_argument("what", choices=["ready"])
    r.add_argument("--http-url", default="http://127.0.0.1:8000")
    r.add_argument("--metrics-url", default="http://127.0.0.1:8002/metrics")
    r.set_defaults(func=_probe)


def _serve(args) -> int:
    repo = args.repository or ARTIFACTS / args.preset / "repository"
    if not (repo / "flowact" / "config.pbtxt").exists():
        print(f"building the embedded model repository for preset {args.preset} in {repo} ...", flush=True)
        opts = RepositoryOptions(capacity=args.capacity, idle_ttl_s=args.idle_ttl, pipeline=Pipeline(args.pipeline))
        build_embedded_repository(args.preset, repo, args.checkpoint, opts)
    server = TritonServer(repo, args.grpc_port, args.http_port, args.metrics_port, host=args.host)
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    server.start(timeout_s=args.ready_timeout)
    print(f"flowact serving preset {args.preset} from {repo}\n"
          f"  gRPC     {args.host}:{args.grpc_port}   (model 'flowact')\n"
          f"  HTTP     {args.host}:{args.http_port}\n"
          f"  metrics  http://{args.host}:{args.metrics_port}/metrics\n"
          f"  log      {server.log_path}\nCtrl-C stops it.", flush=True)
    while not stopping.wait(1.0):
        if server.process is None or server.process.poll() is not None:
            print(f"tritonserver exited unexpectedly:\n{server.log_tail()}", file=sys.stderr)
            server.stop()
            return 1
    print("stopping ...", flush=True)
    server.stop()
    print("stopped", flush=True)
    return 0


def _drain(args) -> int:
    flag = drain_file()
    flag.parent.mkdir(parents=True, exist_ok=True)
    flag.touch()
    print(f"draining: {flag} created; new streams are refused", flush=True)
    deadline = time.monotonic() + args.deadline
    while time.monotonic() < deadline:
        try:
            active = metric_value(scrape(args.metrics_url), "flowact_active_streams")
        except OSError as e:
            print(f"metrics unreachable ({e}); assuming the server is gone", flush=True)
            return 0
        if not active:
            print("no active streams: done", flush=True)
            return 0
        print(f"waiting for {active:.0f} active stream(s) ...", flush=True)
        time.sleep(1.0)
    print(f"deadline of {args.deadline:.0f} s passed with streams still active", flush=True)
    return 0


def _probe(args) -> int:
    try:
        with urllib.request.urlopen(f"{args.http_url}/v2/health/ready", timeout=3) as r:
            if r.status != 200:
                print("not ready: triton not ready")
                return 1
        text = scrape(args.metrics_url)
    except OSError as e:
        print(f"not ready: {e}")
        return 1
    if drain_file().exists():
        print("not ready: draining")
        return 1
    active, capacity = metric_value(text, "flowact_active_streams"), metric_value(text, "flowact_stream_capacity")
    if active is None or capacity is None:
        print("not ready: stream metrics not published yet")
        return 1
    if active >= capacity:
        print(f"not ready: at capacity ({active:.0f}/{capacity:.0f})")
        return 1
    print(f"ready ({active:.0f}/{capacity:.0f} streams)")
    return 0
