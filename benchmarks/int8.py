"""INT8 vs float32 per network on this CPU: what `flowact export int8` buys, network by network.

    python -m flowact.benchmarks.int8 [--preset cpu] [--out benchmarks/results/int8_cpu.json]

Exports the preset's shipped checkpoint (fp32 and int8, idempotent, under artifacts/<preset>/onnx),
then times every network's ONNX Runtime session in both precisions on calls recorded from real
streams, interleaved (fp32, int8, fp32, ...: the machine is shared, so compare the ratio), with the
server's session options (`--threads` intra-op threads, no spinning). For the denoiser it also
reports the GFLOP-equivalent per second (its float FLOPs, counted on the PyTorch module, over the
measured time) next to a plain float32 matmul's rate on the same threads, and the error of each
int8 network against float32 on those calls. Stream-level quality is benchmarks/quality.py
(--precisions); serving capacity is `flowact bench serve --modes capacity,precision`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from flowact.benchmarks.flops import count_flops, matmul_tflops
from flowact.benchmarks.kit import RESULTS, say
from flowact.export.calibrate import feeds, record_streams
from flowact.export.fp8 import network_error
from flowact.export.int8 import export_int8
from flowact.networks import build_networks, shipped_checkpoint
from flowact.presets import get_preset
from flowact.runtime.manifest import Precision
from flowact.runtime.onnx import ort_session
from flowact.serving.repository import embedded_export_root
from flowact.specs import network_specs


def time_sessions(sessions: dict, calls: list[dict], rounds: int) -> dict[str, float]:
    """Median seconds per call of each session over `rounds` interleaved passes of `calls`."""
    per_round: dict[str, list[float]] = {k: [] for k in sessions}
    for s in sessions.values():  # warm
        s.run(None, calls[0])
    for _ in range(rounds):
        for k, s in sessions.items():
            t0 = time.perf_counter()
            for f in calls:
                s.run(None, f)
            per_round[k].append((time.perf_counter() - t0) / len(calls))
    return {k: statistics.median(v) for k, v in per_round.items()}


def denoiser_gflop(preset, nets, call) -> float:
    """Float GFLOP of one denoiser call with these inputs, counted on the PyTorch module."""
    inputs = [torch.from_numpy(x) for x in call]
    with torch.inference_mode(), count_flops(nets.denoiser) as count:
        nets.denoiser.forward_stream(*inputs)
    return (count.linear + count.conv + count.attention) / 1e9


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--root", type=Path, default=None, help="export root (default artifacts/<preset>/onnx)")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads per session (the server's)")
    ap.add_argument("--streams", type=int, default=2, help="streams of the recorded calls (their batch)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", type=Path, default=None, help="default benchmarks/results/int8_<preset>.json")
    args = ap.parse_args(argv)
    preset = get_preset(args.preset)
    checkpoint = shipped_checkpoint(preset.name)
    root = args.root or embedded_export_root(preset.name)
    export_int8(preset, root, checkpoint=checkpoint, say=say)
    torch.set_num_threads(args.threads)
    nets = build_networks(preset, checkpoint=checkpoint)
    say(f"recording {args.streams} streams x 6 chunks of calls ...")
    recorded = record_streams(preset, nets, args.streams, 6, seed=7, keep=6)
    specs = network_specs(preset)
    rows = {}
    for name, spec in specs.items():
        if spec.int8 is None:
            continue
        calls = [feeds(spec, c) for c in recorded.calls[name]]
        files = {p: root / p / f"{name}.onnx" for p in ("fp32", Precision.INT8.value)}
        sessions = {p: ort_session(f, args.threads, spin=False) for p, f in files.items()}
        seconds = time_sessions(sessions, calls, args.rounds)
        rows[name] = {"int8": spec.int8.value, "batch": int(next(iter(calls[0].values())).shape[0]),
                      "fp32_ms": round(seconds["fp32"] * 1e3, 2), "int8_ms": round(seconds["int8"] * 1e3, 2),
                      "speedup": round(seconds["fp32"] / seconds["int8"], 3),
                      "error_vs_fp32": network_error(files["fp32"], files["int8"], spec, recorded.calls[name])}
        say(f"{name}: fp32 {rows[name]['fp32_ms']} ms, int8 {rows[name]['int8_ms']} ms per call "
            f"(batch {rows[name]['batch']}): {rows[name]['speedup']}x")
    gflop = denoiser_gflop(preset, nets, recorded.calls["denoiser"][0])
    sgemm = matmul_tflops(torch.device("cpu"), torch.float32, n=2048)["tflops"] * 1e3
    den = rows["denoiser"]
    den.update({"gflop_per_call": round(gflop, 2), "fp32_gflops": round(gflop / den["fp32_ms"] * 1e3, 1),
                "int8_gflop_equivalent_per_s": round(gflop / den["int8_ms"] * 1e3, 1),
                "fp32_matmul_gflops": round(sgemm, 1)})
    say(f"denoiser: {gflop:.2f} GFLOP per call: fp32 {den['fp32_gflops']} GFLOP/s, int8 "
        f"{den['int8_gflop_equivalent_per_s']} GFLOP-equivalent/s; plain fp32 matmul (2048^3) {sgemm:.1f} GFLOP/s "
        f"on {args.threads} threads")
    out = args.out or RESULTS / f"int8_{preset.name}.json"
    out.write_text(json.dumps({"preset": preset.name, "threads": args.threads, "networks": rows,
                               "export": str(root / Precision.INT8.value)}, indent=2) + "\n")
    say(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
