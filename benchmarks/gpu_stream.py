"""Whole chunks as served, N streams batched, on one GPU: latency, TTFF, capacity, memory, per-part TFLOP/s.

    python -m flowact.benchmarks.gpu_stream --preset r1-480p --runtime torch --streams 1,2,3,4 --out run.json
    python -m flowact.benchmarks.gpu_stream --preset r1-480p --runtime trt --source EXPORT_DIR --streams 1,2,3,4
    python -m flowact.benchmarks.gpu_stream --preset tiny --device cpu --streams 1,2        # CPU smoke test
    python -m flowact.benchmarks.gpu_stream --publish-from run.json   # copy into results/, rebuild the README table
    python -m flowact.benchmarks.gpu_stream --readme                  # rebuild the README table from results/

In process, on one device, through the serving sampler itself: N streams of one `StreamEngine` stepped
by `engine.denoise` (one batched call per network: audio encoder, memory pass, 3 NFE, memory refinement
every K chunks), and the VAE decoder of chunk n on a side CUDA stream, in a worker thread, while
chunk n+1 is denoised (on CPU: the worker thread alone). At most one decode is in flight, as with
one `vae_decoder` instance behind the `stream` model in the Triton ensemble; there the decoder is
another process, whose kernels time-slice with the stream model's without CUDA MPS: the overlap
measured here is the served pipeline's upper bound.

Per N (after START and warm-up chunks, so every stream's memory is full):
- TTFF: START of all N streams (VAE encoder of the reference) + the first chunk, decoded to host;
- then the streams are staggered (stream i runs i mod K chunks ahead, K = 4 the memory refinement
  period), as streams that started at different times are: each timed chunk refines about N/K
  streams (one more memory pass and NFE each, over reference and long-term memory), instead of all
  N every K-th chunk;
- chunk latency p50/p99: denoising start to decoded frames on the host, back to back with the
  decoder overlapped (each chunk waits for nothing but the GPU: an upper bound for paced streams);
  period: interval between consecutive chunks' frames (the pipeline's throughput);
- serial chunk: the same chunk with the decode not overlapped; per-part times come from these
  chunks (no overlap skews them), and from the overlapped chunks as served;
- real time: p99 chunk latency < 480 ms; realtime_streams = the largest such N;
- GPU memory: torch.cuda.max_memory_allocated over the weights' footprint during the timed chunks
  (after the cold START's autotuning), per stream;
- per part (audio_encoder, denoiser_memory, denoiser = one NFE, vae_decoder): ms per call, calls
  per chunk, achieved TFLOP/s and its fraction of a bf16 8192^3 matmul measured in the same run.
  FLOPs come from flowact.benchmarks.flops.count_flops (linear and conv hooks plus dense attention,
  masked keys included) on a meta-device copy of the networks, replaying each call's shapes;
- attention: SDPA calls with an explicit mask during one probe chunk without refinement (torch
  runtime), and on CUDA the attention kernels the profiler saw (mask-free calls can use flash /
  cuDNN; with the torch runtime a partial memory and the refinement pass attend to their valid slots
  only, without a mask; ONNX graphs and TensorRT plans take the mask there);

An out-of-memory N is recorded and the others still run; a time budget (--budget-s) skips the N that
would overrun it. Results: JSON (--out, or a run directory under the system temp dir; with --publish
benchmarks/results/gpu_stream_<preset>[-RUNTIME][-compile].json and the README table).

The parts: gpu_probes.py (timing probes, FLOPs, attention kernels), gpu_point.py (one N), gpu_tables.py
(the tables); this file: the runners, the run over the N and its JSON, the CLI.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from flowact.benchmarks.flops import matmul_tflops
from flowact.benchmarks.gpu_point import CHUNK_MS, Context, part_stats, run_point
from flowact.benchmarks.gpu_probes import Recorder, meta_runners, flops_of, sigfig, timed_runners
from flowact.benchmarks.gpu_tables import RESULTS, summary_text, update_readme
from flowact.benchmarks.kit import reference_inputs, say, whole_chunks
from flowact.presets import get_preset
from flowact.runtime import RuntimeKind, build_runners
from flowact.runtime.pytorch import TorchRunner

EXIT_UNAVAILABLE = 2


def tensorrt_missing() -> str | None:
    """Why TensorRT cannot run here (None: it imports), via the project's TensorRT runtime."""
    if importlib.util.find_spec("tensorrt") is None:
        return ("TensorRT is not installed: the `tensorrt` Python package (TensorRT 10, e.g. in the NGC "
                "tritonserver or TensorRT container) is needed to run the plans of `flowact export trt`")
    from flowact.runtime.tensorrt import import_tensorrt

    try:
        import_tensorrt()
    except Exception as e:  # noqa: BLE001 - TensorRTUnavailable, or the PyPI stub failing to fetch its wheel
        return f"{type(e).__name__}: {e}"
    return None


