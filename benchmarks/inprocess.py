"""The stream engine in process: per-chunk latency and real-time factor at 1, 2, 4 batched streams,
and the denoiser's achieved GFLOP/s next to a plain matmul's on the same machine.

    python -m flowact.benchmarks.inprocess --presets tiny,cpu --batches 1,2,4 [--chunks 20]
    python -m flowact.benchmarks.inprocess --presets r1-480p --batches 1 --device cuda --bf16   # a GPU

Prints a table and writes benchmarks/results/inprocess.json (or --out).
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

from flowact.benchmarks.flops import matmul_tflops
from flowact.benchmarks.kit import RESULTS
from flowact.engine import StreamEngine
from flowact.presets import AUDIO_FEATURES_PER_CHUNK, CHUNK_SECONDS, LATENT_CHANNELS, SAMPLES_PER_CHUNK, get_preset
from flowact.runtime import Runners, RuntimeKind, build_runners
from flowact.stats import percentile



def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def denoiser_gflops(runners: Runners, p, batch: int, device: torch.device, iters: int = 5) -> tuple[float, float]:
    """(GFLOP per NFE, achieved GFLOP/s) of the denoiser with full memory."""
    lat = (p.latent_height, p.latent_width)
    x = torch.randn(batch, 3, LATENT_CHANNELS, *lat, device=device)  # (B, 3, 16, h, w)
    t = torch.rand(batch, 3, device=device)
    audio = torch.randn(batch, AUDIO_FEATURES_PER_CHUNK, p.audio.d_model, device=device)
    prompt = torch.randn(batch, p.prompt_tokens, p.text_dim, device=device)
    valid = torch.ones(batch, p.memory_frames, dtype=torch.bool, device=device)
    kv = runners.denoiser_memory(torch.randn(batch, p.memory_frames, LATENT_CHANNELS, *lat, device=device), valid)
    with FlopCounterMode(display=False) as counter:
        runners.denoiser(x, t, audio, prompt, kv, valid)
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        runners.denoiser(x, t, audio, prompt, kv, valid)
    sync(device)
    seconds = (time.perf_counter() - start) / iters
    flops = counter.get_total_flops()
    return flops / 1e9, flops / seconds / 1e9


def bench_preset(name: str, batches: list[int], chunks: int, device: torch.device, dtype: torch.dtype) -> list[dict]:
    preset = get_preset(name)
    runners = build_runners(RuntimeKind.TORCH, preset, device=device, dtype=dtype)  # built where they run
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (preset.height, preset.width, 3), dtype=np.uint8)
    rows = []
    for batch in batches:
        engine = StreamEngine(preset, runners, device, dtype, capacity=batch)
        states, start_times = [], []
        for i in range(batch):
            t = time.perf_counter()
            states.append(engine.start(image, seed=i))
            start_times.append(time.perf_counter() - t)
        latencies = []
        for k in range(chunks + 2):  # 2 warm-up chunks
            audio = [(0.1 * rng.standard_normal(SAMPLES_PER_CHUNK)).astype(np.float32) for _ in states]
            sync(device)
            t = time.perf_counter()
            engine.step(states, audio)
            sync(device)
            if k >= 2:
                latencies.append(time.perf_counter() - t)
        gflop, gflops = denoiser_gflops(runners, preset, batch, device)
        p50 = percentile(latencies, 50)
        rows.append({
            "preset": name, "sessions": batch, "chunks": chunks,  # "sessions": the published JSON's key
            "chunk_latency_p50_ms": p50 * 1000, "chunk_latency_p99_ms": percentile(latencies, 99) * 1000,
            "start_ms": float(np.mean(start_times)) * 1000,
            "realtime_factor": p50 / CHUNK_SECONDS,  # < 1: every session in the batch is faster than real time
            "realtime": percentile(latencies, 99) < CHUNK_SECONDS,
            "denoiser_gflop_per_nfe": gflop, "denoiser_gflops": gflops,
        })
        print(f"{name:8s} streams={batch}  chunk p50 {rows[-1]['chunk_latency_p50_ms']:7.1f} ms  "
              f"p99 {rows[-1]['chunk_latency_p99_ms']:7.1f} ms  RTF {rows[-1]['realtime_factor']:.3f}  "
              f"denoiser {gflop:6.2f} GFLOP/NFE at {gflops:6.1f} GFLOP/s", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="tiny,cpu")
    ap.add_argument("--batches", default="1,2,4")
    ap.add_argument("--chunks", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice; "
                    "1 is steadier on a machine shared with other jobs)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bf16", action="store_true", help="bf16 weights and stream state (GPU; this CPU has no fast bf16)")
    ap.add_argument("--out", default=str(RESULTS / "inprocess.json"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    peak = matmul_tflops(device, dtype, n=2048)["tflops"] * 1e3  # GFLOP/s
    print(f"plain {dtype} matmul (2048^3) on {device}: {peak:.1f} GFLOP/s ({torch.get_num_threads()} CPU threads)")
    rows = []
    for name in args.presets.split(","):
        rows += bench_preset(name, [int(b) for b in args.batches.split(",")], args.chunks, device, dtype)
    for r in rows:
        r["denoiser_fraction_of_matmul"] = r["denoiser_gflops"] / peak
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                    "dtype": str(dtype), "load_average": os.getloadavg()},
        "matmul_gflops": peak, "rows": rows}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
