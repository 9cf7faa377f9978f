"""FlowActVideoService in a real Pipecat pipeline (speech source -> service -> sink) against a real tiny
server: 25 fps of the preset's frames while idle, speaking and interrupted, the speech out as long as
the speech in and on the video's clock, the interruption idle within one chunk, END at the server."""

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest

pipecat = pytest.importorskip("pipecat", reason="the pipecat extra (pipecat-ai) is not installed")

from pipecat.frames.frames import (EndFrame, InterruptionFrame, MetricsFrame, OutputImageRawFrame,  # noqa: E402
                                   TTSAudioRawFrame, TTSStartedFrame, TTSStoppedFrame)
from pipecat.metrics.metrics import ProcessingMetricsData, TTFBMetricsData  # noqa: E402
from pipecat.pipeline.pipeline import Pipeline  # noqa: E402
from pipecat.pipeline.worker import PipelineParams, PipelineWorker  # noqa: E402
from pipecat.workers.runner import WorkerRunner  # noqa: E402
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor  # noqa: E402

from conftest import metrics, ref_image, start_server, url  # noqa: E402
from flowact.contract import ACTIVE_STREAMS, AGENT_SAMPLE_KEY  # noqa: E402
from flowact.integrations.pipecat import FRAME_KEY, FlowActVideoService  # noqa: E402
from flowact.media import load_audio, resample  # noqa: E402
from flowact.presets import CHUNK_SECONDS, FPS, SAMPLE_RATE, SAMPLES_PER_CHUNK, get_preset  # noqa: E402

SAMPLES = Path(__file__).resolve().parents[1] / "flowact" / "samples"
TTS_RATE = 24_000  # a typical TTS rate: the service resamples
TTS_FRAME = TTS_RATE // 25  # 40 ms frames, pushed 4x faster than real time


