"""The LiveKit Agents avatar against a real tiny server, with the SDK's real rtc frame types (its native
library runs without a LiveKit server; no LiveKit server can run here).

Tested: FlowActVideoGenerator's frames (rate, size, RGB24; taken by the native AVSynchronizer), the speech re-timed and as long as it went in,
AudioSegmentEnd after an utterance's last sample, clear_buffer (no speech after the next chunk, idle);
AvatarRunner's audio side wired to it (QueueAudioOutput as the receiver: speech, segment end and
clear_buffer reach the generator, the interruption is reported as interrupted playback); the avatar's
token. Untested (need a LiveKit server): room.connect, publishing the tracks into a room, DataStreamAudioReceiver's byte streams and RPCs (lk.clear_buffer,
lk.playback_started, lk.playback_finished) between two participants, AvatarSession.start in a
connected room (its refusals without credentials or a connection are tested)."""

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("livekit.agents", reason="the livekit extra (livekit-agents) is not installed")

from livekit import api, rtc  # noqa: E402
from livekit.agents.types import ATTRIBUTE_PUBLISH_ON_BEHALF  # noqa: E402
from livekit.agents.voice.avatar import AudioSegmentEnd, AvatarRunner, QueueAudioOutput  # noqa: E402

from conftest import ref_image, start_server, url  # noqa: E402
from flowact.contract import AGENT_SAMPLE_KEY  # noqa: E402
from flowact.integrations.avatar import AgentAvatar  # noqa: E402
from flowact.integrations.livekit import FlowActVideoGenerator, avatar_options, avatar_token  # noqa: E402
from flowact.media import load_audio, resample  # noqa: E402
from flowact.presets import CHUNK_SECONDS, FPS, SAMPLE_RATE, SAMPLES_PER_CHUNK, get_preset  # noqa: E402

SAMPLES = Path(__file__).resolve().parents[1] / "flowact" / "samples"
AGENT_RATE = 48_000  # what an AgentSession's TTS output usually carries
AGENT_FRAME = AGENT_RATE // 100  # 10 ms


