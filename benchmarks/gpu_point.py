"""One point of gpu_stream.py: N streams batched through START, warm-up, a probe chunk, serial chunks
and chunks with the decode overlapped, timed by the probes (gpu_probes.py)."""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import gc
import statistics
import time

import numpy as np
import torch

from flowact.benchmarks.gpu_probes import PARTS, Clock, Recorder, attention_kernels, sigfig
from flowact.benchmarks.kit import ms_stats, say
from flowact.engine import StreamEngine
from flowact.presets import CHUNK_SECONDS

CHUNK_MS = CHUNK_SECONDS * 1e3


class Point:
    """Runs N batched streams through START, warm-up, a probe chunk, serial and overlapped chunks."""

    def __init__(self, n: int, ctx: "Context"):
        self.n, self.ctx = n, ctx
        self.rec = ctx.rec
        self.engine = StreamEngine(ctx.preset, ctx.runners, ctx.device, ctx.dtype, capacity=n)
        self.states = []
        self.chunk = 0
        self.side = torch.cuda.Stream(device=ctx.device) if ctx.device.type == "cuda" else None

    def audio(self) -> list[np.ndarray]:
        speech = self.ctx.speech
        return [speech[(self.chunk + 5 * i) % len(speech)] for i in range(self.n)]

    def denoise(self):
        latents = self.engine.denoise(self.states, self.audio())  # (N, 1+3, 16, h, w)
        self.chunk += 1
        return latents

    def decode(self, latents) -> np.ndarray:
        return self.engine.decode(latents).cpu().numpy()  # frames (N, 12, H, W, 3) out, to the host

    def stagger(self) -> None:
        """Stream i runs i mod K chunks ahead (K: the memory refinement period), as streams that started
        at different times do: each chunk then refines about N/K streams, not all N every K-th chunk."""
        k = self.ctx.preset.refine_every
        for j in range(1, k):
            ahead = [i for i in range(self.n) if i % k >= j]
            if ahead:
                audio = self.audio()
                self.engine.denoise([self.states[i] for i in ahead], [audio[i] for i in ahead])

    def start(self) -> None:
        """START of the N streams (the previous ones' slots go back to the pool first)."""
        for state in self.states:
            self.engine.end(state)
        self.states = [self.engine.start(self.ctx.image, seed=i) for i in range(self.n)]
        self.chunk = 0

    def serial_chunk(self, phase: str, k: int) -> float:
        self.rec.tag(phase, k)
        t0 = time.perf_counter()
        self.decode(self.denoise())
        return (time.perf_counter() - t0) * 1e3

    def pipelined(self, chunks: int) -> dict:
        """Chunk k's decode on the side stream (worker thread) while chunk k+1 is denoised."""
        rec, clock, device = self.rec, self.rec.clock, self.ctx.device
        starts, done, den, dec = {}, {}, {}, {}

        def decode_job(latents, ready, k):
            rec.tag("pipelined", k)
            if self.side is not None:
                with torch.cuda.stream(self.side):
                    self.side.wait_event(ready)
                    latents.record_stream(self.side)
                    a = clock.mark()
                    frames = self.engine.decode(latents)  # (N, 12, H, W, 3)
                    b = clock.mark()
                    frames.cpu()
            else:
                a = clock.mark()
                self.engine.decode(latents)
                b = clock.mark()
            done[k] = time.perf_counter()
            dec[k] = (a, b)

        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="decode") as pool:
            pending = None
            for k in range(chunks):
                rec.tag("pipelined", k)
                starts[k] = time.perf_counter()
                a = clock.mark()
                latents = self.denoise()
                b = clock.mark()
                den[k] = (a, b)
                ready = None
                if device.type == "cuda":
                    ready = torch.cuda.Event()
                    ready.record()
                if pending is not None:
                    pending.result()  # at most one decode in flight
                pending = pool.submit(decode_job, latents, ready, k)
                del latents
            pending.result()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        latency = [(done[k] - starts[k]) * 1e3 for k in range(chunks)]
        period = [(done[k] - done[k - 1]) * 1e3 for k in range(1, chunks)]
        # device-side overlap of decode k with denoise k+1
        hidden, dec_total, pairs = 0.0, 0.0, 0
        for k in range(chunks):
            d0, d1 = clock.ms(dec[k][0]), clock.ms(dec[k][1])
            dec_total += d1 - d0
            if k + 1 < chunks:
                n0, n1 = clock.ms(den[k + 1][0]), clock.ms(den[k + 1][1])
                ov = max(0.0, min(d1, n1) - max(d0, n0))
                hidden += ov
                pairs += ov > 0
        return {"latency": latency, "period": period,
                "overlap": {"mode": "cuda side stream + worker thread" if self.side is not None else "worker thread",
                            "chunks": chunks, "overlapped_pairs": pairs, "decode_ms": round(dec_total, 3),
                            "hidden_ms": round(hidden, 3),
                            "hidden_fraction": round(hidden / dec_total, 4) if dec_total > 0 else None}}


@dataclasses.dataclass
class Context:
    preset: object
    device: torch.device
    dtype: torch.dtype
    runners: object
    rec: Recorder
    image: np.ndarray
    speech: np.ndarray
    args: argparse.Namespace
    runtime: str  # a RuntimeKind value


