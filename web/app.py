"""The edge's HTTP side (aiohttp): WHIP/WHEP-style signaling, reference image upload, the page, /metrics.

    POST   /v1/sessions[?image=ID&behaviour=B&prompt=TEXT]   body: SDP offer (application/sdp)
           -> 201, body: SDP answer (application/sdp), Location: /v1/sessions/<secret>
           -> 400 bad offer (not UTF-8, too many media sections, no video to receive) or parameter,
              401 no or wrong bearer token (--token-file), 404 unknown image, 408 body too slow,
              413 offer over MAX_SDP_BYTES, 415 not application/sdp,
              503 at --max-sessions or the server not ready (Retry-After)
    DELETE /v1/sessions/<secret>  -> 204 (END on the gRPC stream, then the peer connection closes); 404 unknown
    GET    /v1/sessions       -> the open sessions (no secrets, stream ids or prompts): admin key only
    POST   /v1/images         body: a PNG, JPEG or WebP image, its Content-Type
           -> 201 {"id", "width", "height"}, Location: /v1/images/<id>
           -> 408 body too slow, 413 too large, 415 not one of those images, 422 too small, 503 decoder busy
    GET    /v1/images/<id>    -> the image as the avatar will use it (cropped and resized), PNG
    GET    /v1/config         -> JSON: the avatar's size, capacity, the jitter buffer the next session gets
    GET    /healthz           -> liveness (the event loop answers)
    GET    /readyz            -> 200 when a session can be served now (a free slot, the server ready), else 503 why
    GET    /  /app.js  /samples/{reference.png,speech.wav}  /metrics

A session's Location is its capability: an unguessable secret that only its creator learns, never
listed or logged; whoever holds it can end the session, nobody else can. Every request's Host must be
allowed (DNS rebinding): an IP literal, a loopback name, or a name given with --allowed-host.
Errors are plain text that says what was wrong and what is accepted.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import io
import ipaddress
import logging
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from aiohttp import ClientPayloadError, web
from PIL import Image, UnidentifiedImageError

from flowact.contract import (ADMIN_KEY_HTTP_HEADER, LIVE_UPSTREAM_TIMEOUT_S, WEB_AUDIO_DELAY, WEB_AV_OFFSET,
                              WEB_BEHAVIOUR_AUTO, WEB_CHUNK_READY, WEB_CONNECT_TIMEOUT_S, WEB_FAILOVERS, WEB_FRAMES_LATE,
                              WEB_FRAMES_SENT, WEB_JITTER_BUFFER, WEB_METRICS, WEB_MOUTH_LATENCY, WEB_SDP_TYPE,
                              WEB_SESSIONS_ACTIVE, WEB_SESSIONS_FAILED, WEB_SESSIONS_PATH, WEB_SESSIONS_REJECTED,
                              WEB_SESSIONS_STARTED, WEB_SILENCE_FILLED, WEB_TTFF)
from flowact.client.stream import FailoverPolicy
from flowact.media import REFERENCE_IMAGE, SPEECH_WAV, fit_image, load_image
from flowact.stats import percentile
from flowact.web.session import OfferError, Session, upstream_unready
from flowact.web.timeline import Conditioning, ControlError, JitterSizer

log = logging.getLogger("flowact.web")
STATIC = Path(__file__).parent / "static"
LATENCY_BUCKETS = (0.02, 0.05, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.5, 2.0, 3.0, 5.0)
OFFSET_BUCKETS = (-0.1, -0.04, -0.02, -0.01, 0.0, 0.01, 0.02, 0.04, 0.1)
LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")
READ_BLOCK = 64 * 1024
TOKEN_MIN_CHARS = 16  # bearer tokens of --token-file
BODY_TIMEOUT_S = 10.0  # a request body must arrive whole within this, or 408
MAX_SDP_BYTES = 64 * 1024  # an SDP offer (a browser's is 3-6 kB)
MAX_SDP_MEDIA = 8  # m-lines in an offer (the page sends 3: audio, video, data)
# Reference images: POST IMAGES_PATH (its Content-Type) -> 201 {"id": ...}; sessions name it ?image=<id>.
IMAGES_PATH = "/v1/images"
IMAGE_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP"}  # declared type -> PIL format
MAX_IMAGE_BYTES = 8 * 1024 * 1024  # an uploaded reference image, encoded
MAX_IMAGE_PIXELS = 40_000_000  # in the header (decompression bombs are refused before decoding)
MIN_IMAGE_SIDE = 32  # pixels
MAX_DECODE_PIXELS = 4096 * 4096  # pixels actually decoded: a JPEG at its reduced (draft) scale, PNG / WebP in full
MAX_IMAGES = 64  # uploaded images the edge keeps (least recently used dropped)
DECODE_CONCURRENCY = 2  # images decoded at once (off the event loop); more uploads wait their turn
DECODE_QUEUE = 16  # uploads waiting to decode; beyond it 503


class Refused(ValueError):
    """A request the edge answers with `status` and this message."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers


