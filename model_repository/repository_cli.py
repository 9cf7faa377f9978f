"""`flowact export`: the export steps of flowact.export.cli, plus `repository`, which renders them into
a Triton model repository (the serving package depends on the exporter, not the other way round).

    flowact export repository --preset P --target embedded|torch|trt --out DIR [--capacity N] [--device cuda:0]
                                                                    a Triton model repository (exports as needed)
"""

from __future__ import annotations

from pathlib import Path

from flowact.contract import ARTIFACTS_DIR, DEFAULT_CAPACITY, DEFAULT_IDLE_TTL_S
from flowact.export import cli as export_cli
from flowact.presets import get_preset
from flowact.runtime.manifest import CPU_PRECISION_HELP, CPU_PRECISIONS


def add_parser(sub) -> None:
    steps = export_cli.add_parser(sub)
    p = steps.add_parser("repository", help="a complete Triton model repository (exports what it needs)")
    export_cli.common(p, out_help="the model repository's directory")
    p.add_argument("--target", choices=["embedded", "torch", "trt"], default="embedded",
                   help="what the stream model runs the networks with, beside the per-stream state: embedded: ONNX "
                        "Runtime (CPU); torch: PyTorch (CUDA bf16 or CPU); trt: TensorRT plans")
    p.add_argument("--device", default=None,
                   help="the stream model's device, where the per-stream state and networks live: trt: cuda:N "
                        "(default cuda:0); torch: cuda:N or cpu (default cuda:0 where CUDA is visible, else cpu); "
                        "embedded: cpu")
    p.add_argument("--precision", choices=[p.value for p in CPU_PRECISIONS], default=None,
                   help="embedded: " + CPU_PRECISION_HELP)
    p.add_argument("--engines", type=Path, default=None,
                   help=f"export root for ONNX / plans (default {ARTIFACTS_DIR}/<preset>)")
    p.add_argument("--capacity", type=int, default=DEFAULT_CAPACITY, help="streams the server admits at once")
    p.add_argument("--idle-ttl", type=float, default=DEFAULT_IDLE_TTL_S, help="seconds before an idle stream is freed")
    p.add_argument("--pipeline", choices=["overlap", "serial"], default="overlap")
    p.set_defaults(func=_repository)


def _repository(args) -> int:
    from flowact.serving.repository import (Pipeline, RepositoryOptions, Target, build_embedded_repository,
                                            render_repository, target_device, target_precision)

    preset = get_preset(args.preset)
    try:  # before any export or engine build
        device = target_device(Target(args.target), args.device)
        target_precision(Target(args.target), preset.name, args.precision)
    except ValueError as e:
        print(f"flowact export repository: {e}")
        return 2
    opts = RepositoryOptions(capacity=args.capacity, idle_ttl_s=args.idle_ttl, pipeline=Pipeline(args.pipeline),
                             device=device)
    engines = args.engines or Path(ARTIFACTS_DIR) / preset.name
    if args.target == Target.EMBEDDED.value:
        repo = build_embedded_repository(preset.name, args.out, args.checkpoint, opts, engines, seed=args.seed,
                                         precision=args.precision)
    elif args.target == Target.TORCH.value:
        repo = render_repository(preset, Target.TORCH, args.out, opts=opts, checkpoint=args.checkpoint)
    else:
        from flowact.export.tensorrt import TensorRTUnavailable, build_trt

        try:
            plans = build_trt(preset, engines, checkpoint=args.checkpoint, seed=args.seed)
        except TensorRTUnavailable as e:
            print(f"flowact export repository --target trt: {e}")
            return 2
        repo = render_repository(preset, Target.TRT, args.out, plans, opts)
    print(f"model repository ready: {repo}")
    return 0
