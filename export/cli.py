"""`flowact export onnx|fp8|trt|check`: the export steps, each idempotent (current files are skipped).

    flowact export onnx  --preset P [--checkpoint DIR] --out ROOT   -> ROOT/fp32/
    flowact export fp8   --preset P [--checkpoint DIR] --out ROOT   -> ROOT/fp8/ (runs onnx first)
    flowact export int8  --preset P [--checkpoint DIR] --out ROOT   -> ROOT/int8/ (runs onnx first; CPU serving)
    flowact export trt   --preset P [--checkpoint DIR] --out ROOT   -> ROOT/trt-fp8/ (runs fp8 first; GPU + TensorRT)
    flowact export check --out ROOT [--precision fp8]               TensorRT parser check on CPU

`flowact export repository` renders a Triton model repository from these exports: the serving
package adds it to the steps (flowact.serving.repository_cli), since serving depends on export and
not the other way round.
"""

from __future__ import annotations

from pathlib import Path

from flowact.presets import PRESETS, get_preset


def common(p, out_help: str = "export root (fp32/, fp8/, trt-fp8/ below it)") -> None:
    """The arguments every step that builds from weights takes."""
    p.add_argument("--preset", required=True, choices=list(PRESETS))
    p.add_argument("--checkpoint", default=None, help="checkpoint directory (default: seeded random weights)")
    p.add_argument("--seed", type=int, default=0, help="weight seed when no checkpoint is given")
    p.add_argument("--out", required=True, type=Path, help=out_help)


def add_parser(sub):
    """The `export` command and its steps; -> the steps' subparsers (the serving package adds `repository`)."""
    parser = sub.add_parser("export", help="export the networks: ONNX, FP8 ONNX, TensorRT engines")
    steps = parser.add_subparsers(dest="step", required=True)

    p = steps.add_parser("onnx", help="float32 ONNX per network (opset 20, dynamic batch)")
    common(p)
    p.set_defaults(func=_onnx)

    p = steps.add_parser("fp8", help="FP8 Q/DQ ONNX (denoiser, audio encoder), FP16 VAE")
    common(p)
    p.add_argument("--vae", choices=["fp16", "fp8-weights"], default="fp16")
    p.add_argument("--streams", type=int, default=4, help="calibration streams")
    p.add_argument("--chunks", type=int, default=6, help="calibration chunks per stream")
    p.add_argument("--device", default="cpu", help="where the calibration streams run (cuda for r1-480p)")
    p.add_argument("--eval-calls", type=int, default=8,
                   help="recorded calls per network for the FP8-vs-fp32 error in ONNX Runtime (0: skip)")
    p.set_defaults(func=_fp8)

    p = steps.add_parser("int8", help="int8 ONNX for CPU serving (dynamic linear layers, static VAE decoder convs)")
    common(p)
    p.add_argument("--streams", type=int, default=4, help="calibration streams")
    p.add_argument("--chunks", type=int, default=6, help="calibration chunks per stream")
    p.add_argument("--eval-calls", type=int, default=8, help="recorded calls per network for the int8-vs-fp32 error (0: skip)")
    p.set_defaults(func=_int8)

    p = steps.add_parser("trt", help="TensorRT engines from the FP8 ONNX (needs a GPU and TensorRT 10)")
    common(p)
    p.add_argument("--high-precision", choices=["float16", "bfloat16"], default="float16")
    p.add_argument("--opt-level", type=int, default=3, help="TensorRT builder optimisation level (0-5)")
    p.set_defaults(func=_trt)

    p = steps.add_parser("check", help="flag ops/patterns TensorRT's ONNX parser would reject (runs on CPU)")
    p.add_argument("--out", required=True, type=Path, help="export root or precision directory")
    p.add_argument("--precision", choices=["fp32", "fp8"], default=None)
    p.set_defaults(func=_check)
    return steps


def _onnx(args) -> int:
    from flowact.export.onnx import export_onnx

    export_onnx(get_preset(args.preset), args.out, checkpoint=args.checkpoint, seed=args.seed)
    return 0


def _fp8(args) -> int:
    from flowact.export.fp8 import export_fp8

    export_fp8(get_preset(args.preset), args.out, checkpoint=args.checkpoint, seed=args.seed, vae=args.vae,
               streams=args.streams, chunks=args.chunks, eval_calls=args.eval_calls, device=args.device)
    return 0


def _int8(args) -> int:
    from flowact.export.int8 import export_int8

    export_int8(get_preset(args.preset), args.out, checkpoint=args.checkpoint, seed=args.seed, streams=args.streams,
                chunks=args.chunks, eval_calls=args.eval_calls)
    return 0


def _trt(args) -> int:
    from flowact.export.tensorrt import TensorRTUnavailable, build_trt

    try:
        build_trt(get_preset(args.preset), args.out, checkpoint=args.checkpoint, seed=args.seed,
                  high_precision=args.high_precision, opt_level=args.opt_level)
    except TensorRTUnavailable as e:
        print(f"flowact export trt: {e}")
        return 2
    return 0


def _check(args) -> int:
    from flowact.runtime.manifest import Manifest, resolve
    from flowact.export.tensorrt import tensorrt_onnx
    from flowact.export.trt_check import check_tensorrt_compat, errors
    from flowact.specs import network_specs

    directory = resolve(args.out, args.precision)
    manifest = Manifest.load(directory)
    specs = network_specs(get_preset(manifest.preset))
    failed = 0
    for name in manifest.networks:
        findings = check_tensorrt_compat(tensorrt_onnx(manifest.path(directory, name)), specs[name])
        status = "ok" if not errors(findings) else f"{len(errors(findings))} error(s)"
        print(f"{name}: {status}")
        for f in findings:
            print(f"  {f}")
        failed += bool(errors(findings))
    return 1 if failed else 0
