"""flowact as a LiveKit Agents avatar (`pip install flowact-triton[livekit]`), in the shape of the framework's
own avatar plugins (livekit.agents.voice.avatar):

- `FlowActVideoGenerator`, the `VideoGenerator` an `AvatarRunner` drives: `push_audio` takes the agent's
  speech (rtc.AudioFrame at any rate; AudioSegmentEnd after each utterance), `clear_buffer` drops the
  speech not yet played (the avatar idles from the next chunk on), and iterating yields rtc.VideoFrame
  (RGB24, 25 fps), rtc.AudioFrame (the same speech, 16 kHz mono, re-timed to the video) and
  AudioSegmentEnd once an utterance's last sample has left;
- `run_avatar` / `python -m flowact.integrations.livekit`: the avatar participant: joins a room, receives
  the agent's speech with DataStreamAudioReceiver (which answers lk.clear_buffer and sends
  lk.playback_started / lk.playback_finished), and publishes the avatar's tracks through AvatarRunner;
- `AvatarSession`: what an agent developer adds to an AgentSession: it mints the avatar's token, starts
  the avatar participant in this process, and routes the session's speech to it (DataStreamAudioOutput).
"""

from __future__ import annotations

import argparse
import asyncio
import os

import numpy as np
from aiortc.mediastreams import MediaStreamError
from livekit import api, rtc
from livekit.agents.types import ATTRIBUTE_PUBLISH_ON_BEHALF
from livekit.agents.voice.avatar import (AudioSegmentEnd, AvatarOptions, AvatarRunner, DataStreamAudioOutput,
                                         DataStreamAudioReceiver, VideoGenerator)
from livekit.agents.voice.avatar import AvatarSession as BaseAvatarSession

from flowact.client.stream import FailoverPolicy
from flowact.contract import AGENT_JITTER_BUFFER_S, AGENT_SAMPLE_KEY, DEFAULT_URL, ENSEMBLE_MODEL
from flowact.integrations.avatar import AgentAvatar
from flowact.presets import FPS, SAMPLE_RATE
from flowact.web.tracks import AUDIO_FRAME

AVATAR_IDENTITY = "flowact-avatar"  # the participant the avatar joins a room as


class FlowActVideoGenerator(VideoGenerator):
    """A flowact stream as an AvatarRunner's video generator. `start()` opens it, `aclose()` ENDs it."""

    def __init__(self, avatar: AgentAvatar):
        self.avatar = avatar
        self.out: asyncio.Queue = asyncio.Queue()  # rtc.VideoFrame | rtc.AudioFrame | AudioSegmentEnd; None: the end
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        await self.avatar.start()
        self._tasks = [asyncio.create_task(self._video()), asyncio.create_task(self._speech())]

    async def push_audio(self, frame: rtc.AudioFrame | AudioSegmentEnd) -> None:
        if isinstance(frame, AudioSegmentEnd):
            self.avatar.end_segment()
        else:
            self.avatar.push_pcm(bytes(frame.data), frame.sample_rate, frame.num_channels)

    def clear_buffer(self) -> None:
        self.avatar.interrupt()

    def __aiter__(self):
        return self._frames()

    async def _frames(self):
        while (item := await self.out.get()) is not None:
            yield item

    async def _video(self) -> None:
        try:
            while True:
                frame = await self.avatar.video.recv()
                rgb = frame.to_ndarray(format="rgb24")  # (H, W, 3)
                self.out.put_nowait(rtc.VideoFrame(frame.width, frame.height, rtc.VideoBufferType.RGB24, rgb.tobytes()))
        except MediaStreamError:  # closed, or the server failed (avatar.error)
            self.out.put_nowait(None)

    async def _speech(self) -> None:
        try:
            while True:
                frame = await self.avatar.speech.recv()
                m = frame.pts // AUDIO_FRAME
                if self.avatar.carries_speech(m):  # the silence between utterances is not played out
                    pcm = frame.to_ndarray()  # (1, 320) int16
                    self.out.put_nowait(rtc.AudioFrame(pcm.tobytes(), SAMPLE_RATE, 1, AUDIO_FRAME,
                                                       userdata={AGENT_SAMPLE_KEY: frame.pts}))  # its place on the timeline
                if self.avatar.segment_ended(m):
                    self.out.put_nowait(AudioSegmentEnd())
        except MediaStreamError:
            pass

    async def aclose(self) -> None:
        await self.avatar.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.out.put_nowait(None)


def avatar_options(image: np.ndarray) -> AvatarOptions:
    height, width, _ = image.shape
    return AvatarOptions(video_width=width, video_height=height, video_fps=FPS, audio_sample_rate=SAMPLE_RATE,
                         audio_channels=1)


