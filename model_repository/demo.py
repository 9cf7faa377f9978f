"""`flowact demo`: the main job end to end on one machine.

Builds the embedded model repository for the preset (ONNX export, first run only), starts the
embedded tritonserver in the background, streams the shipped reference image and speech through
it over gRPC into an MP4, prints the stream's summary and stops the server.
"""

from __future__ import annotations

from pathlib import Path

from flowact.client.cli import stream_file
from flowact.contract import ARTIFACTS_DIR, DEFAULT_GRPC_PORT, DEFAULT_HTTP_PORT, DEFAULT_METRICS_PORT
from flowact.media import REFERENCE_IMAGE, SPEECH_WAV
from flowact.networks import shipped_checkpoint
from flowact.presets import get_preset
from flowact.runtime.manifest import CPU_PRECISION_HELP, CPU_PRECISIONS
from flowact.serving.repository import RepositoryOptions, build_embedded_repository
from flowact.serving.server import TritonServer


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="serve the preset, stream the shipped samples into an MP4, stop")
    p.add_argument("--preset", default="cpu")
    p.add_argument("--checkpoint", default=None, help="default: checkpoints/<preset> if shipped, else random weights")
    p.add_argument("--out", default="out.mp4")
    p.add_argument("--precision", choices=[p.value for p in CPU_PRECISIONS], default=None,
                   help=CPU_PRECISION_HELP)
    p.add_argument("--realtime", action="store_true", help="pace the audio at real time")
    p.add_argument("--grpc-port", type=int, default=DEFAULT_GRPC_PORT)
    p.add_argument("--http-port", type=int, default=DEFAULT_HTTP_PORT)
    p.add_argument("--metrics-port", type=int, default=DEFAULT_METRICS_PORT)
    p.set_defaults(func=_run)


def _run(args) -> int:
    preset = get_preset(args.preset)
    checkpoint = args.checkpoint or shipped_checkpoint(preset.name)
    print(f"weights: {checkpoint or 'seeded random (no trained checkpoint for this preset)'}", flush=True)
    artifacts = Path(ARTIFACTS_DIR)
    repo = build_embedded_repository(preset.name, artifacts / preset.name / "repository", checkpoint,
                                     RepositoryOptions(), precision=args.precision)
    print(f"starting tritonserver (preset {preset.name}) ...", flush=True)
    with TritonServer(repo, args.grpc_port, args.http_port, args.metrics_port, work_dir=artifacts / "triton") as server:
        print(f"serving on {server.host}:{server.grpc_port}; streaming {REFERENCE_IMAGE.name} + {SPEECH_WAV.name}", flush=True)
        summary = stream_file(f"{server.host}:{server.grpc_port}", REFERENCE_IMAGE, SPEECH_WAV, args.out,
                              preset.height, preset.width, realtime=args.realtime)
    print(f"server stopped\nwrote {args.out}\n{summary.lines()}")
    return 0
