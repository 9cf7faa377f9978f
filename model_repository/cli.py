"""`flowact serve`, `flowact drain`, `flowact probe`: run the embedded Triton server and operate it."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

from flowact.contract import (ACTIVE_STREAMS, ADMIN_KEY_ENV, ARTIFACTS_DIR, DEFAULT_CAPACITY, DEFAULT_DRAIN_TIMEOUT_S,
                              DEFAULT_GRPC_PORT, DEFAULT_HEALTH_PORT, DEFAULT_HOST, DEFAULT_HTTP_PORT, DEFAULT_IDLE_TTL_S,
                              DEFAULT_METRICS_PORT, DRAIN_EVACUATE, DRAIN_FILE_ENV, DRAIN_STOPPING, ENSEMBLE_MODEL,
                              EVACUATE_GRACE_S, MIN_RANDOM_ID_CHARS, REQUIRE_RANDOM_IDS_ENV,
                              TRITONSERVER_ENV)
from flowact.runtime.manifest import CPU_PRECISION_HELP, CPU_PRECISIONS
from flowact.serving.drain import drain_file, drain_file_of, read_state, write_state
from flowact.serving.health import HealthServer, metric_value, readiness, scrape
from flowact.serving.server import TritonServer
from flowact.serving.startup import StartupError

# This module stays free of torch at import time: `probe` and `drain` run as Kubernetes probes.
PIPELINES = ("overlap", "serial")
TARGETS = ("embedded", "torch")  # `trt` plans are built with `flowact export repository --target trt`


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="run the embedded tritonserver with this project's model repository")
    p.add_argument("--preset", default="cpu")
    p.add_argument("--repository", type=Path, default=None,
                   help="serve this repository as it is (built if missing); default: artifacts/<preset>/repository[-torch], kept up to date")
    p.add_argument("--checkpoint", default=None, help="weights (default: checkpoints/<preset> if shipped, else random)")
    p.add_argument("--host", default=DEFAULT_HOST, help="address to listen on (loopback by default)")
    p.add_argument("--grpc-port", type=int, default=DEFAULT_GRPC_PORT)
    p.add_argument("--http-port", type=int, default=DEFAULT_HTTP_PORT)
    p.add_argument("--metrics-port", type=int, default=DEFAULT_METRICS_PORT)
    p.add_argument("--health-port", type=int, default=DEFAULT_HEALTH_PORT,
                   help="GET /ready (Triton ready, not draining, below capacity: what gateways check) and /live")
    p.add_argument("--capacity", type=int, default=DEFAULT_CAPACITY, help="streams admitted at once (when building)")
    p.add_argument("--idle-ttl", type=float, default=DEFAULT_IDLE_TTL_S, help="seconds before an idle stream is freed (when building)")
    p.add_argument("--pipeline", choices=PIPELINES, default="overlap", help="decode overlapping denoise, or serial")
    p.add_argument("--target", choices=TARGETS, default="embedded",
                   help="where the stream model runs the networks, beside the per-stream state: embedded: ONNX Runtime "
                        "on the CPU; torch: PyTorch on --device (when building)")
    p.add_argument("--precision", choices=[p.value for p in CPU_PRECISIONS], default=None,
                   help="embedded: " + CPU_PRECISION_HELP)
    p.add_argument("--device", default=None, help="--target torch: the device of the state and networks, cuda:N or cpu "
                                                  "(default cuda:0 where CUDA is visible, else cpu; when building)")
    p.add_argument("--ready-timeout", type=float, default=180.0)
    p.add_argument("--tritonserver", type=Path, default=os.environ.get(TRITONSERVER_ENV),
                   help="tritonserver binary (default: the one the nvidia-pytriton wheel ships; "
                        "/opt/tritonserver/bin/tritonserver in the NGC image)")
    p.add_argument("--work-dir", type=Path, default=Path(ARTIFACTS_DIR) / "triton", help="backend folder and server log")
    p.add_argument("--log-stdout", action="store_true", help="copy Triton's log to stdout (containers)")
    p.add_argument("--admin-key-file", type=Path, default=None,
                   help=f"file holding the key that opens the admin protocols (model-config, statistics, ...); "
                        f"default ${ADMIN_KEY_ENV}, else a random key nobody holds. Never printed")
    p.add_argument("--drain-timeout", type=float, default=DEFAULT_DRAIN_TIMEOUT_S,
                   help="on SIGTERM / Ctrl-C: new streams are refused and active ones get this many seconds to finish, "
                        "then are told to resume elsewhere; a second signal stops at once")
    p.add_argument("--require-random-ids", action="store_true",
                   help=f"refuse STARTs with an integer stream id or a string id shorter than {MIN_RANDOM_ID_CHARS} "
                        f"characters (ids act as capabilities: make them unguessable)")
    p.add_argument("triton_args", nargs="*", help="after --: extra tritonserver flags (e.g. TLS)")
    p.set_defaults(func=_serve)

    d = sub.add_parser("drain", help="stop admitting streams, wait until active streams end (preStop)")
    d.add_argument("--deadline", type=float, default=300.0, help="seconds to wait for active streams")
    d.add_argument("--metrics-url", default=f"http://{DEFAULT_HOST}:{DEFAULT_METRICS_PORT}/metrics",
                   help="the server's metrics (its port also names its drain file)")
    d.add_argument("--cancel", action="store_true", help="undo a drain: admit new streams again")
    d.set_defaults(func=_drain)

    r = sub.add_parser("probe", help="readiness for new streams: ready, not draining, below capacity")
    r.add_argument("what", choices=["ready"])
    r.add_argument("--http-url", default=f"http://{DEFAULT_HOST}:{DEFAULT_HTTP_PORT}")
    r.add_argument("--metrics-url", default=f"http://{DEFAULT_HOST}:{DEFAULT_METRICS_PORT}/metrics")
    r.set_defaults(func=_probe)


def admin_key(key_file: Path | None) -> tuple[str | None, str]:
    """The operator's admin key (--admin-key-file, else $FLOWACT_ADMIN_KEY, else None: random) and where it came from."""
    from flowact.serving.startup import check_admin_key

    if key_file is not None:
        try:
            key, source = key_file.read_text().strip(), str(key_file)
        except OSError as e:
            raise SystemExit(f"--admin-key-file: cannot read {key_file}: {e.strerror}")
    elif os.environ.get(ADMIN_KEY_ENV):
        key, source = os.environ[ADMIN_KEY_ENV].strip(), f"${ADMIN_KEY_ENV}"
    else:
        return None, "random per start (admin protocols unreachable)"
    try:
        return check_admin_key(key), f"from {source}"
    except ValueError as e:
        raise SystemExit(f"admin key from {source}: {e}")


