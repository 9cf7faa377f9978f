"""One viewer session: a peer connection in front, one gRPC stream into the `flowact` ensemble behind.

The chunk loop, per session:
  1. the viewer's audio track is decoded by aiortc, resampled to 16 kHz mono (libswresample, which
     keeps its filter state across frames) and pushed onto the ChunkAssembler; a ticker fills
     silence when input is late or absent;
  2. each complete chunk goes out on the gRPC stream (START with the reference image on chunk 0),
     conditioned by the data channel's behaviour or prompt (`auto`: speaking / idle by voice);
  3. its frames come back; chunk 0 fixes the playout origin: when its audio was complete plus the
     jitter buffer (or when it arrived, if later);
  4. the video track plays frame n at origin + n / 25, the speech track the same samples at the
     same times: the speech is delayed by exactly the time its frames took;
  5. when the replica goes away the gRPC side (flowact.client.live.LiveStream) continues on another;
  6. the session ends (DELETE, the viewer closing, ICE failure, a server that refuses the stream or
     that failover cannot replace) with END on the gRPC stream when the server still holds the
     stream, and frees everything.

The session knows nothing about HTTP: the app creates it from an offer and closes it. Its secret (the
capability to end it) and its gRPC stream id are never logged nor told to the viewer: logs and
messages name the session by its number.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Callable

import av
import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription, rtcpeerconnection
from aiortc.mediastreams import MediaStreamError
from aiortc.rtcsctptransport import LOCAL_MAX_MESSAGE_SIZE, RTCSctpTransport

from flowact.client.live import LiveStream, upstream_client
from flowact.client.stream import Failover, FailoverPolicy, StreamError
from flowact.contract import ENSEMBLE_MODEL, LIVE_UPSTREAM_TIMEOUT_S, WEB_CONNECT_TIMEOUT_S
from flowact.presets import CHUNK_SECONDS, FRAMES_PER_CHUNK, SAMPLE_RATE
from flowact.stats import percentile
from flowact.web.timeline import Chunk, ChunkAssembler, Conditioning, ControlError
from flowact.web.tracks import AUDIO_FRAMES_PER_CHUNK, AvatarVideoTrack, Playout, SpeechTrack

log = logging.getLogger("flowact.web")

NO_AUDIO_WAIT_S = 0.5  # after connecting, start the timeline on silence if no audio came by then
TICK_S = 0.04  # how often the silence filler looks at the clock
END_TIMEOUT_S = 5.0  # wait this long for the server's answer to END
STATS_EVERY_S = 1.0  # session stats to the viewer over the data channel
UPSTREAM_CHECK_S = 2.0  # POST /v1/sessions asks the server whether it is ready within this, else 503
SESSION_SECRET_BYTES = 32  # a session's capability (its Location): 256 random bits
MAX_CHANNELS = 4  # data channels per session; more are closed
MAX_CONTROL_BYTES = 4096  # a data-channel control message (JSON); longer ones are refused unparsed


class OfferError(ValueError):
    """An SDP offer the edge cannot answer; the message says why."""


class BoundedSctpTransport(RTCSctpTransport):
    """aiortc's SCTP with the bounds it advertises but does not apply. aiortc keeps a data-channel
    message's fragments until its last one and rescans all of them on every fragment (an 8 MiB message
    cost seconds of CPU, growing quadratically), on any stream id a peer picks. Here a peer that holds
    more than the advertised max-message-size in fragments, or uses a stream id beyond the few channels
    a session may open, breaks the protocol: its association ends (and with it its session)."""

    MAX_STREAM_ID = 4 * MAX_CHANNELS  # ids of both sides' channels, with room for closed ones

    async def _receive_data_chunk(self, chunk) -> None:
        if chunk.stream_id >= self.MAX_STREAM_ID:
            raise ConnectionError(f"data channel stream id {chunk.stream_id}: at most {self.MAX_STREAM_ID}")
        held = sum(len(c.user_data) for s in self._inbound_streams.values() for c in s.reassembly)
        if held + len(chunk.user_data) > LOCAL_MAX_MESSAGE_SIZE:
            raise ConnectionError(f"data channel message over {LOCAL_MAX_MESSAGE_SIZE} bytes")
        await super()._receive_data_chunk(chunk)


rtcpeerconnection.RTCSctpTransport = BoundedSctpTransport  # what every peer connection of the edge makes


async def upstream_unready(url: str) -> str | None:
    """None if the server answers ready within UPSTREAM_CHECK_S, else why not."""
    client = upstream_client(url)
    try:
        ready = await asyncio.wait_for(client.is_server_ready(), UPSTREAM_CHECK_S)
        return None if ready else "it says not ready"
    except asyncio.TimeoutError:
        return f"no answer within {UPSTREAM_CHECK_S:.0f} s"
    except Exception as e:  # InferenceServerException: refused, unreachable
        return (e.message() if hasattr(e, "message") else str(e)).splitlines()[0][:200]
    finally:
        await client.close()


@dataclass
class SessionStats:
    offer_at: float
    jitter_buffer_s: float
    ttff_s: float | None = None
    audio_delay_s: float | None = None
    chunks_back: int = 0
    frames_sent: int = 0
    frames_late: int = 0
    mouth_latency_s: list[float] = field(default_factory=list)
    av_offset_s: list[float] = field(default_factory=list)

    def to_json(self) -> dict:
        ms = lambda v: None if v is None else round(v * 1000, 1)  # noqa: E731
        return {"ttff_ms": ms(self.ttff_s), "audio_delay_ms": ms(self.audio_delay_s),
                "jitter_buffer_ms": ms(self.jitter_buffer_s),
                "mouth_latency_p50_ms": ms(percentile(self.mouth_latency_s[-250:], 50)) if self.mouth_latency_s else None,
                "mouth_latency_p99_ms": ms(percentile(self.mouth_latency_s[-250:], 99)) if self.mouth_latency_s else None,
                "chunks_back": self.chunks_back,
                "frames_sent": self.frames_sent, "frames_late": self.frames_late}


class Session:
    def __init__(self, url: str, image: np.ndarray, metrics, jitter_buffer_s: float,
                 on_lateness: Callable[[float], None], ice_servers=(), conditioning: Conditioning | None = None,
                 model: str = ENSEMBLE_MODEL, number: int = 0, connect_timeout_s: float = WEB_CONNECT_TIMEOUT_S,
                 upstream_timeout_s: float = LIVE_UPSTREAM_TIMEOUT_S, failover: FailoverPolicy | None = FailoverPolicy()):
        self.number = number  # what logs and the admin view call it
        self.connect_timeout_s = connect_timeout_s  # a viewer that has not connected by then is ended
        self.secret = secrets.token_urlsafe(SESSION_SECRET_BYTES)  # the creator's capability: Location
        self.key = self.key_of(self.secret)
        # the gRPC side: chunks in as the clock makes them, frames out, failover; its stream id never leaves the edge
        self.upstream = LiveStream(url, image, self._on_frames, self._on_failover, model=model, failover=failover,
                                   upstream_timeout_s=upstream_timeout_s, id_prefix="web-", name=f"of session #{number}")
        self.metrics = metrics
        self.on_lateness = on_lateness
        self.stats = SessionStats(time.monotonic(), jitter_buffer_s)
        self.conditioning = conditioning or Conditioning()
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=list(ice_servers)))
        self.playout = Playout()
        self.video = AvatarVideoTrack(self.playout, self._on_frame_sent)
        self.speech = SpeechTrack(self.playout, self._on_audio_sent)
        self.assembler = ChunkAssembler()
        self.channels: list = []  # the viewer's data channels (at most MAX_CHANNELS)
        self.state = "new"  # new -> live -> ended
        self.end_reason: str | None = None
        self.closed = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._complete_at: dict[int, float] = {}  # chunk index -> when its audio was complete
        self._not_shown: dict[int, float] = {}  # the same, for chunks whose first frame has not left yet
        self._connected_at: float | None = None
        self._stream_task: asyncio.Task | None = None
        self._has_speech = False  # the offer has an audio section: the speech goes back on it
        self._chunk0_complete: float | None = None
        self._first_frame_of: dict[int, float] = {}  # chunk -> when its first frame left (for the A/V offset)
        self._server_failed = False
        self._closing: asyncio.Task | None = None
        self.on_closed: Callable[["Session"], None] | None = None

    @staticmethod
    def key_of(secret: str) -> str:
        """Where the edge files a session: its secret hashed (a lookup reveals nothing by its timing)."""
        return hashlib.sha256(secret.encode("utf-8", "replace")).hexdigest()

    # --- signaling -------------------------------------------------------------------------------

    async def answer(self, offer_sdp: str) -> str:
        """The offer -> the answer (ICE candidates gathered, no trickle)."""
        pc = self.pc
        pc.on("track", self._on_track)
        pc.on("datachannel", self._on_datachannel)
        pc.on("connectionstatechange", self._on_connection_state)
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
            kinds = {t.kind for t in pc.getTransceivers()}
            if "video" not in kinds:
                raise OfferError("the offer has no video section: offer to receive video (and send audio)")
            pc.addTrack(self.video)
            self._has_speech = "audio" in kinds
            if self._has_speech:
                pc.addTrack(self.speech)
            await pc.setLocalDescription(await pc.createAnswer())
        except OfferError:
            raise
        except Exception as e:  # aiortc raises ValueError, KeyError and friends on offers it cannot take
            raise OfferError(f"cannot answer the SDP offer: {type(e).__name__}: {str(e)[:200]}") from None
        self._stream_task = self._spawn(self._stream())
        self._spawn(self._tick())
        self.state = "live"
        return pc.localDescription.sdp

    # --- input: audio -> chunks ------------------------------------------------------------------

    def _on_track(self, track) -> None:
        if track.kind == "audio":
            self._spawn(self._read_audio(track))

    async def _read_audio(self, track) -> None:
        resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        try:
            while True:
                frame = await track.recv()
                now = time.monotonic()
                for out in resampler.resample(frame):
                    self._enqueue(self.assembler.push(out.to_ndarray().reshape(-1), now))
        except MediaStreamError:  # the viewer's audio ended: the ticker goes on with silence
            log.info("session #%d: audio input ended", self.number)

    async def _tick(self) -> None:
        """Fill silence when input is late or absent, so chunks keep coming at 0.48 s; end the session if
        the viewer never connects."""
        while True:
            await asyncio.sleep(TICK_S)
            now = time.monotonic()
            if self._connected_at is None:
                if now - self.stats.offer_at > self.connect_timeout_s:
                    self._fail(f"the viewer did not connect within {self.connect_timeout_s:.1f} s (ICE)")
                    return
            elif self.assembler.origin is None and now - self._connected_at >= NO_AUDIO_WAIT_S:
                self.assembler.start(self._connected_at)  # no audio: the avatar idles on silence
            before = self.assembler.filled_total
            self._enqueue(self.assembler.fill(now))
            if self.assembler.filled_total > before:
                self.metrics.silence_filled.inc((self.assembler.filled_total - before) / SAMPLE_RATE)

    def _enqueue(self, chunks: list[Chunk]) -> None:
        if self.state != "live":
            return
        for chunk in chunks:
            self._complete_at[chunk.index] = chunk.complete_at
            if chunk.index == 0:
                self._chunk0_complete = chunk.complete_at
            self.speech.put_chunk(chunk.index, chunk.audio)
            self.upstream.put(chunk.index, chunk.audio, *self.conditioning.next(chunk))

    # --- the gRPC stream -------------------------------------------------------------------------

    async def _stream(self) -> None:
        """The gRPC side (flowact.client.live): it fails over by itself; what it cannot continue ends the session."""
        try:
            await self.upstream.run()
        except StreamError as e:
            self._server_failed = True  # the server freed (or never admitted) the stream
            self._fail(str(e))

    def _on_failover(self, f: Failover) -> None:
        """The first new chunk after a failover came: tell the viewer and the metrics what it cost."""
        self.metrics.failovers.inc()
        log.info("session #%d: failed over (%s) at chunk %d, %d chunk(s) replayed, viewer gap %.0f ms",
                 self.number, f.cause, f.at_chunk, f.replayed, f.gap_s * 1000)
        self.send({"type": "failover", "cause": f.cause, "at_chunk": f.at_chunk, "replayed": f.replayed,
                   "attempts": f.attempts, "gap_ms": round(f.gap_s * 1000)})

    def stats_json(self) -> dict:
        return {**self.stats.to_json(), "chunks_sent": self.upstream.chunks_sent}

    def _on_frames(self, k: int, frames: np.ndarray, now: float) -> None:
        self.stats.chunks_back += 1
        complete = self._complete_at.pop(k, now)
        self.metrics.chunk_ready.observe(now - complete)
        self.on_lateness(now - (self._chunk0_complete + k * CHUNK_SECONDS))
        if k == 0:
            origin = max(self._chunk0_complete + self.stats.jitter_buffer_s, now)
            self.playout.begin(origin)
            # the speech of chunk 0 arrived from (complete - 0.48 s) on and leaves from the origin on
            self.stats.audio_delay_s = origin - (self._chunk0_complete - CHUNK_SECONDS)
            self.metrics.audio_delay.observe(self.stats.audio_delay_s)
        self._not_shown[k] = complete  # until its first frame leaves (mouth latency)
        self.video.put_chunk(k, frames)

    # --- output: what left -----------------------------------------------------------------------

    def _on_frame_sent(self, n: int, present: bool) -> None:
        now = time.monotonic()
        self.stats.frames_sent += 1
        self.metrics.frames_sent.inc()
        if not present:
            self.stats.frames_late += 1
            self.metrics.frames_late.inc()
            return
        k = n // FRAMES_PER_CHUNK
        if self.stats.ttff_s is None:
            self.stats.ttff_s = now - self.stats.offer_at
            self.metrics.ttff.observe(self.stats.ttff_s)
        complete = self._not_shown.pop(k, None)
        for stale in [i for i in self._not_shown if i < k]:  # chunks none of whose frames made it in time
            del self._not_shown[stale]
        if complete is not None:  # the chunk's first frame to leave
            self.stats.mouth_latency_s.append(now - complete)
            self.metrics.mouth_latency.observe(now - complete)
        if n % FRAMES_PER_CHUNK == 0 and self._has_speech:
            self._first_frame_of[k] = now

    def _on_audio_sent(self, m: int) -> None:
        k, j = divmod(m, AUDIO_FRAMES_PER_CHUNK)
        if j == 0:
            video = self._first_frame_of.pop(k, None)
            if video is not None:
                offset = time.monotonic() - video
                self.stats.av_offset_s.append(offset)
                self.metrics.av_offset.observe(offset)

    # --- data channel ----------------------------------------------------------------------------

    def _on_datachannel(self, channel) -> None:
        self.channels = [c for c in self.channels if c.readyState != "closed"]
        if len(self.channels) >= MAX_CHANNELS:
            channel.close()  # the session's stats and answers go to the channels it has
            return
        self.channels.append(channel)

        @channel.on("message")
        def on_message(message):
            if len(message) > MAX_CONTROL_BYTES or not isinstance(message, str):
                what = f"{len(message)} bytes" if len(message) > MAX_CONTROL_BYTES else "binary"
                self.send({"type": "error", "message": f"control message refused ({what}): send JSON text of at most "
                                                      f"{MAX_CONTROL_BYTES} bytes"})
                return
            try:
                self.conditioning.apply(json.loads(message))
                self.send({"type": "behaviour", "mode": self.conditioning.mode})
            except (ControlError, ValueError) as e:
                self.send({"type": "error", "message": str(e)[:300]})

        self.send({"type": "session", "number": self.number,
                   "jitter_buffer_ms": round(self.stats.jitter_buffer_s * 1000, 1)})
        if len(self.channels) == 1:
            self._spawn(self._report())  # one stats task per session, however many channels

    def send(self, message: dict) -> None:
        text = json.dumps(message)
        for channel in self.channels:
            if channel.readyState == "open":
                channel.send(text)

    async def _report(self) -> None:
        while True:
            await asyncio.sleep(STATS_EVERY_S)
            self.send({"type": "stats", "mode": self.conditioning.mode, **self.stats_json()})

    # --- the end ---------------------------------------------------------------------------------

    def _on_connection_state(self) -> None:
        state = self.pc.connectionState
        log.info("session #%d: connection %s", self.number, state)
        if state == "connected":
            self._connected_at = time.monotonic()
        elif state in ("failed", "closed"):
            self.close(f"connection {state}")

    def _fail(self, reason: str) -> None:
        reason = self.upstream.scrub(reason)
        log.warning("session #%d: %s", self.number, reason)
        self.metrics.sessions_failed.inc()
        self.send({"type": "error", "message": reason})
        self.close(reason)

    def close(self, reason: str) -> asyncio.Task:
        """End the session (idempotent): END on the gRPC stream, then the peer connection. -> the closing task."""
        if self._closing is None:
            self.end_reason = self.upstream.scrub(reason)
            self._closing = asyncio.get_running_loop().create_task(self._close())
        return self._closing

    async def _close(self) -> None:
        self.state = "ended"
        log.info("session #%d: ending (%s)", self.number, self.end_reason)
        stream = self._stream_task
        if stream is not None and not stream.done() and not self._server_failed and self.upstream.attempting:
            self.upstream.end()  # a hang-up (if START went out), then the stream closes
            try:
                await asyncio.wait_for(asyncio.shield(stream), END_TIMEOUT_S)
            except (asyncio.TimeoutError, Exception):
                log.warning("session #%d: no answer to END within %.0f s", self.number, END_TIMEOUT_S)
        self.video.stop()
        self.speech.stop()
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()
        await asyncio.gather(*(t for t in self._tasks if t is not current), return_exceptions=True)
        await self.pc.close()
        self.closed.set()
        if self.on_closed is not None:
            self.on_closed(self)

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task
