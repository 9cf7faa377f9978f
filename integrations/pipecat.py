"""flowact as a Pipecat avatar service (`pip install flowact-triton[pipecat]`).

`FlowActVideoService` sits where Pipecat's own avatar services sit (after the TTS, before the output
transport), in their shape (SimliVideoService, TavusVideoService): it takes the bot's speech
(`TTSAudioRawFrame` at any rate), streams it to a flowact server in 0.48 s chunks, and pushes
`OutputImageRawFrame`s at 25 fps together with the same speech (`TTSAudioRawFrame`, 16 kHz mono)
re-timed to the video, so lips and sound leave together. Silence keeps the avatar alive and idle.
`TTSStoppedFrame` ends an utterance (idle once it has played), `InterruptionFrame` drops the speech
not yet played (idle from the next chunk on). `StartFrame` opens the gRPC stream, `EndFrame` and
`CancelFrame` END it. Metrics (with `enable_metrics`): TTFB = StartFrame -> first frame out (time to
first frame); processing time = a chunk's speech complete -> its first frame out (mouth latency).
"""

from __future__ import annotations

import asyncio

import numpy as np
from aiortc.mediastreams import MediaStreamError
from pipecat.frames.frames import (CancelFrame, EndFrame, Frame, InterruptionFrame, MetricsFrame, OutputImageRawFrame,
                                   StartFrame, TTSAudioRawFrame, TTSStoppedFrame)
from pipecat.metrics.metrics import ProcessingMetricsData
from pipecat.processors.frame_processor import FrameDirection
from pipecat.services.ai_service import AIService
from pipecat.services.settings import ServiceSettings

from flowact.client.stream import FailoverPolicy
from flowact.contract import AGENT_JITTER_BUFFER_S, AGENT_SAMPLE_KEY, ENSEMBLE_MODEL
from flowact.integrations.avatar import AgentAvatar
from flowact.presets import FPS, SAMPLE_RATE
from flowact.web.tracks import AUDIO_FRAME, VIDEO_CLOCK

FRAME_KEY = "flowact_frame"  # an OutputImageRawFrame's metadata: frame n of the stream (plays at origin + n / 25)


class FlowActVideoService(AIService):
    """The avatar of a Pipecat bot, served by your own flowact (Triton) server at `url`.

    `image`: the reference image, (H, W, 3) uint8 of the server's preset size
    (`flowact.media.load_image(path, H, W)`)."""

    def __init__(self, *, url: str, image: np.ndarray, jitter_buffer_s: float = AGENT_JITTER_BUFFER_S,
                 seed: int | None = None, model: str = ENSEMBLE_MODEL, failover: FailoverPolicy | None = FailoverPolicy(),
                 **kwargs):
        super().__init__(settings=ServiceSettings(model=None), **kwargs)
        self._options = dict(url=url, image=image, jitter_buffer_s=jitter_buffer_s, seed=seed, model=model,
                             failover=failover)
        self.avatar: AgentAvatar | None = None  # one per StartFrame
        self._tasks: list[asyncio.Task] = []

    def can_generate_metrics(self) -> bool:
        return True

    async def start(self, frame: StartFrame):
        await super().start(frame)
        self.avatar = AgentAvatar(**self._options)
        await self.start_ttfb_metrics()
        await self.avatar.start()
        self._tasks = [self.create_task(self._push_video()), self.create_task(self._push_speech())]

    async def stop(self, frame: EndFrame):
        await super().stop(frame)
        await self._close()

    async def cancel(self, frame: CancelFrame):
        await super().cancel(frame)
        await self._close()

    async def cleanup(self):
        await super().cleanup()
        await self._close()

    async def _close(self) -> None:
        """END the stream and stop the output (idempotent)."""
        avatar, self.avatar = self.avatar, None
        if avatar is not None:
            await avatar.close()
        for task in self._tasks:
            await self.cancel_task(task)
        self._tasks = []

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, TTSAudioRawFrame) and self.avatar is not None:
            self.avatar.push_pcm(frame.audio, frame.sample_rate, frame.num_channels)
            return  # the speech leaves re-timed, with its frames
        if isinstance(frame, TTSStoppedFrame) and self.avatar is not None:
            self.avatar.end_segment()
        elif isinstance(frame, InterruptionFrame) and self.avatar is not None:
            self.avatar.interrupt()
        await self.push_frame(frame, direction)

    async def _push_video(self) -> None:
        avatar = self.avatar
        reported = 0
        try:
            while True:
                frame = await avatar.video.recv()
                if avatar.stats.frames_out == 1:
                    await self.stop_ttfb_metrics()
                image = OutputImageRawFrame(image=frame.to_ndarray(format="rgb24").tobytes(),  # (H, W, 3)
                                            size=(frame.width, frame.height), format="RGB")
                image.metadata[FRAME_KEY] = frame.pts * FPS // VIDEO_CLOCK  # n: frame n plays at origin + n / 25
                await self.push_frame(image)
                latencies = avatar.stats.mouth_latency_s
                if len(latencies) > reported and self.metrics_enabled:
                    await self.push_frame(MetricsFrame(data=[ProcessingMetricsData(processor=self.name, value=v)
                                                             for v in latencies[reported:]]))
                reported = len(latencies)
        except MediaStreamError:  # the avatar closed, or its server failed
            if avatar.error is not None:
                await self.push_error(error_msg=avatar.error)

    async def _push_speech(self) -> None:
        avatar = self.avatar
        try:
            while True:
                frame = await avatar.speech.recv()
                if avatar.carries_speech(frame.pts // AUDIO_FRAME):  # the silence between utterances stays out, as in SimliVideoService
                    pcm = frame.to_ndarray()  # (1, 320) int16
                    speech = TTSAudioRawFrame(audio=pcm.tobytes(), sample_rate=SAMPLE_RATE, num_channels=1)
                    speech.metadata[AGENT_SAMPLE_KEY] = frame.pts  # its first sample's place on the video's timeline
                    await self.push_frame(speech)
        except MediaStreamError:
            pass