def _serve(args) -> int:
    key, key_source = admin_key(args.admin_key_file)
    repo = args.repository or Path(ARTIFACTS_DIR) / args.preset / ("repository" if args.target == "embedded" else f"repository-{args.target}")
    if args.repository is None or not (repo / ENSEMBLE_MODEL / "config.pbtxt").exists():
        from flowact.networks import shipped_checkpoint
        from flowact.presets import get_preset
        from flowact.serving.repository import (Pipeline, RepositoryOptions, Target, build_embedded_repository,
                                                render_repository, target_device, target_precision)

        try:
            device = target_device(Target(args.target), args.device)
            precision = target_precision(Target(args.target), args.preset, args.precision)
        except ValueError as e:
            raise SystemExit(f"flowact serve: {e}")
        checkpoint = args.checkpoint or shipped_checkpoint(args.preset)
        print(f"model repository for preset {args.preset} in {repo} (target {args.target} on {device}, precision "
              f"{precision}, weights: {checkpoint or 'seeded random'}) ...", flush=True)
        opts = RepositoryOptions(capacity=args.capacity, idle_ttl_s=args.idle_ttl, pipeline=Pipeline(args.pipeline),
                                 device=device)
        if args.target == Target.TORCH.value:
            render_repository(get_preset(args.preset), Target.TORCH, repo, opts=opts, checkpoint=checkpoint)
        else:
            build_embedded_repository(args.preset, repo, checkpoint, opts,  # up-to-date exports are reused
                                      precision=args.precision)
    try:
        flag = drain_file(args.metrics_port)
    except PermissionError as e:
        raise SystemExit(f"flowact serve: drain state: {e}") from None
    flag.unlink(missing_ok=True)  # a restarted container must not inherit an old drain
    try:
        return serve(args, repo, flag, key, key_source)
    finally:
        flag.unlink(missing_ok=True)  # a server that is gone drains nothing


