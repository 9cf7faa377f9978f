"""In-process engine benchmark: per-chunk latency and real-time factor at 1, 2, 4 batched sessions,
and the denoiser's achieved GFLOP/s next to a plain matmul's on the same machine.

    python -m flowact.benchmarks.inprocess --presets tiny,cpu --batches 1,2,4 [--chunks 20]

Prints a table and writes benchmarks/results/inprocess.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from flowact.engine import Engines, StreamSession, step_batch
from flowact.networks import build_networks
from flowact.presets import AUDIO_FEATURES_PER_CHUNK, CHUNK_SECONDS, LATENT_CHANNELS, SAMPLES_PER_CHUNK, get_preset
from flowact.stats import percentile

RESULTS = Path(__file__).parent / "results"


def matmul_gflops(n: int = 2048, iters: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(iters):
        a @ b
    return 2 * n**3 * iters / (time.perf_counter() - t) / 1e9


def denoiser_gflops(nets, batch: int, iters: int = 5) -> tuple[float, float]:
    """(GFLOP per NFE, achieved GFLOP/s) of forward_stream with full memory."""
    p = nets.preset
    lat = (p.latent_height, p.latent_width)
    x = torch.randn(batch, 3, LATENT_CHANNELS, *lat)  # (B, 3, 16, h, w)
    t = torch.rand(batch, 3)
    audio = torch.randn(batch, AUDIO_FEATURES_PER_CHUNK, p.audio.d_model)
    prompt = torch.randn(batch, p.prompt_tokens, p.text_dim)
    valid = torch.ones(batch, p.memory_frames, dtype=torch.bool)
    with torch.inference_mode():
        kv = nets.denoiser.memory_kv(torch.randn(batch, p.memory_frames, LATENT_CHANNELS, *lat), valid)
        with FlopCounterMode(display=False) as counter:
            nets.denoiser.forward_stream(x, t, audio, prompt, kv, valid)
        start = time.perf_counter()
        for _ in range(iters):
            nets.denoiser.forward_stream(x, t, audio, prompt, kv, valid)
        seconds = (time.perf_counter() - start) / iters
    flops = counter.get_total_flops()
    return flops / 1e9, flops / seconds / 1e9


def bench_preset(name: str, batches: list[int], chunks: int) -> list[dict]:
    preset = get_preset(name)
    nets = build_networks(preset)
    engines = Engines.from_networks(nets)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (preset.height, preset.width, 3), dtype=np.uint8)
    rows = []
    for batch in batches:
        sessions = [StreamSession(preset, engines) for _ in range(batch)]
        start_times = []
        for i, s in enumerate(sessions):
            t = time.perf_counter()
            s.start(image, seed=i)
            start_times.append(time.perf_counter() - t)
        latencies = []
        for k in range(chunks + 2):  # 2 warm-up chunks
            audio = [(0.1 * rng.standard_normal(SAMPLES_PER_CHUNK)).astype(np.float32) for _ in sessions]
            t = time.perf_counter()
            step_batch(sessions, audio, [None] * batch)
            if k >= 2:
                latencies.append(time.perf_counter() - t)
        gflop, gflops = denoiser_gflops(nets, batch)
        p50 = percentile(latencies, 50)
        rows.append({
            "preset": name, "sessions": batch, "chunks": chunks,
            "chunk_latency_p50_ms": p50 * 1000, "chunk_latency_p99_ms": percentile(latencies, 99) * 1000,
            "start_ms": float(np.mean(start_times)) * 1000,
            "realtime_factor": p50 / CHUNK_SECONDS,  # < 1: every session in the batch is faster than real time
            "realtime": percentile(latencies, 99) < CHUNK_SECONDS,
            "denoiser_gflop_per_nfe": gflop, "denoiser_gflops": gflops,
        })
        print(f"{name:8s} sessions={batch}  chunk p50 {rows[-1]['chunk_latency_p50_ms']:7.1f} ms  "
              f"p99 {rows[-1]['chunk_latency_p99_ms']:7.1f} ms  RTF {rows[-1]['realtime_factor']:.3f}  "
              f"denoiser {gflop:6.2f} GFLOP/NFE at {gflops:6.1f} GFLOP/s", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="tiny,cpu")
    ap.add_argument("--batches", default="1,2,4")
    ap.add_argument("--chunks", type=int, default=20)
    ap.add_argument("--out", default=str(RESULTS / "inprocess.json"))
    args = ap.parse_args(argv)
    peak = matmul_gflops()
    print(f"plain fp32 matmul (2048^3): {peak:.1f} GFLOP/s on {torch.get_num_threads()} threads")
    rows = []
    for name in args.presets.split(","):
        rows += bench_preset(name, [int(b) for b in args.batches.split(",")], args.chunks)
    for r in rows:
        r["denoiser_fraction_of_matmul"] = r["denoiser_gflops"] / peak
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
        "matmul_gflops": peak, "rows": rows}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
