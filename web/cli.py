"""`flowact web`: the WebRTC edge in front of a running flowact server."""

from __future__ import annotations

import logging
import time

from flowact.contract import DEFAULT_HOST, DEFAULT_URL, WEB_DEFAULT_MAX_SESSIONS, WEB_DEFAULT_PORT


def add_parser(sub) -> None:
    p = sub.add_parser("web", help="WebRTC edge: a page and WHIP/WHEP-style sessions in front of a flowact server")
    p.add_argument("--url", default=DEFAULT_URL, help="the flowact server's gRPC HOST:PORT")
    p.add_argument("--host", default=DEFAULT_HOST, help="listen address (loopback unless told otherwise; a public "
                   "deployment puts TLS, authentication and a TURN server in front, see the README)")
    p.add_argument("--port", type=int, default=WEB_DEFAULT_PORT)
    p.add_argument("--max-sessions", type=int, default=WEB_DEFAULT_MAX_SESSIONS,
                   help="viewer sessions admitted at once; more are refused with 503")
    p.add_argument("--ice-server", action="append", default=[], metavar="URL",
                   help="STUN/TURN server for the edge's ICE (repeatable; turn:USER:PASS@HOST:PORT); default none")
    p.add_argument("--jitter-buffer", type=float, default=None, metavar="SECONDS",
                   help="fixed jitter buffer (default: sized from the chunk latencies this edge measures)")
    p.add_argument("--wait", type=float, default=60.0, metavar="SECONDS", help="wait this long for the server")
    p.set_defaults(func=_run)


def ice_servers(urls: list[str]):
    from aiortc import RTCIceServer

    servers = []
    for url in urls:
        scheme, _, rest = url.partition(":")
        if "@" in rest:  # turn:USER:PASS@HOST:PORT
            credentials, _, host = rest.rpartition("@")
            user, _, password = credentials.partition(":")
            servers.append(RTCIceServer(f"{scheme}:{host}", username=user, credential=password))
        else:
            servers.append(RTCIceServer(url))
    return servers


def wait_for_geometry(url: str, wait_s: float) -> tuple[int, int]:
    from tritonclient.utils import InferenceServerException

    from flowact.client.cli import server_geometry

    deadline = time.monotonic() + wait_s
    while True:
        try:
            return server_geometry(url)
        except InferenceServerException as e:
            if time.monotonic() > deadline:
                raise SystemExit(f"flowact web: no flowact server at {url} ({e.message()})") from None
            time.sleep(1.0)


def _run(args) -> int:
    from aiohttp import web

    from flowact.web.app import Edge, make_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("aiohttp.access", "aioice", "aiortc"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    height, width = wait_for_geometry(args.url, args.wait)
    edge = Edge(args.url, height, width, args.max_sessions, ice_servers(args.ice_server), args.jitter_buffer)
    print(f"flowact web: http://{args.host}:{args.port}/ -> {args.url} ({width}x{height}, "
          f"at most {args.max_sessions} sessions)", flush=True)
    web.run_app(make_app(edge), host=args.host, port=args.port, print=None, shutdown_timeout=10)
    return 0