def unavailable(args, device: torch.device) -> str | None:
    """Why this run cannot happen on this machine (None: it can)."""
    if args.runtime == RuntimeKind.TRT:
        if device.type != "cuda" or args.compile or args.source is None:
            return "--runtime trt needs --device cuda, --source EXPORT_DIR (from `flowact export trt`) and no --compile"
        missing = tensorrt_missing()
        if missing:
            return f"--runtime trt: {missing}"
    if args.runtime == RuntimeKind.ONNX and (device.type != "cpu" or args.compile or args.source is None):
        return "--runtime onnx runs ONNX Runtime on the CPU: it needs --device cpu, --source EXPORT_DIR and no --compile"
    if device.type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device: run on a GPU machine, or pass --device cpu --preset tiny for a smoke test"
    return None


def runners_for(args, preset, device: torch.device, dtype: torch.dtype):
    """-> (the runners to time, the same without torch.compile: what the probe chunk calls). torch: the
    `--source` checkpoint or seeded random weights, built on the device itself (a 2.57 B denoiser never
    touches host memory), in `dtype`."""
    eager = build_runners(args.runtime, preset, args.source, device, dtype)
    if not args.compile:
        return eager, eager
    compiled = {name: TorchRunner(torch.compile(getattr(eager, name).fn), dtype, device.type)
                for name in ("denoiser", "denoiser_memory")}
    return dataclasses.replace(eager, **compiled), eager


