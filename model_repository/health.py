"""Readiness for new streams, written once: `flowact probe ready` and the health endpoint of `flowact serve`.

Triton's own /v2/health/ready knows nothing of draining or capacity. A replica is ready for a NEW
stream when Triton is ready, the server is not draining (its drain file does not exist) and its
active streams are below capacity. Streams already on a replica that reads not ready go on: a
gateway only stops sending it new ones.

`HealthServer` serves it over HTTP for gateways (Envoy's active health checks): GET /ready ->
200 "ready (a/c streams)" or 503 "not ready: <why>", GET /live -> Triton's liveness. Tiny
responses, a socket timeout per connection, nothing else answered.

Torch-free: Kubernetes probes and the gateway import it.
"""

from __future__ import annotations

import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from flowact.contract import ACTIVE_STREAMS, HEALTH_LIVE_PATH, HEALTH_READY_PATH, STREAM_CAPACITY

UPSTREAM_TIMEOUT_S = 3.0  # each of the two local requests a readiness check makes
CONNECTION_TIMEOUT_S = 5.0  # a health client that sends nothing for this long is dropped


def metric_value(text: str, name: str) -> float | None:
    """Sum of a metric's samples in Prometheus text format (None if absent)."""
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith(name) and line[len(name):len(name) + 1] in ("{", " ")]
    return sum(values) if values else None


def scrape(metrics_url: str, timeout: float = 5.0) -> str:
    """A Prometheus endpoint's text."""
    with urllib.request.urlopen(metrics_url, timeout=timeout) as r:
        return r.read().decode()


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=UPSTREAM_TIMEOUT_S) as r:
            return r.status == 200
    except OSError:  # refused, timed out, or an HTTP error status
        return False


def readiness(http_url: str, metrics_url: str, drain_file: Path) -> tuple[bool, str]:
    """(ready for a new stream, why): Triton ready at `http_url`, `drain_file` absent, active < capacity."""
    if not http_ok(f"{http_url}/v2/health/ready"):
        return False, "not ready: triton not ready"
    if drain_file.exists():
        return False, "not ready: draining"
    try:
        with urllib.request.urlopen(metrics_url, timeout=UPSTREAM_TIMEOUT_S) as r:
            text = r.read().decode()
    except OSError as e:
        return False, f"not ready: metrics unreachable ({e})"
    active, capacity = metric_value(text, ACTIVE_STREAMS), metric_value(text, STREAM_CAPACITY)
    if active is None or capacity is None:
        return False, "not ready: stream metrics not published yet"
    if active >= capacity:
        return False, f"not ready: at capacity ({active:.0f}/{capacity:.0f})"
    return True, f"ready ({active:.0f}/{capacity:.0f} streams)"


class HealthServer:
    """GET /ready and /live for one replica, on a thread (`with HealthServer(...):` or start()/stop())."""

    def __init__(self, host: str, port: int, http_url: str, metrics_url: str, drain_file: Path):
        checks = {HEALTH_READY_PATH: lambda: readiness(http_url, metrics_url, drain_file),
                  HEALTH_LIVE_PATH: lambda: (True, "live") if http_ok(f"{http_url}/v2/health/live")
                  else (False, "not live: triton not live")}

        class Handler(BaseHTTPRequestHandler):
            timeout = CONNECTION_TIMEOUT_S

            def do_GET(self):
                check = checks.get(self.path)
                ok, text = check() if check else (False, f"unknown path: {HEALTH_READY_PATH} or {HEALTH_LIVE_PATH}")
                body = (text + "\n").encode()
                self.send_response(200 if ok else 404 if check is None else 503)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # probes every second: no access log
                pass

        try:
            self.httpd = ThreadingHTTPServer((host, port), Handler)
        except OSError as e:
            raise OSError(f"health port {port} on {host}: {e.strerror}: stop what listens there or choose another "
                          f"--health-port") from None
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="flowact-health", daemon=True)

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    def start(self) -> "HealthServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> "HealthServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
