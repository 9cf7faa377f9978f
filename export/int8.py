"""INT8 ONNX for CPU serving (`flowact export int8` -> ROOT/int8/), with ONNX Runtime's quantization tools.

Each network's spec says how it is quantized (`NetworkSpec.int8`, flowact.specs):
    dynamic  the transformers' linear layers (denoiser, memory pass): int8 per-channel weights, uint8
             activations quantized per call (MatMulInteger). Static QDQ was measured slower and less
             accurate on them (their activation ranges vary with the noise level and the stream).
    static   the VAE decoder's convolutions: QDQ, per-channel int8 weights, uint8 activations with
             ranges calibrated on the recorded streams the FP8 path calibrates on (QLinearConv).
    None     kept float32: the audio encoder, VAE encoder and text encoder run once per chunk or per
             stream on small inputs; int8 saves them a millisecond or loses accuracy.
Only linear layers (the MatMul / Gemm nodes that read a weight) are quantized in the transformers:
attention's activation x activation products stay float32. Each network's error vs float32 on
the calls of a second recording is written to the manifest.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import onnx

from flowact.export import graph
from flowact.export.calibrate import Recording, feeds, record_streams
from flowact.export.fp8 import linear_layers, network_error
from flowact.export.onnx import WeightSource, export_onnx, source_hash
from flowact.presets import Preset
from flowact.runtime.manifest import Manifest, Precision, digest
from flowact.specs import Int8, NetworkSpec, network_specs


def linear_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the MatMul / Gemm nodes that read a weight (the module's linear layers)."""
    weights = {layer.weight for layer in linear_layers(model)}
    return [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in weights]


def quantize_network(fp32_path: Path, out: Path, spec: NetworkSpec, calibration: Recording) -> dict:
    """Write `spec`'s int8 graph to `out` -> what was quantized."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_dynamic, quantize_static)

    if spec.int8 == Int8.DYNAMIC:
        nodes = linear_nodes(onnx.load(fp32_path, load_external_data=False))
        if not nodes:
            raise ValueError(f"{spec.name}: no linear layer found to quantize")
        # ONNX Runtime first rewrites a Gemm as "<name>_MatMul" + Add: name both, or that layer stays float
        quantize_dynamic(fp32_path, out, per_channel=True, weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul", "Gemm"], nodes_to_quantize=nodes + [f"{n}_MatMul" for n in nodes])
        return {"quantized": f"{len(nodes)} linear layers, dynamic"}

    class Calls(CalibrationDataReader):
        def __init__(self):
            self.calls = iter(calibration.calls[spec.name])

        def get_next(self):
            call = next(self.calls, None)
            return None if call is None else feeds(spec, call)

    quantize_static(fp32_path, out, Calls(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, op_types_to_quantize=["Conv"],
                    calibrate_method=CalibrationMethod.MinMax, extra_options={"ActivationSymmetric": False},
                    calibration_providers=["CPUExecutionProvider"])
    convs = sum(n.op_type == "Conv" for n in onnx.load(fp32_path).graph.node)
    return {"quantized": f"{convs} convolutions, static ({len(calibration.calls[spec.name])} calibration calls)"}


def export_int8(preset: Preset, out: str | Path, checkpoint: str | Path | None = None, seed: int = 0,
                streams: int = 4, chunks: int = 6, eval_calls: int = 8, say: Callable[[str], None] = print,
                source: WeightSource | None = None) -> dict[str, Path]:
    """ROOT/int8/: the float32 export (run first, idempotently) with each spec's int8 mode applied.

    Static ranges come from `streams` x `chunks` stream steps in PyTorch (every call recorded); the
    error vs float32 is measured in ONNX Runtime on the first `eval_calls` calls of a second
    recording (0: skip)."""
    source = source or WeightSource(preset, checkpoint, seed)
    fp32_files = export_onnx(preset, out, say=say, source=source)
    fp32_manifest = Manifest.load(Path(out) / Precision.FP32.value)
    directory = Path(out) / Precision.INT8.value
    directory.mkdir(parents=True, exist_ok=True)
    manifest = Manifest.open(directory, preset, Precision.INT8)
    code = source_hash(extra=[Path(__file__), Path(__file__).with_name("calibrate.py")])
    calibration = evaluation = None
    for name, spec in network_specs(preset).items():
        mode = spec.int8.value if spec.int8 else "fp32"
        key = digest("int8", fp32_manifest.networks[name]["sha256"], code, mode, streams, chunks, seed, eval_calls)
        file = directory / f"{name}.onnx"
        if manifest.up_to_date(name, key, directory, graph.model_hash):
            say(f"{name}: {file} is up to date, skipping")
            continue
        t0 = time.perf_counter()
        report: dict = {}
        if spec.int8 is None:
            graph.save_model(graph.load_model(fp32_files[name]), file)
        else:
            if calibration is None:
                say(f"recording calibration streams ({streams} streams x {chunks} chunks) ...")
                calibration = record_streams(preset, source.nets, streams, chunks, seed=seed + 1)
                evaluation = (record_streams(preset, source.nets, min(streams, 2), chunks, seed=seed + 2, keep=eval_calls)
                              if eval_calls else None)
            report = quantize_network(fp32_files[name], file, spec, calibration)
        error = network_error(fp32_files[name], file, spec, evaluation.calls[name]) if spec.int8 and evaluation else {}
        manifest.record(name, file.name, graph.model_hash(file), key, spec, mode,
                        source_onnx_sha256=fp32_manifest.networks[name]["sha256"], error_vs_fp32=error,
                        calibration={"streams": streams, "chunks": chunks, "seed": seed + 1}, **report)
        manifest.save(directory)
        detail = ", ".join(f"{k} {v:.3g}" for k, v in error.items())
        say(f"{name}: {mode} -> {file} in {time.perf_counter() - t0:.1f} s" + (f" (vs fp32: {detail})" if detail else ""))
    manifest.save(directory)
    return {name: manifest.path(directory, name) for name in network_specs(preset)}