class Sink(FrameProcessor):
    """Records what the service pushes (arrival time, frame) and passes everything on."""

    def __init__(self):
        super().__init__()
        self.images: list[tuple[float, OutputImageRawFrame]] = []
        self.speech: list[tuple[float, TTSAudioRawFrame]] = []
        self.metrics: list = []

    async def process_frame(self, frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        now = time.monotonic()
        if isinstance(frame, OutputImageRawFrame):
            self.images.append((now, frame))
        elif isinstance(frame, TTSAudioRawFrame):
            self.speech.append((now, frame))
        elif isinstance(frame, MetricsFrame):
            self.metrics.extend(frame.data)
        await self.push_frame(frame, direction)


def tts_frames(speech: np.ndarray) -> list[TTSAudioRawFrame]:
    """16 kHz float speech as a TTS at 24 kHz sends it: int16 frames of 40 ms."""
    pcm = (np.clip(resample(speech, SAMPLE_RATE, TTS_RATE), -1, 1) * 32767).astype(np.int16)
    return [TTSAudioRawFrame(audio=pcm[i:i + TTS_FRAME].tobytes(), sample_rate=TTS_RATE, num_channels=1)
            for i in range(0, len(pcm), TTS_FRAME)]


async def say(task: PipelineWorker, speech: np.ndarray, stop: bool = True) -> None:
    await task.queue_frame(TTSStartedFrame())
    for frame in tts_frames(speech):
        await task.queue_frame(frame)
        await asyncio.sleep(TTS_FRAME / TTS_RATE / 4)
    if stop:
        await task.queue_frame(TTSStoppedFrame())


@pytest.fixture(scope="module")
def server(tmp_path_factory, onnx_dir):
    srv = start_server(tmp_path_factory.mktemp("pipecat"), onnx_dir, capacity=2)
    yield srv
    srv.stop()


def test_pipecat_pipeline(server):
    tiny = get_preset("tiny")
    speech = load_audio(SAMPLES / "speech.wav")  # (n,) float32 16 kHz, 10.3 s
    first, second = speech[: 5 * SAMPLE_RATE], speech[5 * SAMPLE_RATE:]
    service = FlowActVideoService(url=url(server), image=ref_image(tiny), seed=1)
    sink = Sink()
    task = PipelineWorker(Pipeline([service, sink]), params=PipelineParams(enable_metrics=True))
    marks = {}

    async def agent():
        await asyncio.sleep(1.0)  # idle before the bot speaks
        marks["say"] = time.monotonic()
        await say(task, first)
        await asyncio.sleep(len(first) / SAMPLE_RATE + 1.5)  # it plays, then the avatar idles
        marks["second"] = time.monotonic()
        await say(task, second, stop=False)
        await asyncio.sleep(2.0)
        marks["interrupt"] = time.monotonic()
        await task.queue_frame(InterruptionFrame())
        await asyncio.sleep(2.0)
        marks["active"] = active_streams(server)
        marks["avatar"] = service.avatar
        await task.queue_frame(EndFrame())

    async def main():
        runner = WorkerRunner(handle_sigint=False)
        await runner.add_workers(task)
        await asyncio.gather(runner.run(), agent())

    asyncio.run(main())
    avatar = marks["avatar"]
    assert avatar.error is None
    assert marks["active"] == 1

    # video: 25 fps of non-blank frames of the preset's size, on the playout clock
    times = np.array([t for t, _ in sink.images])
    span = times[-1] - times[0]
    assert span >= 10.0, span
    assert (len(times) - 1) / span >= 24.0, (len(times), span)
    for _, image in sink.images[::25]:
        assert image.size == (tiny.width, tiny.height) and image.format == "RGB"
        pixels = np.frombuffer(image.image, dtype=np.uint8).reshape(tiny.height, tiny.width, 3)
        assert pixels.std() > 5, "a blank frame"
    idle = [image.image for t, image in sink.images if marks["second"] - 1.0 < t < marks["second"]]  # between utterances
    assert len(idle) > 10 and len(set(idle)) > len(idle) // 2, "a frozen avatar while idle"
    numbers = [image.metadata[FRAME_KEY] for _, image in sink.images]
    assert numbers == list(range(len(numbers)))  # every frame once, in order
    origin = avatar.playout.origin
    video_at = {n: t for (t, _), n in zip(sink.images, numbers)}
    assert max(abs(t - (origin + n / FPS)) for n, t in video_at.items()) < 1 / FPS

    # speech: the first utterance out as long as it went in, on the same clock as the lips
    before_second = [f for t, f in sink.speech if t < marks["second"]]
    out_s = sum(f.num_frames for f in before_second) / SAMPLE_RATE
    assert abs(out_s - len(first) / SAMPLE_RATE) <= 0.04, (out_s, len(first) / SAMPLE_RATE)
    offsets = [t - video_at[f.metadata[AGENT_SAMPLE_KEY] * FPS // SAMPLE_RATE] for t, f in sink.speech
               if f.metadata[AGENT_SAMPLE_KEY] * FPS % SAMPLE_RATE == 0]
    assert len(offsets) > 100 and max(abs(o) for o in offsets) < 1 / FPS, max(offsets, key=abs)

    # the interruption: nothing after the chunk it fell in carries speech, and those chunks are idle
    interrupted_at = avatar.quiet_from  # the timeline sample where the interruption came
    cut = (interrupted_at // SAMPLES_PER_CHUNK + 1) * SAMPLES_PER_CHUNK  # the next chunk's first sample
    assert [t for t, _ in sink.speech if marks["second"] < t < marks["interrupt"]]  # it was speaking
    assert not [t for t, _ in sink.speech if t > marks["interrupt"] + 0.06], "speech after the interruption"
    after = [b for k, b in avatar.stats.behaviours.items() if k * SAMPLES_PER_CHUNK >= cut]
    assert after and set(after) == {"idle"}
    assert (cut - interrupted_at) / SAMPLE_RATE <= CHUNK_SECONDS
    said = [b for k, b in avatar.stats.behaviours.items()
            if (marks["say"] - avatar.stats.started_at) * SAMPLE_RATE < k * SAMPLES_PER_CHUNK
            < (marks["say"] - avatar.stats.started_at + 4) * SAMPLE_RATE]
    assert said and set(said) == {"speaking"}
    idle_gap = [b for k, b in avatar.stats.behaviours.items()
                if (marks["second"] - avatar.stats.started_at - 1.0) * SAMPLE_RATE < k * SAMPLES_PER_CHUNK
                < (marks["second"] - avatar.stats.started_at) * SAMPLE_RATE - SAMPLES_PER_CHUNK]
    assert idle_gap and set(idle_gap) == {"idle"}

    # metrics through Pipecat: time to first frame (TTFB) and mouth latency (processing) per chunk
    ttff = [m.value for m in sink.metrics if isinstance(m, TTFBMetricsData) and m.value > 0]  # Pipecat opens with zeros
    mouth = [m.value for m in sink.metrics if isinstance(m, ProcessingMetricsData) and m.value > 0]
    assert len(ttff) == 1 and 0 < ttff[0] < 5
    assert len(mouth) >= 20 and all(0 < v < 2 for v in mouth)

    # END reached the server
    deadline = time.monotonic() + 10
    while active_streams(server) != 0:
        assert time.monotonic() < deadline, "the stream is still active on the server after EndFrame"
        time.sleep(0.2)


def test_cancel_ends_the_stream(server):
    """CancelFrame (the pipeline cancelled mid-stream) ENDs the gRPC stream too."""
    service = FlowActVideoService(url=url(server), image=ref_image(get_preset("tiny")), seed=2)
    sink = Sink()
    task = PipelineWorker(Pipeline([service, sink]))
    seen = {}

    async def main():
        runner = WorkerRunner(handle_sigint=False)
        await runner.add_workers(task)
        run = asyncio.create_task(runner.run())
        await say(task, load_audio(SAMPLES / "speech.wav")[:SAMPLE_RATE], stop=False)
        await asyncio.sleep(1.5)
        seen["active"] = active_streams(server)
        await task.cancel()
        await run

    asyncio.run(main())
    assert seen["active"] == 1 and sink.images
    deadline = time.monotonic() + 10
    while active_streams(server) != 0:
        assert time.monotonic() < deadline, "the stream is still active on the server after CancelFrame"
        time.sleep(0.2)


def active_streams(srv) -> float:
    line = next(line for line in metrics(srv).splitlines() if line.startswith(ACTIVE_STREAMS + "{"))
    return float(line.rsplit(" ", 1)[1])