def device_info(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"name": platform.processor() or platform.machine() or "cpu", "type": "cpu",
                "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    props = torch.cuda.get_device_properties(device)
    sdp = {k: getattr(torch.backends.cuda, f"{k}_sdp_enabled")() for k in ("flash", "mem_efficient", "cudnn", "math")
           if hasattr(torch.backends.cuda, f"{k}_sdp_enabled")}
    return {"name": props.name, "type": "cuda", "compute_capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count, "memory_gib": round(props.total_memory / 2**30, 2),
            "cuda": torch.version.cuda, "sdp_backends_enabled": sdp,
            "tf32": torch.backends.cuda.matmul.allow_tf32, "cudnn_benchmark": torch.backends.cudnn.benchmark}


def result_name(preset: str, runtime: str, compile_: bool) -> str:
    return f"gpu_stream_{preset}{'' if runtime == RuntimeKind.TORCH else '-' + runtime}{'-compile' if compile_ else ''}.json"


def parse(argv) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--preset", default="r1-480p")
    ap.add_argument("--runtime", choices=[k.value for k in RuntimeKind], default=RuntimeKind.TORCH.value,
                    help="what runs the networks (flowact.runtime.build_runners)")
    ap.add_argument("--source", type=Path, default=None,
                    help="torch: a checkpoint directory (default: seeded random weights); onnx: the export directory; "
                         "trt: the export directory (ROOT or ROOT/trt-fp8)")
    ap.add_argument("--streams", default="1,2,3,4", help="N streams batched per call, comma-separated")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                    help="weights and stream state (default: bfloat16 on CUDA, float32 on CPU)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the denoiser and memory pass")
    ap.add_argument("--warmup", type=int, default=5, help="untimed chunks per N after START (memory fills in 4)")
    ap.add_argument("--serial", type=int, default=3, help="timed chunks per N with the decode not overlapped")
    ap.add_argument("--chunks", type=int, default=16, help="timed chunks per N with the decode overlapped")
    ap.add_argument("--ttff-reps", type=int, default=2, help="timed START + first chunk per N (after one cold)")
    ap.add_argument("--matmul-n", type=int, default=None, help="peak matmul size (default 8192 on CUDA, 1024 on CPU)")
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="skip an N whose predicted time would end the run past this many seconds")
    ap.add_argument("--no-profile", action="store_true", help="skip the attention-kernel profiler probe")
    ap.add_argument("--out", type=Path, default=None, help="JSON here (default: a run directory under the temp dir)")
    ap.add_argument("--publish", action="store_true",
                    help="also write benchmarks/results/gpu_stream_<preset>[-RUNTIME][-compile].json and the README table")
    ap.add_argument("--publish-from", type=Path, default=None, metavar="JSON",
                    help="publish an earlier run's JSON (e.g. fetched from the GPU machine) and exit")
    ap.add_argument("--readme", action="store_true", help="rebuild the README table from results/ and exit")
    args = ap.parse_args(argv)
    if args.ttff_reps < 1 or args.serial < 1 or args.chunks < 2 or args.warmup < 0:
        ap.error("need --ttff-reps >= 1, --serial >= 1, --chunks >= 2 and --warmup >= 0")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    if args.readme:
        say(f"wrote {update_readme()}")
        return 0
    if args.publish_from:
        result = json.loads(args.publish_from.read_text())
        target = RESULTS / result_name(result["preset"], result["runtime"], result["compile"])
        shutil.copyfile(args.publish_from, target)
        say(f"wrote {target} and {update_readme()}")
        return 0

    t_run = time.perf_counter()
    device = torch.device(args.device)
    why = unavailable(args, device)
    if why:
        print(why, file=sys.stderr)
        return EXIT_UNAVAILABLE
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    streams = [int(s) for s in args.streams.split(",")]
    preset = get_preset(args.preset)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # the decoder's convolutions: autotuned in the cold chunk per N
    info = device_info(device)
    say(f"gpu_stream: {preset.name}, runtime {args.runtime}{' (compiled)' if args.compile else ''}, {dtype}, "
        f"N = {streams}, on {info['name']}, torch {torch.__version__}")

    rec = Recorder()
    t0 = time.perf_counter()
    runners, eager = runners_for(args, preset, device, dtype)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    build_s = time.perf_counter() - t0
    meta, meta_modules = meta_runners(preset)
    params = {n: sum(p.numel() for p in m.parameters()) for n, m in meta_modules.items()}
    say(f"built {sum(params.values()) / 1e9:.2f} B parameters on {device} in {build_s:.1f} s")
    runners = timed_runners(runners, eager, rec)

    matmul_dtype = dtype if device.type == "cuda" else torch.float32
    peak = matmul_tflops(device, matmul_dtype, n=args.matmul_n or (8192 if device.type == "cuda" else 1024),
                         iters=10 if device.type == "cuda" else 3)
    say(f"{peak['dtype']} matmul {peak['n']}^3: {peak['tflops']:.4g} TFLOP/s")
    image, speech, loader = reference_inputs(preset)
    chunks = whole_chunks(speech)  # (K, 7680)
    ctx = Context(preset, device, dtype, runners, rec, image, chunks, args, args.runtime)

    result = {
        "benchmark": "gpu_stream", "preset": preset.name, "runtime": args.runtime, "compile": args.compile,
        "dtype": str(dtype).removeprefix("torch."), "device": info, "torch": torch.__version__,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(["python -m flowact.benchmarks.gpu_stream",
                                                                              *(argv if argv is not None else sys.argv[1:])]),
        "plan": {"warmup": args.warmup, "staggered": True, "serial": args.serial, "chunks": args.chunks, "ttff_reps": args.ttff_reps,
                 "budget_s": args.budget_s},
        "inputs": {"speech_chunks": len(chunks), "loader": loader},
        "parameters": params, "build_s": round(build_s, 2), "matmul": peak, "chunk_budget_ms": CHUNK_MS,
        "points": [],
    }
    out = args.out or Path(tempfile.gettempdir()) / "flowact-runs" / (
        time.strftime("%Y%m%d-%H%M%S-") + result_name(preset.name, args.runtime, args.compile))
    out.parent.mkdir(parents=True, exist_ok=True)
    flops: dict = {}  # (part, signature) -> FlopCount, replayed on the meta-device networks
    last = None  # (n, chunk p50 ms) of the last point that ran
    chunks_per_point = (1 + args.ttff_reps) + args.warmup + (preset.refine_every - 1) + 1 + args.serial + args.chunks
    errors = 0
    finish(result, flops, streams, t_run, out, partial=True)  # something to fetch even if N=1 never ends
    say(f"JSON after every N: {out}")
    for i, n in enumerate(streams):
        elapsed = time.perf_counter() - t_run
        if last is not None:  # chunks of the last point, scaled by the batch, plus the cold START
            n0, chunk0 = last
            per_chunk = chunk0 * n / n0 / 1e3
            predicted = per_chunk * chunks_per_point * 1.3 + (90.0 if args.compile else 10.0)
            if elapsed + predicted > args.budget_s:
                say(f"N={n}: SKIPPED, predicted {predicted:.0f} s after {elapsed:.0f} s would pass the "
                    f"{args.budget_s:.0f} s budget")
                result["points"].append({"streams": n, "status": "skipped",
                                         "error": f"time budget: predicted {predicted:.0f} s at {elapsed:.0f} s"})
                continue
        say(f"N={n}: running ({elapsed:.0f} s into the run)")
        failure = None
        try:
            point = run_point(n, ctx, first=(i == 0))
        except torch.cuda.OutOfMemoryError as e:
            failure = ("oom", str(e).splitlines()[0])
            say(f"!!! N={n}: CUDA OUT OF MEMORY ({failure[1]}); recorded, going on with the next N")
        except Exception as e:  # noqa: BLE001 - keep the other points; the exit code says it failed
            failure = ("error", f"{type(e).__name__}: {e}")
            errors += 1
            say(f"!!! N={n}: FAILED: {failure[1]}\n{traceback.format_exc()}")
        if failure is not None:  # outside the except block: the traceback's frames (and tensors) are gone
            result["points"].append({"streams": n, "status": failure[0], "error": failure[1]})
            finish(result, flops, streams, t_run, out, partial=True)  # recorded before touching the device again
            try:
                _release(device)
            except Exception as e:  # noqa: BLE001 - a sticky CUDA error (illegal address, ...): no further N can run
                say(f"!!! the device cannot go on after N={n} ({type(e).__name__}: {e}); stopping")
                break
            continue
        last = (n, point["chunk_ms"]["p50"])
        calls = point.pop("_calls")
        new = {(c["part"], c["signature"]) for c in calls} - set(flops)
        counted, error = flops_of(new, meta, meta_modules)
        flops.update(counted)
        result["flops_error"] = result.get("flops_error") or error
        finish_point(point, calls, flops, args, peak["tflops"], args.runtime)
        result["points"].append(point)
        say(f"N={n}: chunk p50 {point['chunk_ms']['p50']:.1f} / p99 {point['chunk_ms']['p99']:.1f} ms, period p50 "
            f"{point['period_ms']['p50']:.1f} ms, {'REAL TIME' if point['realtime'] else 'not real time'}; "
            f"{point['wall_s']:.0f} s")
        _release(device)
        finish(result, flops, streams, t_run, out, partial=True)  # a run cut short still leaves its points

    finish(result, flops, streams, t_run, out, partial=False)
    say("")
    say(summary_text(result))
    say(f"wrote {out}")
    if args.publish:
        target = RESULTS / result_name(preset.name, args.runtime, args.compile)
        target.write_text(json.dumps(result, indent=1) + "\n")
        say(f"wrote {target} and {update_readme()}")
    return 1 if errors else 0


