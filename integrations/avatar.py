"""A voice agent's avatar, framework-free: the agent's speech in, frames and re-timed speech out.

The agent's TTS pushes 16 kHz mono speech whenever it has some (usually faster than real time). A
clock (every TICK_S) moves that speech onto the stream's timeline at real time, silence where
none is pending, so the avatar stays alive between utterances and an interruption drops only what
is not yet on the timeline. The edge's pieces do the rest: `ChunkAssembler` cuts the timeline into
0.48 s chunks, `Conditioning` picks each chunk's behaviour (speaking while the voice is active), and
the playout clock (`Playout`, `AvatarVideoTrack`, `SpeechTrack`) plays frame n at origin + n / 25 and
the same speech at the same times. Here a finished or interrupted utterance also turns the avatar
idle from the next chunk on, instead of after the edge's silent chunks, and an interruption silences
the speech not yet played at once.

The gRPC side is the edge's (flowact.client.live.LiveStream): START with chunk 0 (image, seed), END on
close, and failover: when the replica goes away the avatar goes on from its latest snapshot on whichever
replica the address reaches (a gateway); what failover cannot replace ends the avatar with `error` set.
The avatar knows nothing about Pipecat or LiveKit: the integrations read `video.recv()` and
`speech.recv()` and translate.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import deque
from dataclasses import dataclass, field

import av
import numpy as np

from flowact.client.live import LiveStream
from flowact.client.stream import FailoverPolicy, StreamError
from flowact.contract import AGENT_JITTER_BUFFER_S, ENSEMBLE_MODEL, MAX_SEED
from flowact.presets import CHUNK_SECONDS, FRAMES_PER_CHUNK, SAMPLE_RATE, SAMPLES_PER_CHUNK
from flowact.web.timeline import Chunk, ChunkAssembler, Conditioning
from flowact.web.tracks import AUDIO_FRAME, AvatarVideoTrack, Playout, SpeechTrack

log = logging.getLogger("flowact.integrations")
TICK_S = 0.02  # how often the speech clock moves the agent's pending speech onto the timeline
END_TIMEOUT_S = 5.0  # wait this long for the server's answer to END


@dataclass
class AvatarStats:
    started_at: float  # start() (monotonic s)
    ttff_s: float | None = None  # start() -> the first frame leaves
    audio_delay_s: float | None = None  # what the speech is delayed by to meet its frames
    mouth_latency_s: list[float] = field(default_factory=list)  # per chunk: its audio complete -> its first frame leaves
    frames_out: int = 0
    frames_late: int = 0  # not there when due (the previous frame repeated)
    behaviours: dict[int, str | None] = field(default_factory=dict)  # chunk -> the behaviour it was sent with


class SpeechResampler:
    """int16 speech at any rate and channel count -> 16 kHz mono float32 (libswresample, state kept across
    frames; a new rate or layout starts a new one after flushing the old)."""

    def __init__(self):
        self._resampler: av.AudioResampler | None = None
        self._format: tuple[int, int] | None = None  # (rate, channels) it was made for

    def resample(self, pcm: bytes, rate: int, channels: int) -> list[np.ndarray]:
        if channels not in (1, 2):
            raise ValueError(f"speech with {channels} channels: mono or stereo expected")
        out = self.flush() if self._format not in (None, (rate, channels)) else []
        if self._resampler is None:
            self._resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
            self._format = (rate, channels)
        frame = av.AudioFrame.from_ndarray(np.frombuffer(pcm, dtype=np.int16)[None],  # (1, n * channels), interleaved
                                           format="s16", layout="mono" if channels == 1 else "stereo")
        frame.sample_rate = rate
        return out + [f.to_ndarray().reshape(-1) for f in self._resampler.resample(frame)]  # (n,) float32 each

    def flush(self) -> list[np.ndarray]:
        """The filter's delayed tail (the utterance ended)."""
        out = [f.to_ndarray().reshape(-1) for f in self._resampler.resample(None)] if self._resampler else []
        self.reset()
        return out

    def reset(self) -> None:
        self._resampler, self._format = None, None