def serve(args, repo: Path, flag: Path, key: str | None, key_source: str) -> int:
    extra_env = {DRAIN_FILE_ENV: str(flag), **({REQUIRE_RANDOM_IDS_ENV: "1"} if args.require_random_ids else {})}
    server = TritonServer(repo, args.grpc_port, args.http_port, args.metrics_port, host=args.host,
                          work_dir=args.work_dir, binary=args.tritonserver, extra_args=args.triton_args,
                          echo_log=args.log_stdout, extra_env=extra_env, **({"admin_key": key} if key else {}))
    stopping, at_once = threading.Event(), threading.Event()

    def on_signal(*_):
        (at_once if stopping.is_set() else stopping).set()  # a second signal skips the drain

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    local = local_address(args.host)
    try:
        health = HealthServer(args.host, args.health_port, f"http://{local}:{args.http_port}",
                              f"http://{local}:{args.metrics_port}/metrics", flag).start()
    except OSError as e:
        print(f"flowact serve: {e}", file=sys.stderr, flush=True)
        return 1
    try:
        server.start(timeout_s=args.ready_timeout)
    except (StartupError, TimeoutError) as e:
        print(f"flowact serve: {e}", file=sys.stderr, flush=True)
        health.stop()
        return 1
    print(f"flowact serving preset {args.preset} from {repo}\n"
          f"  gRPC     {args.host}:{args.grpc_port}   (model 'flowact')\n"
          f"  HTTP     {args.host}:{args.http_port}\n"
          f"  metrics  http://{args.host}:{args.metrics_port}/metrics\n"
          f"  health   http://{args.host}:{args.health_port}/ready\n"
          f"  admin    key {key_source}\n"
          f"  log      {server.log_path}\nCtrl-C stops it.", flush=True)
    while not stopping.wait(1.0):
        if server.process is None or server.process.poll() is not None:
            print(f"tritonserver exited unexpectedly:\n{server.log_tail()}", file=sys.stderr)
            health.stop()
            server.stop()
            return 1
    drain_then_evacuate(f"http://{local}:{args.metrics_port}/metrics", flag, args.drain_timeout, at_once)
    print("stopping tritonserver ...", flush=True)
    health.stop()
    server.stop()
    print("stopped", flush=True)
    return 0


def local_address(host: str) -> str:
    return "127.0.0.1" if host in ("", "0.0.0.0", "::") else host


def active_streams(metrics_url: str) -> float:
    try:
        return metric_value(scrape(metrics_url), ACTIVE_STREAMS) or 0.0
    except OSError:
        return 0.0  # metrics gone: nothing left to wait for


def drain_then_evacuate(metrics_url: str, flag: Path, timeout_s: float, at_once: threading.Event) -> None:
    """SIGTERM's drain: refuse new streams ("server is stopping"), give active ones `timeout_s` to
    finish, then tell the rest to resume elsewhere (their next request is refused, naming it) and
    give them EVACUATE_GRACE_S to hear it. `at_once` (a second signal) cuts either wait short."""
    write_state(flag, DRAIN_STOPPING)
    deadline, said = time.monotonic() + timeout_s, 0.0
    active = active_streams(metrics_url)
    while active and time.monotonic() < deadline and not at_once.is_set():
        if time.monotonic() - said >= 5:
            print(f"stopping: new streams refused; waiting for {active:.0f} active stream(s), "
                  f"{deadline - time.monotonic():.0f} s left", flush=True)
            said = time.monotonic()
        time.sleep(0.2)
        active = active_streams(metrics_url)
    if not active:
        return
    write_state(flag, DRAIN_EVACUATE)
    print(f"stopping: drain timeout; {active:.0f} stream(s) told to resume elsewhere", flush=True)
    grace = time.monotonic() + EVACUATE_GRACE_S
    while active and time.monotonic() < grace and not at_once.is_set():
        time.sleep(0.1)
        active = active_streams(metrics_url)


def _drain(args) -> int:
    """Exit 0 once no stream is active (or the server is gone), 1 when the deadline passes first."""
    try:
        flag = drain_file_of(args.metrics_url)
    except PermissionError as e:
        raise SystemExit(f"flowact drain: {e}") from None
    state = read_state(flag)
    if args.cancel:
        if state not in (None, ""):
            raise SystemExit(f"flowact drain --cancel: the server is stopping ({state}); a stop cannot be cancelled")
        flag.unlink(missing_ok=True)
        print("drain cancelled: new streams are admitted" if state == "" else "not draining: nothing to cancel", flush=True)
        return 0
    if state is None:
        write_state(flag, "")
    print(f"draining: {flag}; new streams are refused (`flowact drain --cancel` admits them again)", flush=True)
    deadline = time.monotonic() + args.deadline
    active = None
    while time.monotonic() < deadline:
        try:
            active = metric_value(scrape(args.metrics_url), ACTIVE_STREAMS)
        except OSError as e:
            print(f"metrics unreachable ({e}); assuming the server is gone", flush=True)
            return 0
        if not active:
            print("no active streams: done", flush=True)
            return 0
        print(f"waiting for {active:.0f} active stream(s) ...", flush=True)
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    print(f"deadline of {args.deadline:.0f} s passed with {active or 0:.0f} stream(s) still active", flush=True)
    return 1


def _probe(args) -> int:
    ok, why = readiness(args.http_url, args.metrics_url, drain_file_of(args.metrics_url))
    print(why)
    return 0 if ok else 1