def finish_point(point: dict, calls: list[dict], flops: dict, args, peak_tflops: float, runtime: str) -> None:
    """Per-part times and rates of one point, and whether its attention ran without a mask."""
    point["parts"] = part_stats(calls, "pipelined", args.chunks, flops, peak_tflops, point["chunk_ms"]["p50"])
    point["parts_serial"] = part_stats(calls, "serial", args.serial, flops, peak_tflops, point["serial_chunk_ms"]["p50"])
    if runtime != RuntimeKind.TORCH:  # no python attention to watch: what the model code does with these inputs
        att = point["attention"] = {}
        for (part, shapes), f in flops.items():
            if f.sdpa_calls and _batch(shapes) == point["streams"]:
                a = att.setdefault(part, {"sdpa_calls": 0, "sdpa_masked": 0, "source": "meta"})
                a["sdpa_calls"] += f.sdpa_calls
                a["sdpa_masked"] += f.sdpa_masked
    att = point.get("attention") or {}
    dit = [att[p] for p in ("denoiser", "denoiser_memory") if p in att]
    point["mask_free"] = (all(a["sdpa_masked"] == 0 for a in dit) if dit else None)


def finish(result: dict, flops: dict, streams: list[int], t_run: float, out: Path, partial: bool) -> None:
    """Run-level summary (capacity, memory, FLOPs per stream) over the points so far; writes the JSON."""
    result["flops_error"] = result.get("flops_error")
    result["flops_per_stream"] = per_stream_flops(flops)
    ok = [p for p in result["points"] if p["status"] == "ok"]
    memory_summary(result, ok)
    rt = [p["streams"] for p in ok if p["realtime"]]
    result["realtime_streams"] = max(rt) if rt else 0
    result["realtime_streams_lower_bound"] = bool(ok) and ok[-1]["realtime"] and ok[-1]["streams"] == max(streams)
    result["partial"] = partial
    result["wall_s"] = round(time.perf_counter() - t_run, 1)
    out.write_text(json.dumps(result, indent=1) + "\n")