async def read_body(request: web.Request, limit: int, what: str) -> bytes:
    """The whole body, however many TCP segments it comes in: 413 past `limit` bytes (declared or read),
    408 unless all of it arrived within BODY_TIMEOUT_S."""
    too_large = lambda n: Refused(413, f"{what} of {n} bytes is larger than {limit} bytes")  # noqa: E731
    if request.content_length is not None and request.content_length > limit:
        raise too_large(request.content_length)

    async def read() -> bytes:
        parts, size = [], 0
        while block := await request.content.read(READ_BLOCK):
            size += len(block)
            if size > limit:
                raise too_large(f"more than {limit}")
            parts.append(block)
        return b"".join(parts)

    try:
        return await asyncio.wait_for(read(), BODY_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise Refused(408, f"the {what} did not arrive within {BODY_TIMEOUT_S:.0f} s") from None
    except (ConnectionError, ClientPayloadError) as e:  # the client left mid-body: nobody reads this answer
        raise Refused(400, f"the {what} was cut short: {e}") from None


def check_offer(body: bytes, charset: str | None) -> str:
    """An SDP offer's bytes -> its text, or Refused: UTF-8 (RFC 8866), at most MAX_SDP_MEDIA media
    sections, and a video section the edge may send on (the viewer receives video). Cheap: no parsing
    beyond lines, so a hostile offer costs the event loop next to nothing before aiortc sees it."""
    if charset and charset.lower() not in ("utf-8", "utf8", "us-ascii"):
        raise Refused(415, f"charset {charset[:32]!r}: an SDP offer is UTF-8 text")
    try:
        sdp = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Refused(400, f"the SDP offer is not UTF-8 text (byte {e.start})") from None
    sections = re.split(r"^(?=m=)", sdp, flags=re.MULTILINE)
    if len(sections) - 1 > MAX_SDP_MEDIA:
        raise Refused(400, f"the SDP offer has {len(sections) - 1} media sections: at most {MAX_SDP_MEDIA}")
    directions = ("sendrecv", "sendonly", "recvonly", "inactive")
    direction = lambda text, default: next((d for d in directions if f"a={d}" in text.splitlines()), default)  # noqa: E731
    default = direction(sections[0], "sendrecv")  # a session-level attribute applies to every section
    video = [(m.split(maxsplit=2)[1:2], direction(m, default)) for m in sections[1:] if m.startswith("m=video ")]
    if not any(port != ["0"] and d in ("sendrecv", "recvonly") for port, d in video):
        said = ", ".join(d for _, d in video) or "none"
        raise Refused(400, f"the offer does not receive video (video sections: {said}): offer video recvonly "
                           f"(or sendrecv), and audio sendrecv to hear the speech back")
    return sdp


def check_image_type(content_type: str) -> str:
    """A declared image type -> the accepted types as text, or Refused (415)."""
    accepted = ", ".join(IMAGE_TYPES)
    if content_type not in IMAGE_TYPES:
        raise Refused(415, f"Content-Type {content_type or 'none'!r} is not accepted: send the image's bytes "
                           f"with one of {accepted}")
    return accepted


def decode_image(body: bytes, content_type: str, height: int, width: int) -> np.ndarray:
    """An uploaded reference image -> (H, W, 3) uint8 at the server's geometry, or Refused.

    The declared type must be one of IMAGE_TYPES and the bytes must be that format (sniffed by
    PIL, not trusted from the header). The pixels are bounded before anything is decoded: the header's
    size (MAX_IMAGE_PIXELS), then what decoding would really produce (MAX_DECODE_PIXELS): a JPEG
    decodes at the smallest DCT scale (1/2 .. 1/8) that still covers the avatar, PNG and WebP in full."""
    accepted = check_image_type(content_type)
    if len(body) > MAX_IMAGE_BYTES:
        raise Refused(413, f"image of {len(body)} bytes is larger than {MAX_IMAGE_BYTES} bytes")
    try:
        with Image.open(io.BytesIO(body)) as img:
            fmt, (w, h) = img.format, img.size
            if fmt != IMAGE_TYPES[content_type]:
                raise Refused(415, f"the bytes are {fmt or 'not an image'}, not {content_type}")
            if w * h > MAX_IMAGE_PIXELS:
                raise Refused(413, f"image of {w}x{h} pixels is larger than {MAX_IMAGE_PIXELS} pixels")
            if min(w, h) < MIN_IMAGE_SIDE:
                raise Refused(422, f"image of {w}x{h} pixels is too small: each side at least {MIN_IMAGE_SIDE} pixels")
            side = max(height, width)  # either orientation (EXIF may turn it) still covers the avatar
            img.draft("RGB", (side, side))  # JPEG: decode reduced; other formats: no effect
            dw, dh = img.size
            if dw * dh > MAX_DECODE_PIXELS:
                raise Refused(413, f"a {fmt} of {w}x{h} pixels decodes in full: at most {MAX_DECODE_PIXELS} "
                                   f"pixels (send a JPEG, which decodes reduced, or a smaller image)")
            return fit_image(img, height, width)  # decodes: a truncated file fails here
    except Refused:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise Refused(415, f"not a readable {accepted} image: {e}") from None


@dataclass
class Access:
    """Who may do what: allowed Host names, bearer tokens for creating sessions and uploads, the admin key."""

    allowed_hosts: frozenset[str] = frozenset()  # names beyond IP literals and loopback names; "*": any
    tokens: tuple[str, ...] = ()  # empty: no authentication at the edge
    admin_key: str | None = None  # None: the admin view is closed

    @staticmethod
    def read_tokens(path: Path) -> tuple[str, ...]:
        """--token-file: one bearer token per line (blank lines and # comments skipped)."""
        lines = [line.strip() for line in path.read_text().splitlines()]
        tokens = tuple(t for t in lines if t and not t.startswith("#"))
        if not tokens:
            raise ValueError(f"{path} holds no token")
        if any(len(t) < TOKEN_MIN_CHARS or not t.isprintable() or " " in t for t in tokens):
            raise ValueError(f"{path}: every token needs at least {TOKEN_MIN_CHARS} printable characters, no spaces")
        return tokens

    def check_host(self, request: web.Request) -> None:
        host = (request.host or "").lower()
        name = host[1:host.index("]")] if host.startswith("[") and "]" in host else host.rsplit(":", 1)[0]
        try:
            ipaddress.ip_address(name)
            return  # an IP literal cannot be rebound by DNS
        except ValueError:
            pass
        if name in LOOPBACK_NAMES or name in self.allowed_hosts or "*" in self.allowed_hosts:
            return
        raise Refused(421, f"Host {name[:64]!r} is not served here: use an IP address or a name given with --allowed-host")

    def check_token(self, request: web.Request) -> None:
        if not self.tokens:
            return
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not any(hmac.compare_digest(given.strip(), t) for t in self.tokens):
            raise Refused(401, "this edge needs 'Authorization: Bearer <token>' (a token of its --token-file)",
                          {"WWW-Authenticate": "Bearer"})

    def check_admin(self, request: web.Request) -> None:
        given = request.headers.get(ADMIN_KEY_HTTP_HEADER, "")
        if self.admin_key is None or not hmac.compare_digest(given, self.admin_key):
            raise Refused(401, f"the session list is for operators: send the edge's admin key in '{ADMIN_KEY_HTTP_HEADER}' "
                               "(counts are public on /metrics)")


class EdgeMetrics:
    """The edge's Prometheus metrics, in a registry of their own; names, kinds and help in
    flowact.contract.WEB_METRICS."""

    def __init__(self):
        from prometheus_client import CollectorRegistry

        self.registry = CollectorRegistry()
        self.sessions_active = self._make(WEB_SESSIONS_ACTIVE)
        self.sessions_started = self._make(WEB_SESSIONS_STARTED)
        self.sessions_rejected = self._make(WEB_SESSIONS_REJECTED)
        self.sessions_failed = self._make(WEB_SESSIONS_FAILED)
        self.failovers = self._make(WEB_FAILOVERS)
        self.frames_sent = self._make(WEB_FRAMES_SENT)
        self.frames_late = self._make(WEB_FRAMES_LATE)
        self.silence_filled = self._make(WEB_SILENCE_FILLED)
        self.ttff = self._make(WEB_TTFF)
        self.mouth_latency = self._make(WEB_MOUTH_LATENCY)
        self.audio_delay = self._make(WEB_AUDIO_DELAY)
        self.chunk_ready = self._make(WEB_CHUNK_READY)
        self.av_offset = self._make(WEB_AV_OFFSET, buckets=OFFSET_BUCKETS)
        self.jitter_buffer = self._make(WEB_JITTER_BUFFER)

    def _make(self, name: str, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        from prometheus_client import Counter, Gauge, Histogram

        kind, help_text = WEB_METRICS[name]
        if kind == "GAUGE":
            return Gauge(name, help_text, registry=self.registry)
        if kind == "COUNTER":  # prometheus-client adds the _total
            return Counter(name.removesuffix("_total"), help_text, registry=self.registry)
        return Histogram(name, help_text, registry=self.registry, buckets=buckets)

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class Edge:
    """The sessions, the uploaded images and the metrics of one `flowact web` process."""

    def __init__(self, url: str, height: int, width: int, max_sessions: int, ice_servers=(),
                 jitter_buffer_s: float | None = None, access: Access | None = None,
                 connect_timeout_s: float = WEB_CONNECT_TIMEOUT_S, upstream_timeout_s: float = LIVE_UPSTREAM_TIMEOUT_S,
                 failover: FailoverPolicy | None = FailoverPolicy()):
        self.url, self.height, self.width, self.max_sessions = url, height, width, max_sessions
        self.ice_servers = list(ice_servers)
        self.fixed_jitter_buffer_s = jitter_buffer_s  # None: sized from measurements (JitterSizer)
        self.access = access or Access()
        self.session_options = {"connect_timeout_s": connect_timeout_s, "upstream_timeout_s": upstream_timeout_s,
                                "failover": failover}
        self.sizer = JitterSizer()
        self.metrics = EdgeMetrics()
        self.sessions: dict[str, Session] = {}  # sha256 of the session's secret -> session
        self.opened = 0  # sessions created so far: a session's number in logs and the admin view
        self.images: OrderedDict[str, np.ndarray] = OrderedDict()
        self.default_image = load_image(REFERENCE_IMAGE, height, width)
        self.decoding = asyncio.Semaphore(DECODE_CONCURRENCY)
        self.waiting_to_decode = 0

    # --- sessions --------------------------------------------------------------------------------

    def _refuse_when_full(self) -> None:
        if len(self.sessions) >= self.max_sessions:
            self.metrics.sessions_rejected.inc()
            raise Refused(503, f"the edge is at capacity: {len(self.sessions)} of --max-sessions {self.max_sessions} "
                               "sessions in use; retry later", {"Retry-After": "5"})

    async def create_session(self, request: web.Request) -> web.Response:
        """Everything that can fail cheaply fails before a slot is taken; from the slot on, every failure
        gives it back before the answer leaves."""
        self.access.check_token(request)
        if request.content_type != WEB_SDP_TYPE:
            raise Refused(415, f"send the SDP offer as {WEB_SDP_TYPE}, not {request.content_type!r}")
        self._refuse_when_full()
        offer = check_offer(await read_body(request, MAX_SDP_BYTES, "SDP offer"), request.charset)
        query = request.query
        image = self.default_image
        if "image" in query:
            image = self.images.get(query["image"])
            if image is None:
                raise Refused(404, f"no uploaded image {query['image'][:64]!r}: POST it to {IMAGES_PATH} first "
                                   f"(images are kept in memory, the {MAX_IMAGES} most recent)")
            self.images.move_to_end(query["image"])
        try:
            conditioning = Conditioning(query.get("behaviour", WEB_BEHAVIOUR_AUTO), query.get("prompt"))
        except ControlError as e:
            raise Refused(400, str(e)) from None
        unready = await upstream_unready(self.url)
        if unready is not None:
            self.metrics.sessions_rejected.inc()
            raise Refused(503, f"the avatar server is not ready ({unready}); retry later", {"Retry-After": "2"})
        self._refuse_when_full()  # again: other offers may have taken the last slots meanwhile
        jitter = self.fixed_jitter_buffer_s if self.fixed_jitter_buffer_s is not None else self.sizer.size()
        self.opened += 1
        session = Session(self.url, image, self.metrics, jitter, self.sizer.add, self.ice_servers, conditioning,
                          number=self.opened, **self.session_options)
        self.sessions[session.key] = session  # counted from now on: concurrent offers cannot overshoot
        session.on_closed = self._closed
        try:
            answer = await session.answer(offer)
        except BaseException as e:  # any failure (a bad offer, aiortc, the request cancelled) frees the slot now
            self._closed(session)
            session.close(f"offer failed: {e}")
            if isinstance(e, OfferError):
                self.metrics.sessions_rejected.inc()
                raise Refused(400, str(e)) from None
            raise
        self.metrics.sessions_started.inc()
        self.metrics.sessions_active.set(len(self.sessions))
        self.metrics.jitter_buffer.observe(jitter)
        log.info("session #%d: answered, jitter buffer %.0f ms", session.number, jitter * 1000)
        return web.Response(status=201, text=answer, content_type=WEB_SDP_TYPE,
                            headers={"Location": f"{WEB_SESSIONS_PATH}/{session.secret}"})

    def _closed(self, session: Session) -> None:
        if self.sessions.get(session.key) is session:
            del self.sessions[session.key]
        self.metrics.sessions_active.set(len(self.sessions))

    async def delete_session(self, request: web.Request) -> web.Response:
        session = self.sessions.get(Session.key_of(request.match_info["secret"]))
        if session is None:
            raise Refused(404, "no such session (ended already?)")
        await session.close("DELETE")
        return web.Response(status=204)

    async def list_sessions(self, request: web.Request) -> web.Response:
        self.access.check_admin(request)
        return web.json_response([{"number": s.number, "state": s.state, "connection": s.pc.connectionState,
                                   "mode": s.conditioning.kind, **s.stats_json()} for s in self.sessions.values()])

    async def close_all(self) -> None:
        await asyncio.gather(*(s.close("edge shutting down") for s in list(self.sessions.values())),
                             return_exceptions=True)

    # --- images ----------------------------------------------------------------------------------

    async def upload_image(self, request: web.Request) -> web.Response:
        """Bodies are read whole (any number of segments) and decoded off the event loop, at most
        DECODE_CONCURRENCY at once: the edge's memory stays bounded under any burst of uploads."""
        self.access.check_token(request)
        check_image_type(request.content_type)  # before reading: a wrong type costs no body
        if self.waiting_to_decode >= DECODE_QUEUE:
            raise Refused(503, f"{self.waiting_to_decode} uploads are waiting to be decoded; retry later",
                          {"Retry-After": "2"})
        self.waiting_to_decode += 1
        try:
            body = await read_body(request, MAX_IMAGE_BYTES, "image")
            async with self.decoding:
                image = await asyncio.get_running_loop().run_in_executor(
                    None, decode_image, body, request.content_type, self.height, self.width)
        finally:
            self.waiting_to_decode -= 1
        image_id = hashlib.sha256(body).hexdigest()[:16]
        self.images[image_id] = image
        self.images.move_to_end(image_id)
        while len(self.images) > MAX_IMAGES:
            self.images.popitem(last=False)
        return web.json_response({"id": image_id, "width": self.width, "height": self.height}, status=201,
                                 headers={"Location": f"{IMAGES_PATH}/{image_id}"})

    async def get_image(self, request: web.Request) -> web.Response:
        image_id = request.match_info["id"]
        image = self.default_image if image_id == "default" else self.images.get(image_id)
        if image is None:
            raise Refused(404, f"no image {image_id[:64]!r}")
        out = io.BytesIO()
        Image.fromarray(image).save(out, format="PNG")
        return web.Response(body=out.getvalue(), content_type="image/png")

    # --- the rest --------------------------------------------------------------------------------

    async def metrics_page(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.text(), headers={"Content-Type": "text/plain; version=0.0.4"})

    async def ready(self, request: web.Request) -> web.Response:
        if len(self.sessions) >= self.max_sessions:
            raise Refused(503, f"not ready: at --max-sessions ({len(self.sessions)}/{self.max_sessions})")
        unready = await upstream_unready(self.url)
        if unready is not None:
            raise Refused(503, f"not ready: the avatar server is not ready ({unready})")
        return web.Response(text=f"ready ({len(self.sessions)}/{self.max_sessions} sessions)\n")

    async def config(self, request: web.Request) -> web.Response:
        recent = list(self.sizer.recent)
        return web.json_response({"width": self.width, "height": self.height, "max_sessions": self.max_sessions,
                                  "sessions": len(self.sessions), "jitter_buffer_next_s": self.sizer.size(),
                                  "recent_chunks": len(recent),
                                  "lateness_p50_s": percentile(recent, 50) if recent else None,
                                  "lateness_p99_s": percentile(recent, 99) if recent else None})


def text_error(status: int, message: str, headers: dict | None = None) -> web.Response:
    return web.Response(status=status, text=message + "\n", headers=headers)


def make_app(edge: Edge) -> web.Application:
    @web.middleware
    async def guard(request: web.Request, handler):
        try:
            edge.access.check_host(request)
            return await handler(request)
        except Refused as e:
            return text_error(e.status, str(e), e.headers)

    app = web.Application(client_max_size=MAX_IMAGE_BYTES + 1024, middlewares=[guard])

    def static(path: Path, ctype: str):
        async def handler(request: web.Request) -> web.FileResponse:
            return web.FileResponse(path, headers={"Content-Type": ctype, "Cache-Control": "no-cache"})
        return handler

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    app.router.add_get("/", static(STATIC / "index.html", "text/html; charset=utf-8"))
    app.router.add_get("/app.js", static(STATIC / "app.js", "text/javascript; charset=utf-8"))
    app.router.add_get("/samples/reference.png", static(REFERENCE_IMAGE, "image/png"))
    app.router.add_get("/samples/speech.wav", static(SPEECH_WAV, "audio/wav"))
    app.router.add_post(WEB_SESSIONS_PATH, edge.create_session)
    app.router.add_get(WEB_SESSIONS_PATH, edge.list_sessions)
    app.router.add_delete(WEB_SESSIONS_PATH + "/{secret}", edge.delete_session)
    app.router.add_post(IMAGES_PATH, edge.upload_image)
    app.router.add_get(IMAGES_PATH + "/{id}", edge.get_image)
    app.router.add_get("/v1/config", edge.config)
    app.router.add_get("/metrics", edge.metrics_page)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", edge.ready)

    async def shutdown(app):
        await edge.close_all()

    app.on_shutdown.append(shutdown)
    return app
