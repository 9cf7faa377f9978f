"""The outgoing tracks of a session and the playout clock they share.

Frame n leaves at `origin + n / 25` and the 20 ms audio frame m (samples [320 m, 320 m + 320) of the
same timeline, the speech of frames 12 k .. 12 k + 11 lying in chunk k) at `origin + m * 0.02`: one
clock for both, so lips and sound leave together and aiortc's RTCP sender reports (wall clock <->
RTP time, taken as each packet leaves) let the browser keep them together. A frame not there when
due is replaced by the previous one (counted late); the clock never waits, so the speech never
shifts against the lips.
"""

from __future__ import annotations

import asyncio
import fractions
import time
from typing import Callable

import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av import AudioFrame, VideoFrame

from flowact.presets import FPS, FRAMES_PER_CHUNK, SAMPLE_RATE, SAMPLES_PER_CHUNK

VIDEO_CLOCK = 90_000  # RTP video clock rate
AUDIO_FRAME = SAMPLE_RATE // 50  # 20 ms, 320 samples
AUDIO_FRAMES_PER_CHUNK = SAMPLES_PER_CHUNK // AUDIO_FRAME  # 24


class Playout:
    """When the session's output timeline starts; set once, when chunk 0's frames can play."""

    def __init__(self):
        self._origin: asyncio.Future = asyncio.get_running_loop().create_future()

    def begin(self, origin: float) -> None:
        if not self._origin.done():
            self._origin.set_result(origin)

    @property
    def started(self) -> bool:
        return self._origin.done()

    @property
    def origin(self) -> float | None:
        return self._origin.result() if self._origin.done() else None

    async def wait(self, offset_s: float) -> float:
        """Sleep until origin + offset_s; -> that time."""
        due = await asyncio.shield(self._origin) + offset_s
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        return due


class AvatarVideoTrack(MediaStreamTrack):
    """The generated frames at 25 fps. `on_sent(n, frame_present)` is told about every frame leaving."""

    kind = "video"

    def __init__(self, playout: Playout, on_sent: Callable[[int, bool], None]):
        super().__init__()
        self.playout, self.on_sent = playout, on_sent
        self.frames: dict[int, np.ndarray] = {}  # frame index -> (H, W, 3) uint8, waiting for its time
        self.next_index = 0
        self.last: np.ndarray | None = None

    def put_chunk(self, k: int, frames: np.ndarray) -> None:
        """Chunk k's (12, H, W, 3) frames; those whose time has passed are dropped."""
        for i, rgb in enumerate(frames):
            n = k * FRAMES_PER_CHUNK + i
            if n >= self.next_index:
                self.frames[n] = rgb

    async def recv(self) -> VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        n = self.next_index
        await self.playout.wait(n / FPS)
        if self.readyState != "live":
            raise MediaStreamError
        self.next_index = n + 1
        rgb = self.frames.pop(n, None)
        present = rgb is not None
        if present:
            self.last = rgb
        else:
            rgb = self.last
            if rgb is None:  # chunk 0 always arrives before the origin: only a stopped session gets here
                raise MediaStreamError
        frame = VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        frame.pts, frame.time_base = n * VIDEO_CLOCK // FPS, fractions.Fraction(1, VIDEO_CLOCK)
        self.on_sent(n, present)
        return frame


class SpeechTrack(MediaStreamTrack):
    """The speech the model heard (16 kHz mono, the chunks as sent), on the video's clock.
    `on_sent(m)` is told about every 20 ms frame leaving."""

    kind = "audio"

    def __init__(self, playout: Playout, on_sent: Callable[[int], None]):
        super().__init__()
        self.playout, self.on_sent = playout, on_sent
        self.chunks: dict[int, np.ndarray] = {}  # chunk index -> (7680,) int16
        self.next_index = 0

    def put_chunk(self, k: int, audio: np.ndarray) -> None:
        if (k + 1) * AUDIO_FRAMES_PER_CHUNK > self.next_index:
            self.chunks[k] = (np.clip(audio, -1.0, 1.0) * 32767).astype(np.int16)

    async def recv(self) -> AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        m = self.next_index
        await self.playout.wait(m * AUDIO_FRAME / SAMPLE_RATE)
        if self.readyState != "live":
            raise MediaStreamError
        self.next_index = m + 1
        k, j = divmod(m, AUDIO_FRAMES_PER_CHUNK)
        chunk = self.chunks.get(k)
        if chunk is None:  # not there (cannot happen while the jitter buffer exceeds the input slack): silence
            pcm = np.zeros(AUDIO_FRAME, dtype=np.int16)
        else:
            pcm = chunk[j * AUDIO_FRAME:(j + 1) * AUDIO_FRAME]
            if j == AUDIO_FRAMES_PER_CHUNK - 1:
                del self.chunks[k]
        frame = AudioFrame.from_ndarray(pcm[None], format="s16", layout="mono")  # (1, 320)
        frame.sample_rate, frame.pts, frame.time_base = SAMPLE_RATE, m * AUDIO_FRAME, fractions.Fraction(1, SAMPLE_RATE)
        self.on_sent(m)
        return frame