def agent_frames(speech: np.ndarray) -> list[rtc.AudioFrame]:
    pcm = (np.clip(resample(speech, SAMPLE_RATE, AGENT_RATE), -1, 1) * 32767).astype(np.int16)
    pcm = pcm[: len(pcm) // AGENT_FRAME * AGENT_FRAME]
    return [rtc.AudioFrame(pcm[i:i + AGENT_FRAME].tobytes(), AGENT_RATE, 1, AGENT_FRAME)
            for i in range(0, len(pcm), AGENT_FRAME)]


@pytest.fixture(scope="module")
def server(tmp_path_factory, onnx_dir):
    srv = start_server(tmp_path_factory.mktemp("livekit"), onnx_dir, capacity=2)
    yield srv
    srv.stop()


def test_video_generator(server):
    tiny = get_preset("tiny")
    speech = load_audio(SAMPLES / "speech.wav")[: 3 * SAMPLE_RATE]  # (48000,) float32
    generator = FlowActVideoGenerator(AgentAvatar(url(server), ref_image(tiny), seed=1))
    out: list[tuple[float, object]] = []
    marks = {}

    async def consume():
        async for item in generator:
            out.append((time.monotonic(), item))

    async def main():
        await generator.start()
        reader = asyncio.create_task(consume())
        await asyncio.sleep(0.5)
        for frame in agent_frames(speech):  # faster than real time, as TTS output comes
            await generator.push_audio(frame)
        await generator.push_audio(AudioSegmentEnd())
        await asyncio.sleep(3 + 1.5)
        marks["second"] = time.monotonic()
        for frame in agent_frames(speech):
            await generator.push_audio(frame)
        await asyncio.sleep(1.0)
        marks["clear"] = time.monotonic()
        generator.clear_buffer()
        marks["cut"] = generator.avatar.quiet_from
        await asyncio.sleep(1.5)
        await generator.aclose()
        await reader

    asyncio.run(main())
    avatar = generator.avatar
    assert avatar.error is None
    video = [(t, f) for t, f in out if isinstance(f, rtc.VideoFrame)]
    span = video[-1][0] - video[0][0]
    assert span >= 6 and (len(video) - 1) / span >= 24.0, (len(video), span)
    assert all(f.width == tiny.width and f.height == tiny.height and f.type == rtc.VideoBufferType.RGB24
               for _, f in video)
    origin = avatar.playout.origin
    assert max(abs(t - (origin + n / FPS)) for n, (t, _) in enumerate(video)) < 2 / FPS  # the event loop's jitter

    first = [(t, f) for t, f in out if t < marks["second"]]
    audio = [f for _, f in first if isinstance(f, rtc.AudioFrame)]
    assert all(f.sample_rate == SAMPLE_RATE and f.num_channels == 1 for f in audio)
    out_s = sum(f.samples_per_channel for f in audio) / SAMPLE_RATE
    assert abs(out_s - len(speech) / SAMPLE_RATE) <= 0.04, out_s
    ends = [i for i, (_, f) in enumerate(first) if isinstance(f, AudioSegmentEnd)]
    last_audio = max(i for i, (_, f) in enumerate(first) if isinstance(f, rtc.AudioFrame))
    assert len(ends) == 1 and ends[0] > last_audio  # after the utterance's last sample, once
    # the speech leaves with its frames: a speech frame starting at frame n's time leaves within one frame of it
    offsets = [t - video[f.userdata[AGENT_SAMPLE_KEY] * FPS // SAMPLE_RATE][0] for t, f in out
               if isinstance(f, rtc.AudioFrame) and f.userdata[AGENT_SAMPLE_KEY] * FPS % SAMPLE_RATE == 0]
    assert len(offsets) > 50 and max(abs(o) for o in offsets) < 1 / FPS, max(offsets, key=abs)

    cut = (marks["cut"] // SAMPLES_PER_CHUNK + 1) * SAMPLES_PER_CHUNK  # the chunk after the interruption's
    assert (cut - marks["cut"]) / SAMPLE_RATE <= CHUNK_SECONDS
    assert [t for t, f in out if isinstance(f, rtc.AudioFrame) and marks["second"] < t < marks["clear"]]
    assert not [t for t, f in out if isinstance(f, rtc.AudioFrame) and t > marks["clear"] + 0.04]  # silent at once
    after = [b for k, b in avatar.stats.behaviours.items() if k * SAMPLES_PER_CHUNK >= cut]
    assert after and set(after) == {"idle"}


def test_runner_wiring(server):
    """AvatarRunner's audio side as a worker runs it: speech, segment end and clear_buffer from the agent's
    audio output reach the generator. The room is never connected (no LiveKit server here), so the runner
    stops at publishing its tracks."""
    tiny = get_preset("tiny")
    speech = load_audio(SAMPLES / "speech.wav")[:SAMPLE_RATE]  # 1 s
    image = ref_image(tiny)
    generator = FlowActVideoGenerator(AgentAvatar(url(server), image, seed=1))
    finished = []

    async def main():
        agent_audio = QueueAudioOutput(sample_rate=AGENT_RATE)
        agent_audio.on("playback_finished", finished.append)
        await generator.start()
        runner = AvatarRunner(rtc.Room(), audio_recv=agent_audio, video_gen=generator, options=avatar_options(image))
        await runner.start()
        for frame in agent_frames(speech):
            await agent_audio.capture_frame(frame)
        agent_audio.flush()
        await asyncio.sleep(0.5)
        spans = list(generator.avatar.speech_spans)
        ends = list(generator.avatar.segment_ends)
        agent_audio.clear_buffer()
        await asyncio.sleep(0.2)
        await generator.aclose()
        await runner.aclose()
        return spans, ends

    spans, ends = asyncio.run(main())
    assert spans and sum(e - s for s, e in spans) <= len(speech)  # the speech is on the avatar's timeline
    assert len(ends) == 1
    assert generator.avatar.quiet_from is not None and generator.avatar.pending_samples == 0  # cleared
    assert finished and finished[0].interrupted


def test_frames_through_av_synchronizer(server):
    """The generator's frames through the SDK's native AVSynchronizer into real audio and video sources (what
    AvatarRunner does before the room's tracks): taken, and paced at real time."""
    tiny = get_preset("tiny")
    generator = FlowActVideoGenerator(AgentAvatar(url(server), ref_image(tiny), seed=3))
    pushed = {"video": 0, "audio": 0}

    async def main():
        sync = rtc.AVSynchronizer(audio_source=rtc.AudioSource(SAMPLE_RATE, 1, queue_size_ms=100),
                                  video_source=rtc.VideoSource(tiny.width, tiny.height), video_fps=FPS,
                                  video_queue_size_ms=100)
        await generator.start()
        for frame in agent_frames(load_audio(SAMPLES / "speech.wav")[:SAMPLE_RATE]):
            await generator.push_audio(frame)
        await generator.push_audio(AudioSegmentEnd())
        started = None
        async for item in generator:
            if isinstance(item, AudioSegmentEnd):
                continue
            started = started or time.monotonic()
            await sync.push(item)
            pushed["video" if isinstance(item, rtc.VideoFrame) else "audio"] += 1
            if pushed["video"] == 3 * FPS:
                break
        elapsed = time.monotonic() - started
        await generator.aclose()
        await sync.aclose()
        return elapsed

    elapsed = asyncio.run(main())
    assert 2.8 < elapsed < 3.3, elapsed  # 75 frames at 25 fps
    assert 49 <= pushed["audio"] <= 51  # the 1 s of speech: 50 frames of 20 ms


def test_avatar_session_refuses_what_cannot_work(monkeypatch):
    """AvatarSession.start names what is missing: LiveKit credentials, a connected room."""
    from livekit.agents import AgentSession

    from flowact.integrations.livekit import AvatarSession

    for name in ("LIVEKIT_URL", "LIVEKIT_API_KEY", "LIVEKIT_API_SECRET"):
        monkeypatch.delenv(name, raising=False)
    image = ref_image(get_preset("tiny"))

    async def main():
        with pytest.raises(ValueError, match="LIVEKIT_URL, LIVEKIT_API_KEY, LIVEKIT_API_SECRET not set"):
            await AvatarSession(image=image).start(AgentSession(), rtc.Room())
        session = AvatarSession(image=image, livekit_url="ws://127.0.0.1:7880", api_key="devkey", api_secret="s" * 32)
        with pytest.raises(RuntimeError, match="the room is not connected"):
            await session.start(AgentSession(), rtc.Room())

    asyncio.run(main())


def test_avatar_token():
    token = avatar_token("devkey", "a-secret-of-at-least-32-characters!", "room-1", "agent-1")
    claims = api.TokenVerifier("devkey", "a-secret-of-at-least-32-characters!").verify(token)
    assert claims.identity == "flowact-avatar" and claims.video.room == "room-1" and claims.video.room_join
    assert claims.attributes[ATTRIBUTE_PUBLISH_ON_BEHALF] == "agent-1" and claims.kind == "agent"


def test_server_gone_ends_the_generator():
    """No flowact server at the address (and failover off: with it the avatar would retry for 30 s): the
    generator's frames end and the avatar names the cause."""
    from flowact.serving.processes import free_ports

    (port,) = free_ports(1)
    generator = FlowActVideoGenerator(AgentAvatar(f"127.0.0.1:{port}", ref_image(get_preset("tiny")), failover=None))

    async def main():
        await generator.start()
        items = [item async for item in generator]  # ends without a frame
        await generator.aclose()
        return items

    assert asyncio.run(asyncio.wait_for(main(), 10)) == []
    error = generator.avatar.error
    assert error.startswith(f"flowact server 127.0.0.1:{port}: connection to the server lost at chunk 0: ") and \
        "failover is off" in error, error
