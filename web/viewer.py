"""A non-browser viewer of the edge (aiortc), following the signaling contract in the README: what a
voice agent's process would run to feed its speech in and take the avatar out, and what the tests and
the session benchmark use.

    async with Viewer("http://127.0.0.1:8080", audio="speech.wav") as v:
        await asyncio.sleep(10)
        v.control({"behaviour": "listening"})
    v.video  # [(arrival monotonic s, (H, W, 3) uint8)], v.audio: [(arrival, samples)], v.messages
"""

from __future__ import annotations

import asyncio
import json
import time

from flowact.contract import WEB_SDP_TYPE, WEB_SESSIONS_PATH


class SignalingError(RuntimeError):
    def __init__(self, status: int, message: str):
        super().__init__(f"{status}: {message}")
        self.status = status


class Viewer:
    def __init__(self, base: str, audio: str | None = None, query: str = "", keep_frames: bool = True,
                 token: str | None = None, channels: int = 1):
        self.base, self.audio_path, self.query, self.keep_frames = base.rstrip("/"), audio, query, keep_frames
        self.auth = {"Authorization": f"Bearer {token}"} if token else {}  # an edge with --token-file
        self.n_channels = channels  # data channels to open (the first carries control())
        self.video: list[tuple[float, object]] = []
        self.audio: list[tuple[float, int]] = []
        self.messages: list[dict] = []
        self.location: str | None = None
        self.answer_type: str | None = None
        self.t0 = 0.0

    async def connect(self) -> "Viewer":
        """Offer (audio sendrecv when given, video recvonly, a data channel) -> POST -> 201 answer + Location."""
        import aiohttp
        from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
        from aiortc.contrib.media import MediaPlayer

        self.pc = pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.player = MediaPlayer(self.audio_path, loop=True) if self.audio_path else None
        if self.player is not None:
            pc.addTrack(self.player.audio)
        pc.addTransceiver("video", direction="recvonly")
        self.channels = [pc.createDataChannel("control" if i == 0 else f"extra-{i}") for i in range(self.n_channels)]
        self.channel = self.channels[0]
        self.channel.on("message", lambda m: self.messages.append(json.loads(m)))
        pc.on("track", lambda track: asyncio.ensure_future(self._consume(track)))
        await pc.setLocalDescription(await pc.createOffer())
        self.t0 = time.monotonic()
        async with aiohttp.ClientSession() as http:
            async with http.post(self.base + WEB_SESSIONS_PATH + self.query, data=pc.localDescription.sdp,
                                 headers={**self.auth, "Content-Type": WEB_SDP_TYPE}) as r:
                body = await r.text()
                if r.status != 201:
                    await pc.close()
                    raise SignalingError(r.status, body.strip())
                self.location, self.answer_type = r.headers["Location"], r.content_type
        await pc.setRemoteDescription(RTCSessionDescription(body, "answer"))
        return self

    async def _consume(self, track) -> None:
        while True:
            try:
                frame = await track.recv()
            except Exception:  # MediaStreamError: the track ended
                return
            now = time.monotonic()
            if track.kind == "video":
                self.video.append((now, frame.to_ndarray(format="rgb24") if self.keep_frames else None))
            else:
                self.audio.append((now, frame.samples))

    def control(self, message: dict) -> None:
        self.channel.send(json.dumps(message))

    def stats(self) -> dict | None:
        """The edge's latest per-session numbers (data channel)."""
        return next((m for m in reversed(self.messages) if m.get("type") == "stats"), None)

    async def close(self, delete: bool = True) -> int | None:
        """DELETE the session (-> the status), or just close the peer connection."""
        status = None
        if delete and self.location:
            import aiohttp

            async with aiohttp.ClientSession() as http:
                async with http.delete(self.base + self.location) as r:
                    status = r.status
        await self.pc.close()
        if self.player is not None and self.player.audio is not None:
            self.player.audio.stop()
        return status

    async def __aenter__(self) -> "Viewer":
        return await self.connect()

    async def __aexit__(self, *exc) -> None:
        await self.close()