async def run_avatar(room: rtc.Room, flowact_url: str, image: np.ndarray, *, sender_identity: str | None = None,
                     jitter_buffer_s: float = AGENT_JITTER_BUFFER_S, model: str = ENSEMBLE_MODEL,
                     failover: FailoverPolicy | None = FailoverPolicy()) -> None:
    """Be the avatar in a connected room until the room or the flowact stream ends: the agent's speech
    in over data streams, the avatar's video and speech out as this participant's tracks."""
    generator = FlowActVideoGenerator(AgentAvatar(flowact_url, image, jitter_buffer_s=jitter_buffer_s, model=model,
                                                  failover=failover))
    await generator.start()
    runner = AvatarRunner(room, audio_recv=DataStreamAudioReceiver(room, sender_identity=sender_identity),
                          video_gen=generator, options=avatar_options(image))
    try:
        await runner.start()
        await runner.wait_for_complete()
    finally:
        await generator.aclose()
        await runner.aclose()
    if generator.avatar.error is not None:
        raise RuntimeError(generator.avatar.error)


async def join_as_avatar(livekit_url: str, token: str, flowact_url: str, image: np.ndarray, **kwargs) -> None:
    """The avatar participant's whole life: connect with `token`, run_avatar, disconnect."""
    room = rtc.Room()
    await room.connect(livekit_url, token)
    try:
        await run_avatar(room, flowact_url, image, **kwargs)
    finally:
        await room.disconnect()


def avatar_token(api_key: str, api_secret: str, room: str, agent_identity: str,
                 identity: str = AVATAR_IDENTITY) -> str:
    """A token for the avatar participant: joins `room`, publishes on behalf of the agent (as the
    framework's plugins' avatars do, so clients show its tracks as the agent's)."""
    return (api.AccessToken(api_key, api_secret).with_identity(identity).with_name("flowact avatar")
            .with_kind("agent").with_attributes({ATTRIBUTE_PUBLISH_ON_BEHALF: agent_identity})
            .with_grants(api.VideoGrants(room_join=True, room=room)).to_jwt())


class AvatarSession(BaseAvatarSession):
    """flowact as the avatar of an AgentSession: call `start(session, room)` before `session.start(...)`.
    The avatar participant runs in this process (a task); LIVEKIT_URL / LIVEKIT_API_KEY / LIVEKIT_API_SECRET
    as for the agent itself unless given."""

    def __init__(self, *, image: np.ndarray, flowact_url: str = DEFAULT_URL, identity: str = AVATAR_IDENTITY,
                 livekit_url: str | None = None, api_key: str | None = None, api_secret: str | None = None):
        super().__init__()
        self.image, self.flowact_url, self._identity = image, flowact_url, identity
        self.livekit_url = livekit_url or os.environ.get("LIVEKIT_URL")
        self.api_key = api_key or os.environ.get("LIVEKIT_API_KEY")
        self.api_secret = api_secret or os.environ.get("LIVEKIT_API_SECRET")
        self.task: asyncio.Task | None = None

    @property
    def avatar_identity(self) -> str:
        return self._identity

    @property
    def provider(self) -> str:
        return "flowact"

    async def start(self, agent_session, room: rtc.Room) -> None:
        missing = [name for name, value in (("LIVEKIT_URL", self.livekit_url), ("LIVEKIT_API_KEY", self.api_key),
                                            ("LIVEKIT_API_SECRET", self.api_secret)) if not value]
        if missing:
            raise ValueError(f"flowact AvatarSession: {', '.join(missing)} not set (arguments or environment)")
        if not room.isconnected():
            raise RuntimeError("flowact AvatarSession.start: the room is not connected; await ctx.connect() first "
                               "(the avatar publishes on behalf of the agent's participant)")
        await super().start(agent_session, room)
        token = avatar_token(self.api_key, self.api_secret, room.name, room.local_participant.identity, self._identity)
        self.task = asyncio.create_task(join_as_avatar(self.livekit_url, token, self.flowact_url, self.image,
                                                       sender_identity=room.local_participant.identity))
        agent_session.output.audio = DataStreamAudioOutput(room, destination_identity=self._identity,
                                                           wait_remote_track=rtc.TrackKind.KIND_VIDEO)

    async def aclose(self) -> None:
        await super().aclose()
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
            self.task = None


def main(argv: list[str] | None = None) -> None:
    """python -m flowact.integrations.livekit --token JWT --image ref.png [--flowact-url HOST:PORT] [--preset tiny]"""
    from flowact.media import load_image
    from flowact.presets import get_preset

    p = argparse.ArgumentParser(prog="python -m flowact.integrations.livekit",
                                description="join a LiveKit room as the flowact avatar of the agent in it")
    p.add_argument("--livekit-url", default=os.environ.get("LIVEKIT_URL"), help="default: $LIVEKIT_URL")
    p.add_argument("--token", required=True, help="the avatar participant's access token (avatar_token())")
    p.add_argument("--flowact-url", default=DEFAULT_URL)
    p.add_argument("--image", required=True, help="the reference image")
    p.add_argument("--preset", default="cpu", help="the server's preset (its frame size)")
    p.add_argument("--agent-identity", default=None, help="take speech only from this participant")
    args = p.parse_args(argv)
    if not args.livekit_url:
        p.error("--livekit-url (or LIVEKIT_URL) is required")
    preset = get_preset(args.preset)
    image = load_image(args.image, preset.height, preset.width)
    asyncio.run(join_as_avatar(args.livekit_url, args.token, args.flowact_url, image, sender_identity=args.agent_identity))


if __name__ == "__main__":
    main()