def run_point(n: int, ctx: Context, first: bool) -> dict:
    args, device, rec = ctx.args, ctx.device, ctx.rec
    cuda = device.type == "cuda"
    t_point = time.perf_counter()
    if cuda:
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device) if cuda else None
    rec.clock, rec.calls = Clock(device), []
    point = Point(n, ctx)
    result: dict = {"streams": n, "status": "ok"}

    # START + first chunk, decoded: one cold run (new shapes: autotuning, allocator), then timed ones
    ttff = []
    for rep in range(1 + args.ttff_reps):
        rec.tag("ttff" if rep else "cold", rep)
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        point.start()
        point.decode(point.denoise())
        if rep:
            ttff.append((time.perf_counter() - t0) * 1e3)
    say(f"  N={n}: TTFF {statistics.median(ttff):.1f} ms (START of {n} + first chunk, decoded; median of {len(ttff)})")

    for k in range(args.warmup):  # memory fills up: steady state, as a long stream runs
        point.serial_chunk("warmup", k)

    # probe chunk: eager callables, SDPA calls with an explicit mask counted per part; on CUDA the
    # attention kernels (first point only: the profiler costs a few seconds)
    if ctx.runtime == "torch":
        rec.use_eager, rec.sdpa = True, {}
        try:
            if cuda and first and not args.no_profile:
                try:
                    result["attention_kernels"] = attention_kernels(lambda: point.serial_chunk("probe", 0))
                except Exception as e:  # noqa: BLE001 - the profiler is evidence, not the measurement
                    result["attention_kernels"] = {"error": f"{type(e).__name__}: {e}"}
                    point.serial_chunk("probe", 0)
            else:
                point.serial_chunk("probe", 0)
            counts = rec.sdpa
        finally:
            rec.use_eager, rec.sdpa = False, None
        result["attention"] = {p: {"sdpa_calls": c.sdpa_calls, "sdpa_masked": c.sdpa_masked}
                               for p, c in counts.items() if c.sdpa_calls}

    rec.tag("warmup", args.warmup)
    point.stagger()
    if cuda:  # the peak from here on: chunks as served, not the cold START's autotuning workspaces
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    serial = [point.serial_chunk("serial", k) for k in range(args.serial)]
    say(f"  N={n}: serial chunk (decode not overlapped) p50 {statistics.median(serial):.1f} ms")
    piped = point.pipelined(args.chunks)
    if cuda:
        torch.cuda.synchronize(device)
        result["memory"] = memory_stats(device, base, n)
    else:
        result["memory"] = None

    # timings of each call, resolved now that the device has passed every mark
    calls = [dict(part=c.part, phase=c.phase, chunk=c.chunk, ms=rec.clock.ms(c.end) - rec.clock.ms(c.start),
                  signature=c.signature) for c in rec.calls]
    result["_calls"] = calls
    result.update({
        "chunk_ms": ms_stats(piped["latency"]), "period_ms": ms_stats(piped["period"]),
        "serial_chunk_ms": ms_stats(serial), "ttff_ms": ms_stats(ttff),
        "overlap": piped["overlap"],
    })
    # chunks with memory refinement (every K chunks: one more memory pass and NFE) apart from the rest
    passes = collections.Counter(c["chunk"] for c in calls if c["phase"] == "pipelined" and c["part"] == "denoiser_memory")
    refined = {k for k, count in passes.items() if count > 1}
    result["chunk_ms_refining"] = ms_stats([v for k, v in enumerate(piped["latency"]) if k in refined])
    result["chunk_ms_plain"] = ms_stats([v for k, v in enumerate(piped["latency"]) if k not in refined])
    result["realtime"] = result["chunk_ms"]["p99"] < CHUNK_MS
    result["rtf_p50"] = round(result["chunk_ms"]["p50"] / CHUNK_MS, 4)
    ttff_parts = {}
    for c in calls:
        if c["phase"] == "ttff":
            ttff_parts[c["part"]] = ttff_parts.get(c["part"], 0.0) + c["ms"] / max(1, args.ttff_reps)
    result["ttff_parts_ms"] = {k: round(v, 3) for k, v in ttff_parts.items()}
    result["wall_s"] = round(time.perf_counter() - t_point, 2)
    return result


def memory_stats(device: torch.device, base: int, n: int) -> dict:
    gib = 2**30
    peak = torch.cuda.max_memory_allocated(device) - base
    resident = torch.cuda.memory_allocated(device) - base  # per-stream state still alive between chunks
    free, total = torch.cuda.mem_get_info(device)
    return {"weights_gib": round(base / gib, 3), "peak_over_weights_gib": round(peak / gib, 3),
            "per_stream_peak_gib": round(peak / n / gib, 3), "resident_gib": round(resident / gib, 3),
            "per_stream_resident_gib": round(resident / n / gib, 3),
            "reserved_gib": round(torch.cuda.max_memory_reserved(device) / gib, 3),
            "device_used_gib": round((total - free) / gib, 3)}  # everything: CUDA context, TensorRT, caches


def part_stats(calls: list[dict], phase: str, chunks: int, flops: dict, peak_tflops: float | None,
               chunk_p50: float | None) -> dict:
    out = {}
    for part in PARTS:
        mine = [c for c in calls if c["part"] == part and c["phase"] == phase]
        if not mine or not chunks:
            continue
        ms = [c["ms"] for c in mine]
        counted = [flops.get((part, c["signature"])) for c in mine]
        total_flops = sum(f.total for f in counted) if all(counted) else None
        tflops = total_flops / (sum(ms) * 1e-3) / 1e12 if total_flops and sum(ms) > 0 else None
        per_chunk = sum(ms) / chunks
        out[part] = {
            "calls_per_chunk": round(len(mine) / chunks, 3),
            "ms_per_call_p50": round(statistics.median(ms), 3),
            "ms_per_chunk": round(per_chunk, 3),
            "share_of_chunk": round(per_chunk / chunk_p50, 4) if chunk_p50 else None,
            "tflop_per_call": sigfig(total_flops / len(mine) / 1e12) if total_flops else None,
            "tflops": sigfig(tflops) if tflops else None,
            "fraction_of_matmul": sigfig(tflops / peak_tflops) if tflops and peak_tflops else None,
        }
    return out