class AgentAvatar:
    """One avatar stream. `push_pcm` (or `push_speech`), `end_segment`, `interrupt` from the agent's side; `video.recv()`
    (av.VideoFrame, 25 fps) and `speech.recv()` (av.AudioFrame, 20 ms, 16 kHz s16) on the output side."""

    def __init__(self, url: str, image: np.ndarray, jitter_buffer_s: float = AGENT_JITTER_BUFFER_S,
                 seed: int | None = None, model: str = ENSEMBLE_MODEL, failover: FailoverPolicy | None = FailoverPolicy()):
        self.url, self.image, self.model = url, image, model  # image: (H, W, 3) uint8
        self.jitter_buffer_s = jitter_buffer_s
        self.seed = secrets.randbelow(MAX_SEED + 1) if seed is None else seed
        self.failover = failover  # None: a lost server ends the avatar
        self.assembler = ChunkAssembler()
        self.conditioning = Conditioning()
        self.resampler = SpeechResampler()
        self.pending: deque[np.ndarray] = deque()  # (n,) float32 speech not yet on the timeline
        self.pending_samples = 0
        self.quiet_from: int | None = None  # timeline sample from which chunks are idle (utterance over)
        self.segment_ends: deque[int] = deque()  # timeline samples where an utterance ends (for segment_ended)
        self.speech_spans: deque[list[int]] = deque()  # [first, end) timeline samples of the agent's speech, not yet played
        self.chunk0_complete: float | None = None
        self.complete_at: dict[int, float] = {}  # chunk -> when its audio was complete, until its first frame leaves
        self.error: str | None = None
        self.stats: AvatarStats | None = None

    async def start(self) -> None:
        """Open the gRPC stream and start the clock (chunk 0 goes out 0.48 s from now)."""
        self.stats = AvatarStats(time.monotonic())
        self.playout = Playout()
        self.video = AvatarVideoTrack(self.playout, self._on_frame_sent)
        self.speech = SpeechTrack(self.playout, lambda m: None)
        self.upstream = LiveStream(self.url, self.image, self._on_frames, model=self.model, seed=self.seed,
                                   failover=self.failover, name="the avatar's stream")
        self.assembler.start(time.monotonic())
        self._stream = asyncio.create_task(self._run_stream())
        self._clock = asyncio.create_task(self._tick())

    # --- the agent's side --------------------------------------------------------------------------

    def push_speech(self, samples: np.ndarray) -> None:
        """(n,) float32 16 kHz mono speech, played after whatever is pending."""
        self.pending.append(np.asarray(samples, dtype=np.float32).reshape(-1))
        self.pending_samples += len(self.pending[-1])
        self.quiet_from = None
        if self.conditioning.behaviour == "idle":
            self.conditioning.apply({"behaviour": "auto"})

    def push_pcm(self, pcm: bytes, rate: int, channels: int) -> None:
        """int16 interleaved speech at any rate (what TTS engines and LiveKit frames carry)."""
        for samples in self.resampler.resample(pcm, rate, channels):
            self.push_speech(samples)

    def end_segment(self) -> None:
        """The utterance pushed so far is complete: the avatar turns idle once it has played."""
        for samples in self.resampler.flush():
            self.push_speech(samples)
        end = self.assembler.written + self.pending_samples
        self.segment_ends.append(end)
        self.quiet_from = end

    def interrupt(self) -> None:
        """Barge-in: the speech not yet played goes silent at once (its frames that were already made
        still play, at most a chunk plus the buffer), the speech not yet on the timeline is dropped, and the
        next chunk is idle."""
        self.resampler.reset()
        self.pending.clear()
        self.pending_samples = 0
        self.segment_ends.clear()
        self.quiet_from = self.assembler.written
        self.conditioning.apply({"behaviour": "idle"})
        played = self.speech.next_index * AUDIO_FRAME  # the first sample not yet out
        while self.speech_spans and self.speech_spans[-1][0] >= played:
            self.speech_spans.pop()
        if self.speech_spans:
            self.speech_spans[-1][1] = min(self.speech_spans[-1][1], played)

    def carries_speech(self, m: int) -> bool:
        """Does the 20 ms output frame m hold the agent's speech (not the silence around it)? Frames ask in order."""
        first, end = m * AUDIO_FRAME, (m + 1) * AUDIO_FRAME
        while self.speech_spans and self.speech_spans[0][1] <= first:
            self.speech_spans.popleft()
        return bool(self.speech_spans) and self.speech_spans[0][0] < end

    def segment_ended(self, m: int) -> bool:
        """After the 20 ms output frame m: has an utterance's last sample left? (once per utterance)"""
        if self.segment_ends and (m + 1) * AUDIO_FRAME >= self.segment_ends[0]:
            self.segment_ends.popleft()
            return True
        return False

    # --- the timeline --------------------------------------------------------------------------------

    async def _tick(self) -> None:
        while True:
            now = time.monotonic()
            due = int((now - self.assembler.origin) * SAMPLE_RATE) - self.assembler.written
            if due > 0:
                self._make(self.assembler.push(self._take(due), now))
            await asyncio.sleep(TICK_S)

    def _take(self, n: int) -> np.ndarray:
        """n samples off the pending speech, zero-padded where it runs out."""
        out = np.zeros(n, dtype=np.float32)
        at = 0
        while at < n and self.pending:
            head = self.pending[0]
            take = min(n - at, len(head))
            out[at:at + take] = head[:take]
            at += take
            if take == len(head):
                self.pending.popleft()
            else:
                self.pending[0] = head[take:]
        self.pending_samples -= at
        if at:
            first = self.assembler.written
            if self.speech_spans and self.speech_spans[-1][1] == first:
                self.speech_spans[-1][1] = first + at
            else:
                self.speech_spans.append([first, first + at])
        return out

    def _make(self, chunks: list[Chunk]) -> None:
        for chunk in chunks:
            behaviour, prompt = self.conditioning.next(chunk)
            if self.quiet_from is not None and chunk.index * SAMPLES_PER_CHUNK >= self.quiet_from:
                behaviour, prompt = "idle", None
            self.stats.behaviours[chunk.index] = behaviour
            if chunk.index == 0:
                self.chunk0_complete = chunk.complete_at
            self.complete_at[chunk.index] = chunk.complete_at
            self.speech.put_chunk(chunk.index, chunk.audio)
            self.upstream.put(chunk.index, chunk.audio, behaviour, prompt)

    # --- the gRPC stream -----------------------------------------------------------------------------

    async def _run_stream(self) -> None:
        try:
            await self.upstream.run()
        except StreamError as e:  # refused, or gone and not replaced (failover off or out of attempts)
            self.error = f"flowact server {self.url}: {str(e).splitlines()[0][:300]}"
            log.error("avatar: %s", self.error)
            self._stop_output()

    def _on_frames(self, k: int, frames: np.ndarray, now: float) -> None:
        if k == 0:
            origin = max(self.chunk0_complete + self.jitter_buffer_s, now)
            self.playout.begin(origin)
            self.stats.audio_delay_s = origin - (self.chunk0_complete - CHUNK_SECONDS)
        self.video.put_chunk(k, frames)

    def _on_frame_sent(self, n: int, present: bool) -> None:
        now = time.monotonic()
        self.stats.frames_out += 1
        self.stats.frames_late += not present
        if self.stats.ttff_s is None:
            self.stats.ttff_s = now - self.stats.started_at
        complete = self.complete_at.pop(n // FRAMES_PER_CHUNK, None) if present else None
        for stale in [i for i in self.complete_at if i < n // FRAMES_PER_CHUNK]:  # none of their frames made it
            del self.complete_at[stale]
        if complete is not None:
            self.stats.mouth_latency_s.append(now - complete)

    # --- the end ---------------------------------------------------------------------------------------

    async def close(self) -> None:
        """END the stream (waiting up to END_TIMEOUT_S for its answer), stop the clock and the tracks."""
        self._clock.cancel()
        self.upstream.end()  # a hang-up, after the chunks made so far
        try:
            await asyncio.wait_for(asyncio.shield(self._stream), END_TIMEOUT_S)
        except asyncio.TimeoutError:
            log.warning("avatar: no answer to END within %.0f s", END_TIMEOUT_S)
            self._stream.cancel()
        await asyncio.gather(self._clock, self._stream, return_exceptions=True)
        self._stop_output()

    def _stop_output(self) -> None:
        """Stop both tracks; their readers get MediaStreamError (also when chunk 0 never came: the clock is
        started so that nobody waits for it)."""
        self.video.stop()
        self.speech.stop()
        self.playout.begin(time.monotonic())
