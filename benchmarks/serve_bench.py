"""`flowact bench serve`: how many real-time avatar streams one server holds, against what a team
would build without this project, and what serving costs.

    flowact bench serve --preset cpu --streams 1,2,3,4 --duration 30 [--url HOST:PORT]
        [--jitter-buffer 0.2] [--prometheus-port 9500] [--modes capacity,baseline,overhead,pipeline]
        [--soak-minutes 30] [--out FILE | --publish]
    flowact bench report        # plots and the README table again, from benchmarks/results/serve_*.json

A run writes its JSON and plots to its own directory, runs/serve-PRESET-TIMESTAMP/ (or --out); only
--publish writes the published benchmarks/results/serve_PRESET.json and regenerates the README table.

Modes (one run, one machine; each section records the load average it started under):
  capacity  N concurrent streams through the server's gRPC ensemble, paced at real time, each with
            its own id and audio (the shipped client, benchmarks/loadgen.py). Per N: TTFF, chunk
            latency p50/p99, stall rate, fps per stream, server CPU and RSS.
            Real-time capacity = the largest N with stall rate <= 1 % and p99 chunk latency < 0.48 s.
  baseline  the same rule for the in-process PyTorch StreamEngine, one unbatched stream per worker
            process (multiprocessing; torch threads per worker: cores // N and 1 both tried where they
            differ, the better kept). ratio = ours / baseline.
  overhead  at N = 1: chunk latency through the server vs the same ONNX files in process
            (flowact.runtime.build_runners("onnx"), ONNX Runtime, the server's thread count).
  pipeline  throughput (chunks/s, streams sending as fast as a 2-chunk window allows) with the
            repository rendered `overlap` (decode of chunk n overlaps denoise of n+1) vs `serial`.
  soak      one stream for --soak-minutes of looped audio: latency and server memory over time.
  precision the capacity sweep again, interleaved per N, against a second server whose networks are at
            the other CPU precision (--precision picks ours: fp32 or int8, default the preset's);
            summary: the capacity ratio and the chunk p50 ratio at N = 1.

Without --url the benchmark renders the embedded repository, starts tritonserver on free loopback
ports, and samples its process group with psutil. With --url it drives that server, reads host-wide
CPU/memory from its metrics endpoint (nv_cpu_utilization, nv_cpu_memory_used_bytes), and skips the
pipeline mode (it needs to render repositories); overhead then assumes --onnx-dir holds the ONNX files
that server runs.

The parts: serve_config.py (a run's settings), serve_server.py (the server under test and one load point
against it), serve_baseline.py (the in-process runs), serve_modes.py (the modes), report.py (plots and
the README table); this file: the run, its results file, and the CLI.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from flowact.benchmarks.kit import README, RESULTS, reference_inputs, say
from flowact.benchmarks.loadgen import LoadSpec
from flowact.benchmarks.resources import load_snapshot, machine_facts
from flowact.benchmarks.serve_config import DEFAULT_MODES, MODES, BenchConfig, now_iso
from flowact.benchmarks.serve_modes import run_pipeline, run_soak, run_sweep
from flowact.benchmarks.serve_server import Endpoint, remote, server_version, start_local, warm_up
from flowact.presets import get_preset
from flowact.runtime.manifest import CPU_PRECISIONS


# --- the results file ---------------------------------------------------------------------------------------


def finite(obj):
    """NaN/inf -> None, so the results file is strict JSON."""
    if isinstance(obj, float):
        return round(obj, 6) if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


RUN_FIELDS = ("command", "modes", "machine", "settings", "load_at_start", "load_at_end", "server")


def merge_previous(path: Path, preset: str) -> dict:
    """Sections of an earlier run that this run does not redo are kept (e.g. a later long soak), with
    what their run recorded (`runs[run_id]`: command, machine, settings, load)."""
    try:
        old = json.loads(path.read_text()) if path.exists() else {}
    except json.JSONDecodeError:
        return {}
    if old.get("preset") != preset:
        return {}
    if "run_id" in old:  # the first format kept one run's facts at the top level
        old.setdefault("runs", {})[old.pop("run_id")] = {k: old.pop(k) for k in RUN_FIELDS if k in old}
    return old


def summary(result: dict) -> dict:
    """The headline figures, recomputed from the sections present."""
    out = {}
    cap, base = result.get("capacity"), result.get("baseline")
    if cap:
        out["capacity"] = cap["result"]["capacity"]
    if base:
        out["baseline_capacity"] = base["result"]["capacity"]
    if cap and base:
        out["ratio"] = (cap["result"]["capacity"] / base["result"]["capacity"]) if base["result"]["capacity"] else None
        out["ratio_same_run"] = cap.get("run_id") == base.get("run_id")
    over = result.get("overhead")
    if over and "overhead_chunk_latency_p50_ms" in over:
        out["overhead_p50_ms"] = over["overhead_chunk_latency_p50_ms"]
        out["overhead_p99_ms"] = over["overhead_chunk_latency_p99_ms"]
    pipe = result.get("pipeline")
    if pipe and pipe.get("overlap") and pipe.get("serial"):
        out["overlap_vs_serial"] = {str(a["streams"]): a["chunks_per_s"] / b["chunks_per_s"]
                                    for a, b in zip(pipe["overlap"], pipe["serial"]) if b.get("chunks_per_s")}
    prec = result.get("precision")
    if cap and prec:  # ours vs the other precision: capacity ratio, and chunk p50 at N=1 (other / ours: speed-up)
        n1 = [next((p for p in s["points"] if p["streams"] == 1), {}).get("chunk_latency_p50_s") for s in (cap, prec)]
        out["precision"] = {"ours": cap.get("server_precision"), "other": prec["server_precision"],
                            "other_capacity": prec["result"]["capacity"],
                            "capacity_ratio": (cap["result"]["capacity"] / prec["result"]["capacity"]
                                               if prec["result"]["capacity"] else None),
                            "chunk_p50_n1_ratio": n1[1] / n1[0] if all(n1) else None,
                            "same_run": cap.get("run_id") == prec.get("run_id")}
    soak = result.get("soak")
    if soak:
        out["soak_minutes"], out["soak_flat"] = soak["minutes"], soak["flat"]
    return out



# --- the run ----------------------------------------------------------------------------------------------


def run(cfg: BenchConfig) -> dict:
    from flowact.benchmarks.loadgen import ClientMetrics

    run_id = now_iso()
    result = merge_previous(cfg.out, cfg.preset)
    result["preset"] = cfg.preset
    info = result.setdefault("runs", {})[run_id] = {
        "command": " ".join(sys.argv), "modes": sorted(cfg.modes), "machine": machine_facts()}
    info["settings"] = {
        "streams": cfg.streams, "duration_s": cfg.duration_s, "jitter_buffer_s": cfg.jitter_buffer,
        "max_in_flight_per_stream": cfg.max_in_flight, "grace_s": cfg.grace_s, "engine_threads": cfg.engine_threads,
        "pipeline_streams": cfg.pipeline_streams, "repeat": cfg.repeat, "precision": cfg.precision,
        "capacity_rule": "largest N with stall rate <= 1 % and p99 chunk latency < 0.48 s, no failed stream",
        "latency": "arrival of a chunk's frames minus the time its audio existed (chunk i due 0.48 s * i after "
                   "the stream's start; streams start spread over one chunk period)",
        "stall": "a chunk arriving after its playback time: first arrival + jitter buffer + 0.48 s * i; chunks "
                 "that never arrived before the point's end count as stalls",
        "client": "the shipped client (flowact.client AvatarStream, a thread per stream), one gRPC stream per "
                  "avatar stream, in the benchmark's process (on the same cores as the server when it runs locally)"}
    say(f"load before measuring: {os.getloadavg()}")
    info["load_at_start"] = load_snapshot(exclude={os.getpid()})
    metrics = ClientMetrics(cfg.prometheus_port, cfg.prometheus_addr) if cfg.prometheus_port is not None else None
    if metrics is not None:
        say(f"client metrics on http://{cfg.prometheus_addr}:{metrics.port}/metrics")
    image, audio, _ = reference_inputs(get_preset(cfg.preset))
    modes = set(cfg.modes)

    def stamp(section):
        section["run_id"] = run_id
        return section

    for mode in ("pipeline", "precision"):
        if mode in modes and cfg.url:
            say(f"{mode} mode skipped: it renders its own repositories (not with --url)")
            modes.discard(mode)
    endpoints: dict[str, Endpoint] = {}
    specs: dict[str, LoadSpec] = {}
    try:
        if modes & {"capacity", "overhead", "pipeline", "soak"}:
            endpoints["overlap"] = remote(cfg) if cfg.url else start_local(cfg, "overlap")
            if "pipeline" in modes:
                endpoints["serial"] = start_local(cfg, "serial")
            if "precision" in modes:  # the same server at the other CPU precision
                endpoints["precision"] = start_local(cfg, "overlap", *cfg.other_precisions)
            main = endpoints["overlap"]
            info["server"] = {"url": main.url, "started_by_benchmark": cfg.url is None,
                                "resources": "psutil over the tritonserver process group" if cfg.url is None else
                                "host-wide nv_cpu_* metrics from the server's metrics endpoint",
                                **server_version(main)}
            for name, endpoint in endpoints.items():
                specs[name] = LoadSpec(endpoint.url, cfg.preset, image, audio, max_in_flight=cfg.max_in_flight,
                                       jitter_buffer=cfg.jitter_buffer)
                warm_up(endpoint, specs[name], max([*cfg.streams, *cfg.pipeline_streams]))
        for name, section in run_sweep(cfg, modes, endpoints.get("overlap"), specs.get("overlap"), metrics,
                                       endpoints.get("precision"), specs.get("precision")).items():
            result[name] = stamp(section)
        if "pipeline" in modes:
            result["pipeline"] = stamp(run_pipeline(cfg, endpoints, specs, metrics))
        if "soak" in modes and cfg.soak_minutes > 0:
            result["soak"] = stamp(run_soak(cfg, endpoints["overlap"], specs["overlap"], metrics))
    finally:
        for name, endpoint in endpoints.items():
            faults = endpoint.stop()
            if faults:
                info.setdefault("server_faults", {})[name] = {"log": str(endpoint.server.log_path), "lines": faults}
                say(f"WARNING: the {name} server's log shows a crash ({endpoint.server.log_path}): {faults[0]}")
    info["load_at_end"] = {"loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()]}
    # Merge with the file as it is now, not as it was when this run started: another run (a long soak)
    # may have written its sections meanwhile.
    mine = {name: section for name, section in result.items()
            if isinstance(section, dict) and section.get("run_id") == run_id}
    result = merge_previous(cfg.out, cfg.preset) | {"preset": cfg.preset} | mine
    result["runs"] = result.get("runs", {}) | {run_id: info}
    used = {section["run_id"] for section in result.values() if isinstance(section, dict) and "run_id" in section}
    result["runs"] = {k: v for k, v in result["runs"].items() if k in used or k == run_id}
    result["summary"] = summary(result)
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    result = finite(result)
    cfg.out.write_text(json.dumps(result, indent=1))
    say(f"wrote {cfg.out}")
    return result



# --- CLI ----------------------------------------------------------------------------------------------------


def int_list(text: str) -> list[int]:
    values = [int(x) for x in text.split(",") if x.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,2,4, got {text!r}")
    return values


def mode_list(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    unknown = set(modes) - set(MODES)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown mode(s) {', '.join(sorted(unknown))}; choose from {', '.join(MODES)}")
    return modes


def add_parser(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks: `bench serve` (capacity vs baseline, overhead, pipeline, soak), "
                                         "`bench report`, `bench perf-data` (perf_analyzer input)")
    bsub = bench.add_subparsers(dest="bench_command", required=True, metavar="{serve,report,perf-data}")
    p = bsub.add_parser("serve", help="real-time capacity of the server vs the in-process baseline, and more",
                        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu")
    p.add_argument("--streams", type=int_list, default=[1, 2, 4], help="concurrent streams per load point, e.g. 1,2,4")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of audio per stream at each load point")
    p.add_argument("--url", default=None, help="HOST:PORT of a running server's gRPC endpoint (default: start one)")
    p.add_argument("--metrics-url", default=None, help="its metrics endpoint (default http://HOST:8002/metrics)")
    p.add_argument("--jitter-buffer", type=float, default=0.2,
                   help="seconds the player buffers after the first chunk before playback starts (stall rule)")
    p.add_argument("--prometheus-port", type=int, default=None,
                   help="expose the load generator's view (TTFF, chunk latency, stalls per stream) on this port")
    p.add_argument("--prometheus-addr", default="127.0.0.1", help="address of that endpoint (loopback by default)")
    p.add_argument("--modes", type=mode_list, default=mode_list(DEFAULT_MODES), help=f"comma list of {', '.join(MODES)}")
    p.add_argument("--soak-minutes", type=float, default=0.0, help="also run the soak mode for this long")
    p.add_argument("--pipeline-streams", type=int_list, default=None,
                   help="streams per point of the overlap-vs-serial mode (default: min and max of --streams)")
    p.add_argument("--onnx-dir", type=Path, default=None, help="ONNX export root (default artifacts/PRESET/onnx)")
    p.add_argument("--work-dir", type=Path, default=Path("artifacts/bench"), help="repositories and server logs")
    p.add_argument("--max-in-flight", type=int, default=3, help="chunks a paced stream may have outstanding")
    p.add_argument("--grace", type=float, default=None, help="seconds a point waits past its last due chunk "
                                                             "(default max(5, duration / 4))")
    p.add_argument("--precision", choices=[p.value for p in CPU_PRECISIONS], default=None,
                   help="the server's networks (default: the preset's, as `flowact serve`)")
    p.add_argument("--engine-threads", type=int, default=2, help="ONNX Runtime threads per engine (server and overhead)")
    p.add_argument("--device", default="cpu", help="device of the in-process PyTorch baseline (cpu, cuda)")
    p.add_argument("--baseline-threads", type=int, default=None,
                   help="torch threads per baseline worker (default: try cores // N and 1, keep the better)")
    p.add_argument("--repeat", type=int, default=1,
                   help="attempts per N on each side, interleaved; the best is kept (noisy shared machines)")
    p.add_argument("--out", type=Path, default=None,
                   help="results JSON; plots go beside it (default runs/serve-PRESET-TIMESTAMP/serve_PRESET.json)")
    p.add_argument("--publish", action="store_true",
                   help="write to the published benchmarks/results/serve_PRESET.json (merged with its other sections) "
                        "and regenerate the table in benchmarks/README.md")
    p.add_argument("--no-report", action="store_true", help="do not draw the plots (nor, with --publish, the README table)")
    p.set_defaults(func=_serve)

    r = bsub.add_parser("report", help="redraw the plots and the README results table from the results JSON files")
    r.add_argument("--results", type=Path, default=RESULTS)
    r.add_argument("--readme", type=Path, default=README)
    r.set_defaults(func=_report)

    from flowact.benchmarks import perf_data

    perf_data.add_parser(bsub)


def _stop_on_sigterm() -> None:
    """SIGTERM (a job runner, `kill`) unwinds like Ctrl-C, so the servers this run started are stopped."""
    import signal

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


def _serve(args) -> int:
    if args.publish and args.out is not None:
        raise SystemExit("--publish writes benchmarks/results/serve_PRESET.json: drop --out")
    _stop_on_sigterm()
    modes = list(args.modes)
    if args.soak_minutes > 0 and "soak" not in modes:
        modes.append("soak")
    if "soak" in modes and args.soak_minutes <= 0:
        raise SystemExit("--modes soak needs --soak-minutes")
    cfg = BenchConfig(preset=args.preset, streams=args.streams, duration_s=args.duration, modes=modes,
                      jitter_buffer=args.jitter_buffer, url=args.url, metrics_url=args.metrics_url,
                      prometheus_port=args.prometheus_port, prometheus_addr=args.prometheus_addr,
                      soak_minutes=args.soak_minutes,
                      pipeline_streams=args.pipeline_streams or [], onnx_dir=args.onnx_dir, work_dir=args.work_dir,
                      out=RESULTS / f"serve_{args.preset}.json" if args.publish else args.out, max_in_flight=args.max_in_flight,
                      grace_s=args.grace if args.grace is not None else max(5.0, args.duration / 4),
                      engine_threads=args.engine_threads, device=args.device,
                      baseline_threads=args.baseline_threads, repeat=max(1, args.repeat), plots=not args.no_report,
                      precision=args.precision)
    result = run(cfg)
    s = result["summary"]
    say("summary: " + json.dumps(s))
    if cfg.plots:
        from flowact.benchmarks.report import plot, write_readme

        for png in plot(result, cfg.out.parent):
            say(f"wrote {png}")
        if args.publish:
            say(f"wrote {write_readme(RESULTS, README)}")
    say(f"results in {cfg.out}" + ("" if args.publish else " (not published; --publish writes benchmarks/results/ "
                                                             "and the README table)"))
    return 0


def _report(args) -> int:
    from flowact.benchmarks.report import plot, write_readme

    for path in sorted(args.results.glob("serve_*.json")):
        for png in plot(json.loads(path.read_text()), args.results):
            print(f"wrote {png}")
    print(f"wrote {write_readme(args.results, args.readme)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flowact")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
