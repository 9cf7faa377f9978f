"""Per-network latency of the exported networks (torch eager fp32 vs ONNX Runtime fp32 vs the FP8
export in ONNX Runtime) and the FP8 error table, for the tiny and cpu presets.

    python -m flowact.benchmarks.export_bench [--presets tiny,cpu] [--batch 1] [--root artifacts/export-bench]

Exports (idempotently) into ROOT/<preset>/, prints the tables and writes
benchmarks/results/export.json (or --out). On CPU, ONNX Runtime emulates FP8 Q/DQ (dequantize, then
float32 GEMM), so the FP8 column measures the emulation's cost, not FP8 speed; FP8 speed needs
TensorRT on a GPU (benchmarks/gpu_denoiser.py times FP8 GEMMs with torch there).
The error table is each network's worst case vs float32 on a held-out recording of real streams,
plus the decoded frames of an 8-chunk stream run entirely on the FP8 runners vs PyTorch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from flowact.benchmarks.kit import RESULTS
from flowact.engine import StreamEngine
from flowact.export.calibrate import stream_media
from flowact.export.fp8 import export_fp8
from flowact.networks import build_networks
from flowact.presets import CHUNK_SECONDS, get_preset
from flowact.runtime import Runners
from flowact.runtime.manifest import Manifest
from flowact.runtime.onnx import load_onnx_runners
from flowact.specs import MEMORY_VALID, network_specs
from flowact.stats import psnr_db

BACKENDS = ("torch", "ort_fp32", "ort_fp8")


def timed_ms(fn, min_iters: int = 5, min_seconds: float = 1.0, warmup: int = 2) -> tuple[float, float]:
    """(median, min) milliseconds per call."""
    for _ in range(warmup):
        fn()
    times, start = [], time.perf_counter()
    while len(times) < min_iters or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= 200:
            break
    return statistics.median(times), min(times)


def stream_psnr(preset, reference: Runners, candidate: Runners, chunks: int = 8) -> list[float]:
    """Per-chunk PSNR (dB) of a stream on `candidate` runners vs the same stream on `reference`."""
    images, audios, prompts = stream_media(preset, 1, chunks, seed=123)
    frames = []
    for runners in (reference, candidate):
        engine = StreamEngine(preset, runners)
        state = engine.start(images[0], seed=9, prompt=prompts[0])
        frames.append(np.stack([engine.step([state], [a])[0] for a in audios[0]]).astype(np.float64))  # (K, 12, H, W, 3)
    mse = ((frames[0] - frames[1]) ** 2).reshape(chunks, -1).mean(axis=1)
    return [psnr_db(m) for m in mse]


def bench_preset(name: str, root: Path, batch: int, threads: int) -> dict:
    preset = get_preset(name)
    nets = build_networks(preset)
    export_fp8(preset, root / name, nets=nets, say=lambda s: print("  " + s))
    torch_runners = Runners.from_networks(nets)
    runners = {"torch": torch_runners, "ort_fp32": load_onnx_runners(root / name, preset, "fp32", threads=threads),
               "ort_fp8": load_onnx_runners(root / name, preset, "fp8", threads=threads)}
    fp8_manifest = Manifest.load(root / name / "fp8")
    out: dict = {"networks": {}}
    for net, spec in network_specs(preset).items():
        inputs = list(spec.sample_inputs(batch, seed=1))
        if MEMORY_VALID in spec.input_names:  # a stream in steady state: every memory slot filled
            inputs[spec.input_names.index(MEMORY_VALID)] = torch.ones_like(inputs[spec.input_names.index(MEMORY_VALID)])
        row = {"fp8_dir_precision": fp8_manifest.networks[net]["precision"],
               "error_vs_fp32": fp8_manifest.networks[net].get("error_vs_fp32", {})}
        for backend in BACKENDS:
            fn = getattr(runners[backend], net)
            with torch.inference_mode():
                med, best = timed_ms(lambda: fn(*inputs))
            row[f"{backend}_ms"], row[f"{backend}_ms_min"] = round(med, 3), round(best, 3)
        out["networks"][net] = row
        print(f"  {net:16s} " + "  ".join(f"{b} {row[f'{b}_ms']:9.2f} ms" for b in BACKENDS), flush=True)
    # one chunk = audio encoder + memory K/V + nfe denoiser calls + decoder (text encoder is cached)
    for backend in BACKENDS:
        n = out["networks"]
        chunk = (n["audio_encoder"][f"{backend}_ms"] + n["denoiser_memory"][f"{backend}_ms"]
                 + preset.nfe * n["denoiser"][f"{backend}_ms"] + n["vae_decoder"][f"{backend}_ms"])
        out[f"chunk_{backend}_ms"] = round(chunk, 2)
        out[f"chunk_{backend}_realtime_factor"] = round(chunk / (CHUNK_SECONDS * 1e3), 3)
    psnr = stream_psnr(preset, torch_runners, runners["ort_fp8"])
    out["fp8_stream_psnr_db"] = [round(p, 2) for p in psnr]
    out["fp8_stream_psnr_db_min"] = round(min(psnr), 2)
    return out


def print_tables(results: dict) -> None:
    print("\nlatency per call (ms, median), batch", results["batch"])
    print(f"{'preset':8s} {'network':16s} " + " ".join(f"{b:>10s}" for b in BACKENDS) + "  fp8 dir")
    for name, r in results["presets"].items():
        for net, row in r["networks"].items():
            print(f"{name:8s} {net:16s} " + " ".join(f"{row[f'{b}_ms']:10.2f}" for b in BACKENDS)
                  + f"  {row['fp8_dir_precision']}")
        print(f"{name:8s} {'chunk':16s} " + " ".join(f"{r[f'chunk_{b}_ms']:10.2f}" for b in BACKENDS)
              + "  (audio + memory K/V + NFE x denoiser + decoder)")
    print("\nFP8 export error vs float32 (worst case over a held-out stream recording)")
    print(f"{'preset':8s} {'network':16s} {'precision':12s} {'max abs':>10s} {'rel L2':>10s} {'PSNR dB':>9s}")
    for name, r in results["presets"].items():
        for net, row in r["networks"].items():
            e = row["error_vs_fp32"]
            print(f"{name:8s} {net:16s} {row['fp8_dir_precision']:12s} {e.get('max_abs', 0.0):10.3g} "
                  f"{e.get('rel_l2', float('nan')):10.3g} {e.get('psnr_db', float('nan')):9.1f}")
        print(f"{name:8s} {'stream frames':16s} {'all fp8 dir':12s} PSNR vs torch per chunk: "
              f"{', '.join(f'{p:.1f}' for p in r['fp8_stream_psnr_db'])}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="tiny,cpu")
    ap.add_argument("--batch", type=int, default=1, help="streams per call")
    ap.add_argument("--root", type=Path, default=Path("artifacts/export-bench"), help="export root (reused)")
    ap.add_argument("--threads", type=int, default=2,
                    help="torch and ONNX Runtime intra-op threads (1 is steadier on a shared machine)")
    ap.add_argument("--out", type=Path, default=RESULTS / "export.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {"batch": args.batch, "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
               "threads": args.threads, "torch": torch.__version__, "load_average_before": os.getloadavg(),
               "presets": {}}
    import onnxruntime

    results["onnxruntime"] = onnxruntime.__version__
    for name in args.presets.split(","):
        print(f"{name}:", flush=True)
        results["presets"][name] = bench_preset(name, args.root, args.batch, args.threads)
    results["load_average_after"] = os.getloadavg()
    print_tables(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
