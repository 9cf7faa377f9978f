"""Time to first frame and mouth latency of flowact as a voice agent's avatar, through Pipecat, at N=1.

A real Pipecat pipeline: the shipped speech as a TTS sends it (24 kHz, 40 ms frames, 4x real time,
after 1 s of silence) -> FlowActVideoService -> a sink that reads Pipecat's metrics frames. TTFF:
StartFrame -> the first frame leaves the service (TTFB metric); mouth latency: a chunk's speech complete
-> its first frame leaves (processing metric, per chunk); both as the WebRTC edge defines them, whose
N=1 figures (benchmarks/results/web_tiny.json) are copied next to these. A `flowact serve --preset P`
must be running at --url. `--jitter-buffer S` measures another buffer (a results entry of its own).

    python -m flowact.benchmarks.voice_agents --url 127.0.0.1:8001 --preset tiny
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time

import numpy as np
from pipecat.frames.frames import EndFrame, MetricsFrame, OutputImageRawFrame, TTSAudioRawFrame, TTSStartedFrame, TTSStoppedFrame
from pipecat.metrics.metrics import ProcessingMetricsData, TTFBMetricsData
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameProcessor
from pipecat.workers.runner import WorkerRunner

from flowact.benchmarks.kit import RESULTS, reference_inputs
from flowact.contract import AGENT_JITTER_BUFFER_S
from flowact.integrations.pipecat import FlowActVideoService
from flowact.media import resample
from flowact.presets import SAMPLE_RATE, get_preset
from flowact.stats import percentile

OUT = RESULTS / "voice_agents.json"
TTS_RATE = 24_000
TTS_FRAME = TTS_RATE // 25  # 40 ms


class Sink(FrameProcessor):
    def __init__(self):
        super().__init__()
        self.ttff: list[float] = []
        self.mouth: list[float] = []
        self.frame_times: list[float] = []

    async def process_frame(self, frame, direction):
        await super().process_frame(frame, direction)
        if isinstance(frame, OutputImageRawFrame):
            self.frame_times.append(time.monotonic())
        elif isinstance(frame, MetricsFrame):  # Pipecat opens with zeros for every metric
            self.ttff += [m.value for m in frame.data if isinstance(m, TTFBMetricsData) and m.value > 0]
            self.mouth += [m.value for m in frame.data if isinstance(m, ProcessingMetricsData) and m.value > 0]
        await self.push_frame(frame, direction)


async def run_once(url: str, image: np.ndarray, speech: np.ndarray, jitter_buffer_s: float) -> dict:
    service, sink = FlowActVideoService(url=url, image=image, jitter_buffer_s=jitter_buffer_s), Sink()
    stats = {}
    worker = PipelineWorker(Pipeline([service, sink]), params=PipelineParams(enable_metrics=True))
    pcm = (np.clip(resample(speech, SAMPLE_RATE, TTS_RATE), -1, 1) * 32767).astype(np.int16)

    async def agent():
        await asyncio.sleep(1.0)
        await worker.queue_frame(TTSStartedFrame())
        for i in range(0, len(pcm), TTS_FRAME):
            await worker.queue_frame(TTSAudioRawFrame(audio=pcm[i:i + TTS_FRAME].tobytes(), sample_rate=TTS_RATE,
                                                      num_channels=1))
            await asyncio.sleep(TTS_FRAME / TTS_RATE / 4)
        await worker.queue_frame(TTSStoppedFrame())
        await asyncio.sleep(len(speech) / SAMPLE_RATE + 1.0)
        stats["avatar"] = service.avatar.stats
        await worker.queue_frame(EndFrame())

    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    await asyncio.gather(runner.run(), agent())
    times = sink.frame_times
    return {"ttff_ms": round(sink.ttff[0] * 1000, 1), "mouth_p50_ms": round(percentile(sink.mouth, 50) * 1000, 1),
            "mouth_p99_ms": round(percentile(sink.mouth, 99) * 1000, 1), "chunks": len(sink.mouth),
            "fps": round((len(times) - 1) / (times[-1] - times[0]), 2),
            "frames_late": stats["avatar"].frames_late, "frames_out": stats["avatar"].frames_out}


def edge_n1(preset: str) -> dict | None:
    """The WebRTC edge's N=1 point from its own benchmark's results, where there is one."""
    path = RESULTS / f"web_{preset}.json"
    if not path.exists():
        return None
    point = next((p for p in json.loads(path.read_text())["points"] if p["sessions"] == 1), None)
    return None if point is None else {"source": path.name, "ttff_ms": point["ttff_ms_median"],
                                       "mouth_p50_ms": point["mouth_p50_ms_median"], "mouth_p99_ms": point["mouth_p99_ms_max"]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True, help="a running flowact serve (gRPC)")
    p.add_argument("--preset", required=True, help="the server's preset")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--jitter-buffer", type=float, default=AGENT_JITTER_BUFFER_S, help="seconds (default: the service's)")
    args = p.parse_args(argv)
    preset = get_preset(args.preset)
    image, speech, _ = reference_inputs(preset)
    load = os.getloadavg()[0]
    runs = [asyncio.run(run_once(args.url, image, speech, args.jitter_buffer)) for _ in range(args.repeat)]
    results = json.loads(OUT.read_text()) if OUT.exists() else {}
    key = args.preset if args.jitter_buffer == AGENT_JITTER_BUFFER_S else f"{args.preset}_jitter_{args.jitter_buffer:g}s"
    results[key] = {"jitter_buffer_s": args.jitter_buffer, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cpus": os.cpu_count(),
                            "loadavg_at_start": round(load, 2), "streams": 1, "pipecat": runs,
                            "edge_n1": edge_n1(args.preset)}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results[key], indent=2))


if __name__ == "__main__":
    main()