def memory_summary(result: dict, ok: list[dict]) -> None:
    """Marginal peak memory per added stream, and how many streams the device's memory would hold."""
    with_mem = [p for p in ok if p.get("memory")]
    prev = None
    for p in with_mem:
        m = p["memory"]
        if prev is not None:
            m["marginal_peak_gib"] = round((m["peak_over_weights_gib"] - prev["memory"]["peak_over_weights_gib"])
                                           / (p["streams"] - prev["streams"]), 3)
        prev = p
    if with_mem and result["device"].get("memory_gib"):
        m = with_mem[-1]["memory"]
        per = max(m.get("marginal_peak_gib") or 0.0, m["per_stream_peak_gib"])
        if per > 0:
            result["streams_memory_fits"] = int((result["device"]["memory_gib"] - m["weights_gib"]) // per)
    if result["runtime"] == RuntimeKind.TRT:
        result["memory_note"] = "torch's allocator only: TensorRT's own allocations are in device_used_gib"


def _batch(sig: tuple) -> int | None:
    return sig[0][1][0] if sig and sig[0][0] == "tensor" and sig[0][1] else None


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def per_stream_flops(flops: dict) -> dict:
    """TFLOP per call per stream of each part (from the N=1 call, else divided by the batch)."""
    out = {}
    for (part, sig), c in sorted(flops.items(), key=lambda kv: _batch(kv[0][1]) or 0):
        b = _batch(sig) or 1
        if part not in out:
            out[part] = {k: sigfig(v / b / 1e12) for k, v in
                         (("tflop", c.total), ("linear", c.linear), ("conv", c.conv), ("attention", c.attention))}
    return out


if __name__ == "__main__":
    sys.exit(main())
