"""`flowact generate`: the reference pipeline in process, chunk by chunk, exactly as the server runs it."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm import tqdm

from flowact.contract import DEFAULT_PROMPT
from flowact.engine import StreamEngine
from flowact.media import Mp4Writer, load_audio, load_image, split_chunks
from flowact.networks import build_networks, shipped_checkpoint
from flowact.presets import get_preset
from flowact.runtime import Runners
from flowact.stats import StreamSummary
from flowact.validate import check_prompt, check_seed


def generate(preset_name: str, image: str | Path, audio: str | Path, out: str | Path,
             checkpoint: str | Path | None = None, seed: int = 0, prompt: str = DEFAULT_PROMPT) -> StreamSummary:
    seed, prompt = check_seed(seed), check_prompt(prompt)
    preset = get_preset(preset_name)
    nets = build_networks(preset, checkpoint=checkpoint)
    ref = load_image(image, preset.height, preset.width)  # (H, W, 3) uint8
    speech = load_audio(audio)  # (S,) float32 16 kHz
    chunks, n_frames = split_chunks(speech)  # (N, 7680), frames covering the audio

    engine = StreamEngine(preset, Runners.from_networks(nets))
    latencies, arrivals = [], []
    written = 0
    t0 = time.perf_counter()
    stream = engine.start(ref, seed=seed, prompt=prompt)
    with Mp4Writer(out, preset.width, preset.height, audio=speech) as writer:
        for chunk in tqdm(chunks, desc=f"generate {preset.name}", unit="chunk"):
            t_chunk = time.perf_counter()
            (frames,) = engine.step([stream], [chunk])  # (12, H, W, 3) uint8
            now = time.perf_counter()
            latencies.append(now - t_chunk)
            arrivals.append(now - t0)
            keep = min(len(frames), n_frames - written)  # the last chunk is trimmed to the audio
            writer.write(frames[:keep])
            written += keep
    return StreamSummary.from_timings(arrivals[0], latencies, arrivals, sum(latencies))


def add_parser(sub) -> None:
    from flowact.media import REFERENCE_IMAGE, SPEECH_WAV

    p = sub.add_parser("generate", help="reference image + speech -> talking-avatar MP4, in process")
    p.add_argument("--preset", default="cpu")
    p.add_argument("--image", default=str(REFERENCE_IMAGE))
    p.add_argument("--audio", default=str(SPEECH_WAV))
    p.add_argument("--out", default="out.mp4")
    p.add_argument("--checkpoint", default=None, help="checkpoint directory (default: checkpoints/<preset> if shipped)")
    p.add_argument("--random-weights", action="store_true", help="seeded random weights instead of a checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    checkpoint = None if args.random_weights else args.checkpoint or shipped_checkpoint(args.preset)
    print(f"weights: {checkpoint or 'seeded random'}", flush=True)
    summary = generate(args.preset, args.image, args.audio, args.out, checkpoint, args.seed, args.prompt)
    print(f"wrote {args.out}\n{summary.lines()}")
    return 0
