"""The edge's HTTP side (aiohttp): WHIP/WHEP-style signaling, reference image upload, the page, /metrics.

    POST   /v1/sessions[?image=ID&behaviour=B&prompt=TEXT]   body: SDP offer (application/sdp)
           -> 201, body: SDP answer (application/sdp), Location: /v1/sessions/<id>
           -> 400 bad offer or parameter, 404 unknown image, 415 not application/sdp,
              503 at --max-sessions (Retry-After) or the server unreachable
    DELETE /v1/sessions/<id>  -> 204 (END on the gRPC stream, then the peer connection closes); 404 unknown
    GET    /v1/sessions       -> JSON list of the open sessions
    POST   /v1/images         body: a PNG, JPEG or WebP image, its Content-Type
           -> 201 {"id", "width", "height"}, Location: /v1/images/<id>
           -> 413 too large, 415 not one of those images, 422 too small
    GET    /v1/images/<id>    -> the image as the avatar will use it (cropped and resized), PNG
    GET    /v1/config         -> JSON: the avatar's size, capacity, the jitter buffer the next session gets
    GET    /  /app.js  /samples/{reference.png,speech.wav}  /metrics  /healthz

Errors are plain text that says what was wrong and what is accepted.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
from collections import OrderedDict
from pathlib import Path

import numpy as np
from aiohttp import web
from PIL import Image, UnidentifiedImageError

from flowact.contract import (WEB_IMAGE_TYPES, WEB_IMAGES_PATH, WEB_MAX_IMAGE_BYTES, WEB_MAX_IMAGE_PIXELS,
                              WEB_MAX_IMAGES, WEB_METRICS, WEB_MIN_IMAGE_SIDE, WEB_SDP_TYPE, WEB_SESSIONS_PATH)
from flowact.media import REFERENCE_IMAGE, SPEECH_WAV, load_image
from flowact.stats import percentile
from flowact.web.session import OfferError, Session
from flowact.web.timeline import Conditioning, ControlError, JitterSizer

log = logging.getLogger("flowact.web")
STATIC = Path(__file__).parent / "static"
LATENCY_BUCKETS = (0.02, 0.05, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.5, 2.0, 3.0, 5.0)
OFFSET_BUCKETS = (-0.1, -0.04, -0.02, -0.01, 0.0, 0.01, 0.02, 0.04, 0.1)


class ImageRejected(ValueError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def decode_image(body: bytes, content_type: str, height: int, width: int) -> np.ndarray:
    """An uploaded reference image -> (H, W, 3) uint8 at the server's geometry, or ImageRejected.

    The declared type must be one of WEB_IMAGE_TYPES and the bytes must be that format (sniffed by
    PIL, not trusted from the header); the size is checked before decoding (bytes, then pixels from
    the header, so a decompression bomb is refused without being decoded)."""
    accepted = ", ".join(WEB_IMAGE_TYPES)
    if content_type not in WEB_IMAGE_TYPES:
        raise ImageRejected(415, f"Content-Type {content_type or 'none'!r} is not accepted: send the image's bytes "
                                 f"with one of {accepted}")
    if len(body) > WEB_MAX_IMAGE_BYTES:
        raise ImageRejected(413, f"image of {len(body)} bytes is larger than {WEB_MAX_IMAGE_BYTES} bytes")
    try:
        with Image.open(io.BytesIO(body)) as img:
            fmt, (w, h) = img.format, img.size
            if fmt != WEB_IMAGE_TYPES[content_type]:
                raise ImageRejected(415, f"the bytes are {fmt or 'not an image'}, not {content_type}")
            if w * h > WEB_MAX_IMAGE_PIXELS:
                raise ImageRejected(413, f"image of {w}x{h} pixels is larger than {WEB_MAX_IMAGE_PIXELS} pixels")
            if min(w, h) < WEB_MIN_IMAGE_SIDE:
                raise ImageRejected(422, f"image of {w}x{h} pixels is too small: each side at least "
                                         f"{WEB_MIN_IMAGE_SIDE} pixels")
            img.load()  # decode now: a truncated file fails here
        return load_image(io.BytesIO(body), height, width)
    except ImageRejected:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageRejected(415, f"not a readable {accepted} image: {e}") from None


class EdgeMetrics:
    """The edge's Prometheus metrics (own registry), named and described in flowact.contract.WEB_METRICS."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        kinds = {"GAUGE": Gauge, "COUNTER": Counter, "HISTOGRAM": Histogram}
        made = {}
        for name, (kind, help_text) in WEB_METRICS.items():
            kwargs = {"registry": self.registry}
            if kind == "HISTOGRAM":
                kwargs["buckets"] = OFFSET_BUCKETS if "offset" in name else LATENCY_BUCKETS
            made[name] = kinds[kind](name.removesuffix("_total") if kind == "COUNTER" else name, help_text, **kwargs)
        short = lambda name: name.removeprefix("flowact_web_").removesuffix("_total").removesuffix("_seconds")  # noqa: E731
        for name, metric in made.items():
            setattr(self, short(name), metric)

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class Edge:
    """The sessions, the uploaded images and the metrics of one `flowact web` process."""

    def __init__(self, url: str, height: int, width: int, max_sessions: int, ice_servers=(),
                 jitter_buffer_s: float | None = None):
        self.url, self.height, self.width, self.max_sessions = url, height, width, max_sessions
        self.ice_servers = list(ice_servers)
        self.fixed_jitter_buffer_s = jitter_buffer_s  # None: sized from measurements (JitterSizer)
        self.sizer = JitterSizer()
        self.metrics = EdgeMetrics()
        self.sessions: dict[str, Session] = {}
        self.images: OrderedDict[str, np.ndarray] = OrderedDict()
        self.default_image = load_image(REFERENCE_IMAGE, height, width)

    # --- sessions --------------------------------------------------------------------------------

    async def create_session(self, request: web.Request) -> web.Response:
        if request.content_type != WEB_SDP_TYPE:
            return text_error(415, f"send the SDP offer as {WEB_SDP_TYPE}, not {request.content_type!r}")
        if len(self.sessions) >= self.max_sessions:
            self.metrics.sessions_rejected.inc()
            return text_error(503, f"the edge is at capacity: {len(self.sessions)} of --max-sessions "
                                   f"{self.max_sessions} sessions in use; retry later", {"Retry-After": "5"})
        query = request.query
        image = self.default_image
        if "image" in query:
            image = self.images.get(query["image"])
            if image is None:
                return text_error(404, f"no uploaded image {query['image'][:64]!r}: POST it to {WEB_IMAGES_PATH} first "
                                       f"(images are kept in memory, the {WEB_MAX_IMAGES} most recent)")
            self.images.move_to_end(query["image"])
        try:
            conditioning = Conditioning(query.get("behaviour", "auto"), query.get("prompt"))
        except ControlError as e:
            return text_error(400, str(e))
        jitter = self.fixed_jitter_buffer_s if self.fixed_jitter_buffer_s is not None else self.sizer.size()
        session = Session(self.url, image, self.metrics, jitter, self.sizer.add, self.ice_servers, conditioning)
        self.sessions[session.id] = session  # counted from now on: concurrent offers cannot overshoot
        session.on_closed = self._closed
        try:
            answer = await session.answer(await request.text())
        except OfferError as e:
            self.metrics.sessions_rejected.inc()
            await session.close(str(e))
            return text_error(400, str(e))
        self.metrics.sessions_started.inc()
        self.metrics.sessions_active.set(len(self.sessions))
        self.metrics.jitter_buffer.observe(jitter)
        log.info("session %s: stream %s, jitter buffer %.0f ms", session.id, session.stream_id, jitter * 1000)
        return web.Response(status=201, text=answer, content_type=WEB_SDP_TYPE,
                            headers={"Location": f"{WEB_SESSIONS_PATH}/{session.id}"})

    def _closed(self, session: Session) -> None:
        self.sessions.pop(session.id, None)
        self.metrics.sessions_active.set(len(self.sessions))

    async def delete_session(self, request: web.Request) -> web.Response:
        session = self.sessions.get(request.match_info["id"])
        if session is None:
            return text_error(404, f"no session {request.match_info['id'][:64]!r} (ended already?)")
        await session.close("DELETE")
        return web.Response(status=204)

    async def list_sessions(self, request: web.Request) -> web.Response:
        return web.json_response([{"id": s.id, "stream_id": s.stream_id, "state": s.state,
                                   "connection": s.pc.connectionState, "mode": s.conditioning.mode,
                                   **s.stats.to_json()} for s in self.sessions.values()])

    async def close_all(self) -> None:
        await asyncio.gather(*(s.close("edge shutting down") for s in list(self.sessions.values())),
                             return_exceptions=True)

    # --- images ----------------------------------------------------------------------------------

    async def upload_image(self, request: web.Request) -> web.Response:
        if request.content_length is not None and request.content_length > WEB_MAX_IMAGE_BYTES:
            return text_error(413, f"image of {request.content_length} bytes is larger than {WEB_MAX_IMAGE_BYTES} bytes")
        body = await request.content.read(WEB_MAX_IMAGE_BYTES + 1)
        try:
            image = await asyncio.get_running_loop().run_in_executor(
                None, decode_image, body, request.content_type, self.height, self.width)
        except ImageRejected as e:
            return text_error(e.status, str(e))
        image_id = hashlib.sha256(body).hexdigest()[:16]
        self.images[image_id] = image
        self.images.move_to_end(image_id)
        while len(self.images) > WEB_MAX_IMAGES:
            self.images.popitem(last=False)
        return web.json_response({"id": image_id, "width": self.width, "height": self.height}, status=201,
                                 headers={"Location": f"{WEB_IMAGES_PATH}/{image_id}"})

    async def get_image(self, request: web.Request) -> web.Response:
        image_id = request.match_info["id"]
        image = self.default_image if image_id == "default" else self.images.get(image_id)
        if image is None:
            return text_error(404, f"no image {image_id[:64]!r}")
        out = io.BytesIO()
        Image.fromarray(image).save(out, format="PNG")
        return web.Response(body=out.getvalue(), content_type="image/png")

    # --- the rest --------------------------------------------------------------------------------

    async def metrics_page(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.text(), headers={"Content-Type": "text/plain; version=0.0.4"})

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
    app = web.Application(client_max_size=WEB_MAX_IMAGE_BYTES + 1024)
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
    app.router.add_delete(WEB_SESSIONS_PATH + "/{id}", edge.delete_session)
    app.router.add_post(WEB_IMAGES_PATH, edge.upload_image)
    app.router.add_get(WEB_IMAGES_PATH + "/{id}", edge.get_image)
    app.router.add_get("/v1/config", edge.config)
    app.router.add_get("/metrics", edge.metrics_page)
    app.router.add_get("/healthz", healthz)

    async def shutdown(app):
        await edge.close_all()

    app.on_shutdown.append(shutdown)
    return app
