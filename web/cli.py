"""`flowact web`: the WebRTC edge in front of a running flowact server."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from flowact.contract import (ADMIN_KEY_ENV, ADMIN_KEY_HTTP_HEADER, DEFAULT_HOST, DEFAULT_URL, LIVE_UPSTREAM_TIMEOUT_S,
                              WEB_CONNECT_TIMEOUT_S)

DEFAULT_PORT = 8080
DEFAULT_MAX_SESSIONS = 4  # viewer sessions the edge admits at once (one gRPC stream each)


def add_parser(sub) -> None:
    p = sub.add_parser("web", help="WebRTC edge: a page and WHIP/WHEP-style sessions in front of a flowact server")
    p.add_argument("--url", default=DEFAULT_URL, help="the flowact server's gRPC HOST:PORT")
    p.add_argument("--host", default=DEFAULT_HOST, help="listen address (loopback unless told otherwise; a public "
                   "deployment puts TLS, authentication and a TURN server in front, see the README)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--max-sessions", type=int, default=DEFAULT_MAX_SESSIONS,
                   help="viewer sessions admitted at once; more are refused with 503")
    p.add_argument("--ice-server", action="append", default=[], metavar="URL",
                   help="STUN/TURN server for the edge's ICE (repeatable; turn:USER:PASS@HOST:PORT); default none")
    p.add_argument("--jitter-buffer", type=float, default=None, metavar="SECONDS",
                   help="fixed jitter buffer (default: sized from the chunk latencies this edge measures)")
    p.add_argument("--wait", type=float, default=60.0, metavar="SECONDS", help="wait this long for the server")
    p.add_argument("--connect-timeout", type=float, default=WEB_CONNECT_TIMEOUT_S, metavar="SECONDS",
                   help="a session whose viewer has not connected by then is ended and its slot freed")
    p.add_argument("--upstream-timeout", type=float, default=LIVE_UPSTREAM_TIMEOUT_S, metavar="SECONDS",
                   help="a chunk the server has not answered by then means a hung replica: the session fails over "
                        "(with --no-failover it ends)")
    p.add_argument("--no-failover", action="store_true",
                   help="end a session when its replica goes away (default: continue it from its last snapshot "
                        "on whichever replica --url reaches, e.g. a `flowact gateway`)")
    p.add_argument("--token-file", type=Path, default=None, metavar="FILE",
                   help="bearer tokens, one per line: POST /v1/sessions and /v1/images then need "
                        "'Authorization: Bearer TOKEN' (WHIP); the page takes it as #token=TOKEN in its URL")
    p.add_argument("--admin-key-file", type=Path, default=None, metavar="FILE",
                   help=f"the key that opens GET /v1/sessions (header '{ADMIN_KEY_HTTP_HEADER}'); default "
                        f"${ADMIN_KEY_ENV}, else that view is closed")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="a Host name this edge answers to (repeatable; '*' any). IP literals and loopback names "
                        "are always allowed; other names are refused (DNS rebinding)")
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


def return_freed_memory() -> None:
    """glibc serves large allocations (decoded images, 16 MB Pillow blocks) from its heap once one was freed
    (its mmap threshold grows), and that heap seldom shrinks: 12 uploads left the edge 380 MB larger for
    good. A fixed 1 MiB threshold keeps large buffers mmapped, so they go back to the system when freed."""
    import ctypes

    try:
        ctypes.CDLL(None).mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD (glibc); elsewhere nothing to do
    except (OSError, AttributeError):
        pass


def _run(args) -> int:
    from aiohttp import web

    from flowact.client.stream import FailoverPolicy
    from flowact.serving.cli import admin_key
    from flowact.web.app import Access, Edge, make_app

    return_freed_memory()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("aiohttp.access", "aioice", "aiortc"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        tokens = Access.read_tokens(args.token_file) if args.token_file else ()
    except (OSError, ValueError) as e:
        raise SystemExit(f"flowact web: --token-file: {e}") from None
    key, _ = admin_key(args.admin_key_file)
    access = Access(frozenset(h.lower() for h in args.allowed_host), tokens, key)
    height, width = wait_for_geometry(args.url, args.wait)
    edge = Edge(args.url, height, width, args.max_sessions, ice_servers(args.ice_server), args.jitter_buffer, access,
                args.connect_timeout, args.upstream_timeout, None if args.no_failover else FailoverPolicy())
    print(f"flowact web: http://{args.host}:{args.port}/ -> {args.url} ({width}x{height}, "
          f"at most {args.max_sessions} sessions)", flush=True)
    web.run_app(make_app(edge), host=args.host, port=args.port, print=None, shutdown_timeout=10)
    return 0
