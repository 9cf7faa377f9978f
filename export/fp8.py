"""FP8 (float8 e4m3fn) Q/DQ for the transformer networks; FP16 or weight-only FP8 for the VAE.

The inserter works on the float32 ONNX graphs with onnx + ml_dtypes, no NVIDIA package:
- every MatMul/Gemm whose weight is an initializer and whose module path matches the network's
  `QuantPolicy` gets a per-tensor Q/DQ pair on its activation input (scale = calibrated amax /
  448) and a per-output-channel DequantizeLinear on its FP8 weight; this is the explicit
  quantization pattern TensorRT fuses into FP8 GEMMs;
- everything else stays in high precision: timestep/adaLN modulation, embeddings (patch, audio,
  prompt), the final projection, norms, softmax and the attention matmuls, and the log-mel front end.
Activation amax comes from real streams run through the PyTorch networks (`calibrate.record_streams`,
on CPU or a GPU), matched to the graph's MatMuls by module path.

VAE (`VaeMode`): FP16 compute with float32 norm statistics (default), or weight-only FP8
(per-output-channel DequantizeLinear on conv weights, float32 compute). The VAE is conv-bound with
small weights, so FP8 weights buy little memory and no compute, while FP16 halves activation
traffic and runs on tensor cores; both errors are measured (`flowact export fp8` records them in
the manifest, benchmarks/export_bench.py prints them).
"""

from __future__ import annotations

import ast
import re
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Callable

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from flowact.export import graph
from flowact.export.calibrate import Recording, feeds, record_streams
from flowact.runtime.manifest import Manifest, Precision, digest
from flowact.export.onnx import WeightSource, export_onnx, source_hash
from flowact.networks import Networks
from flowact.presets import Preset
from flowact.specs import NetworkSpec, network_specs
from flowact.stats import psnr_db

FP8_MAX = 448.0  # largest finite float8 e4m3fn
FP8 = TensorProto.FLOAT8E4M3FN


class VaeMode(str, Enum):
    FP16 = "fp16"  # FP16 compute, norms in float32
    FP8_WEIGHTS = "fp8-weights"  # FP8 conv weights (per output channel), float32 compute


@dataclass(frozen=True)
class QuantPolicy:
    """Which linear layers run in FP8, by module path (regex search on the exporter's name scope)."""

    quantize: tuple[str, ...]  # module paths whose MatMul/Gemm get FP8
    keep: tuple[str, ...]  # module paths that must stay high precision (checked: never quantized)

    def decide(self, path: str) -> bool:
        if any(re.search(p, path) for p in self.keep):
            return False
        return any(re.search(p, path) for p in self.quantize)


_DIT = QuantPolicy(
    quantize=(r"blocks\.\d+\.(video|cond)\.(qkv|proj|mlp\.0|mlp\.2)$",),
    keep=(r"modulation$", r"t_embed", r"x_embed", r"audio_embed", r"prompt_embed", r"prompt_pool", r"final"),
)
POLICIES: dict[str, QuantPolicy] = {
    "denoiser": _DIT,
    "denoiser_memory": _DIT,
    "audio_encoder": QuantPolicy(
        quantize=(r"layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|fc1|fc2)$",),
        keep=(r"log_mel", r"conv\d", r"embed_positions", r"layer_norm"),
    ),
}
FP8_NETWORKS = tuple(POLICIES)
VAE_NETWORKS = ("vae_encoder", "vae_decoder")


# --- locating layers ----------------------------------------------------------------------------------


def module_path(node: onnx.NodeProto) -> str:
    """The PyTorch module path of a node from the dynamo exporter's metadata ('' if unknown)."""
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            scopes = [s for s in ast.literal_eval(p.value) if s]
            return scopes[-2] if len(scopes) >= 2 else ""
    return ""


@dataclass(frozen=True)
class Linear:
    node: str  # node name
    op: str  # MatMul | Gemm
    path: str  # module path
    activation: str  # input tensor
    weight: str  # initializer
    channel_axis: int  # output-channel axis of the weight


def linear_layers(model: onnx.ModelProto) -> list[Linear]:
    """MatMul/Gemm nodes whose second input is a 2-D initializer (the Linear layers)."""
    inits = {t.name: t for t in model.graph.initializer}
    out = []
    for n in model.graph.node:
        if n.op_type not in ("MatMul", "Gemm") or len(n.input) < 2 or n.input[1] not in inits:
            continue
        if len(inits[n.input[1]].dims) != 2:
            continue
        trans_b = any(a.name == "transB" and a.i for a in n.attribute)
        if n.op_type == "Gemm" and any(a.name == "transA" and a.i for a in n.attribute):
            continue
        out.append(Linear(n.name, n.op_type, module_path(n), n.input[0], n.input[1], 0 if trans_b else 1))
    return out


# --- Q/DQ insertion -------------------------------------------------------------------------------------


def quantize_weight(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel FP8: w (K, N) or (N, K) -> (fp8 weights, float32 scales along `axis`)."""
    reduce = tuple(i for i in range(w.ndim) if i != axis)
    amax = np.abs(w).max(axis=reduce)
    scale = np.where(amax > 0, amax / FP8_MAX, 1.0).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = (w / scale.reshape(shape)).astype(ml_dtypes.float8_e4m3fn)
    return q, scale


def insert_fp8(model: onnx.ModelProto, policy: QuantPolicy, amax: dict[str, float]) -> tuple[onnx.ModelProto, dict]:
    """FP8 Q/DQ on the policy's linear layers. Returns the model and a report of what was done."""
    g = model.graph
    taken = graph.all_names(model)
    inits = {t.name: t for t in g.initializer}
    nodes = {n.name: n for n in g.node}
    zero = numpy_helper.from_array(np.array(0, dtype=ml_dtypes.float8_e4m3fn), graph.unique_name(taken, "fp8_zero"))
    g.initializer.append(zero)
    new_nodes, act_dq, weight_dq = [], {}, {}
    quantized, kept = [], []
    for layer in linear_layers(model):
        if not policy.decide(layer.path):
            kept.append(layer.path or layer.node)
            continue
        node = nodes[layer.node]
        if layer.activation not in act_dq:  # one Q/DQ per activation tensor, shared by its quantized readers
            scale_name = graph.unique_name(taken, f"{layer.activation}_fp8_scale")
            scale = max(amax[layer.activation], 1e-12) / FP8_MAX
            g.initializer.append(numpy_helper.from_array(np.array(scale, np.float32), scale_name))
            q = graph.unique_name(taken, f"{layer.activation}_fp8")
            dq = graph.unique_name(taken, f"{layer.activation}_fp8_dq")
            new_nodes += [helper.make_node("QuantizeLinear", [layer.activation, scale_name, zero.name], [q],
                                           name=graph.unique_name(taken, "quantize_" + layer.activation)),
                          helper.make_node("DequantizeLinear", [q, scale_name, zero.name], [dq],
                                           name=graph.unique_name(taken, "dequantize_" + layer.activation))]
            act_dq[layer.activation] = dq
        if layer.weight not in weight_dq:
            w = numpy_helper.to_array(inits[layer.weight]).astype(np.float32)
            wq, ws = quantize_weight(w, layer.channel_axis)
            wq_name = graph.unique_name(taken, f"{layer.weight}_fp8")
            ws_name = graph.unique_name(taken, f"{layer.weight}_fp8_scale")
            g.initializer.extend([numpy_helper.from_array(wq, wq_name), numpy_helper.from_array(ws, ws_name)])
            dq = graph.unique_name(taken, f"{layer.weight}_dq")
            new_nodes.append(helper.make_node("DequantizeLinear", [wq_name, ws_name], [dq], axis=layer.channel_axis,
                                              name=graph.unique_name(taken, "dequantize_" + layer.weight)))
            weight_dq[layer.weight] = dq
        node.input[0] = act_dq[layer.activation]
        node.input[1] = weight_dq[layer.weight]
        quantized.append(layer.path)
    # float32 weights nobody reads any more
    still_used = {i for n in g.node for i in n.input} | {i for n in new_nodes for i in n.input}
    for name in weight_dq:
        if name not in still_used:
            g.initializer.remove(inits[name])
    g.node.extend(new_nodes)
    graph.rebuild_order(model)
    model = graph.infer_shapes(model)
    report = {"quantized": quantized, "kept_high_precision": kept,
              "activation_amax": {act_dq[a]: amax[a] for a in act_dq}}
    return model, report


def fp8_weight_only_convs(model: onnx.ModelProto) -> onnx.ModelProto:
    """Conv weights stored FP8 (per output channel) behind a DequantizeLinear; compute stays float32."""
    g = model.graph
    taken = graph.all_names(model)
    inits = {t.name: t for t in g.initializer}
    new_nodes, done = [], {}
    for n in g.node:
        if n.op_type != "Conv" or n.input[1] not in inits:
            continue
        name = n.input[1]
        if name not in done:
            wq, ws = quantize_weight(numpy_helper.to_array(inits[name]).astype(np.float32), axis=0)
            wq_name, ws_name = graph.unique_name(taken, name + "_fp8"), graph.unique_name(taken, name + "_fp8_scale")
            g.initializer.extend([numpy_helper.from_array(wq, wq_name), numpy_helper.from_array(ws, ws_name)])
            done[name] = graph.unique_name(taken, name + "_dq")
            new_nodes.append(helper.make_node("DequantizeLinear", [wq_name, ws_name], [done[name]], axis=0,
                                              name=graph.unique_name(taken, "dequantize_" + name)))
            g.initializer.remove(inits[name])
        n.input[1] = done[name]
    g.node.extend(new_nodes)
    graph.rebuild_order(model)
    return graph.infer_shapes(model)


# --- error measurement ----------------------------------------------------------------------------------


def compare(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """Error of `got` against `ref`: max/mean abs, relative L2 (float) or PSNR (uint8)."""
    d = got.astype(np.float64) - ref.astype(np.float64)
    out = {"max_abs": float(np.abs(d).max()), "mean_abs": float(np.abs(d).mean())}
    if ref.dtype == np.uint8:
        out["psnr_db"] = psnr_db(float((d ** 2).mean()))
    else:
        out["rel_l2"] = float(np.linalg.norm(d) / max(np.linalg.norm(ref.astype(np.float64)), 1e-30))
    return out


def network_error(reference: str | Path | onnx.ModelProto, candidate: str | Path | onnx.ModelProto, spec: NetworkSpec,
                  calls: list[tuple[np.ndarray, ...]]) -> dict[str, float]:
    """Worst-case error of `candidate` vs `reference` over recorded calls (both run in ONNX Runtime)."""
    import torch

    from flowact.runtime.onnx import ort_session

    def session(m):  # the caller's torch thread budget
        return ort_session(m.SerializeToString() if isinstance(m, onnx.ModelProto) else m, torch.get_num_threads())

    a, b = session(reference), session(candidate)
    worst: dict[str, float] = {}
    for call in calls:
        f = feeds(spec, call)
        err = compare(a.run(None, f)[0], b.run(None, f)[0])
        for k, v in err.items():
            worst[k] = min(worst.get(k, v), v) if k == "psnr_db" else max(worst.get(k, v), v)
    return worst


# --- the `flowact export fp8` step ----------------------------------------------------------------------


def quantize_network(fp32: onnx.ModelProto, spec: NetworkSpec, calibration: Recording) -> tuple[onnx.ModelProto, dict]:
    """FP8 Q/DQ on `spec`'s float32 graph with activation amax from the PyTorch calibration run."""
    policy = POLICIES[spec.name]
    layers = [l for l in linear_layers(fp32) if policy.decide(l.path)]
    if not layers:
        raise ValueError(f"{spec.name}: the quantization policy matched no linear layer (module paths lost?)")
    seen = calibration.amax[spec.name]
    amax: dict[str, float] = {}
    for layer in layers:
        path = torch_path(layer.path, spec)
        if path not in seen:
            raise ValueError(f"{spec.name}: no calibration amax for {layer.path} (torch module {path!r} never ran)")
        amax[layer.activation] = max(amax.get(layer.activation, 0.0), seen[path])
    return insert_fp8(fp32, policy, amax)


def torch_path(onnx_path: str, spec: NetworkSpec) -> str:
    """Module path in the exported graph -> path inside the owning network (the wrapper's prefix removed)."""
    return onnx_path.split(".", 1)[1] if spec.method != "forward" else onnx_path


def export_fp8(preset: Preset, out: str | Path, checkpoint: str | Path | None = None, seed: int = 0,
               vae: VaeMode | str = VaeMode.FP16, streams: int = 4, chunks: int = 6, eval_calls: int | None = 8,
               device: str = "cpu", say: Callable[[str], None] = print, nets: Networks | None = None,
               source: WeightSource | None = None) -> dict[str, Path]:
    """ROOT/fp8/: FP8 Q/DQ transformers, FP16 (or FP8-weight) VAE, float32 text encoder.

    Runs (idempotently) the float32 export first. Activation scales come from `streams` x `chunks`
    stream steps run in PyTorch on `device`; each network's error vs float32 is measured in ONNX
    Runtime on the first `eval_calls` calls of a second recording (0: skip; a r1-480p denoiser call
    costs tens of seconds on CPU)."""
    vae = VaeMode(vae)
    source = source or WeightSource(preset, checkpoint, seed, nets)
    fp32_files = export_onnx(preset, out, say=say, source=source)
    fp32_dir = Path(out) / Precision.FP32.value
    fp32_manifest = Manifest.load(fp32_dir)
    directory = Path(out) / Precision.FP8.value
    directory.mkdir(parents=True, exist_ok=True)
    manifest = Manifest.open(directory, preset, Precision.FP8)
    code = source_hash(extra=[Path(__file__), Path(__file__).with_name("calibrate.py")])
    specs = network_specs(preset)
    calibration = evaluation = None
    for name, spec in specs.items():
        mode = "fp8" if name in FP8_NETWORKS else vae.value if name in VAE_NETWORKS else "fp32"
        key = digest("fp8", fp32_manifest.networks[name]["sha256"], code, mode, streams, chunks, seed, eval_calls)
        file = f"{name}.onnx"
        if manifest.up_to_date(name, key, directory, graph.model_hash):
            say(f"{name}: {directory / file} is up to date, skipping")
            continue
        t0 = time.perf_counter()
        if calibration is None:
            say(f"recording calibration streams ({streams} streams x {chunks} chunks on {device}) ...")
            calibration = record_streams(preset, source.nets, streams, chunks, seed=seed + 1, keep=0, device=device)
            evaluation = record_streams(preset, source.nets, min(streams, 2), chunks, seed=seed + 2,
                                        keep=eval_calls, device=device) if eval_calls != 0 else None
        fp32 = graph.load_model(fp32_files[name])
        extra: dict = {}
        if mode == "fp8":
            model, report = quantize_network(fp32, spec, calibration)
            extra = {"quantized_layers": len(report["quantized"]), "kept_high_precision": report["kept_high_precision"]}
        elif mode == VaeMode.FP16.value:
            model = graph.to_half(fp32, "float16")
        elif mode == VaeMode.FP8_WEIGHTS.value:
            model = fp8_weight_only_convs(fp32)
        else:
            model = fp32
        graph.save_model(model, directory / file)
        error = {}
        if mode != "fp32" and evaluation is not None:
            error = network_error(fp32_files[name], directory / file, spec, evaluation.calls[name])
        manifest.record(name, file, graph.model_hash(directory / file), key, spec, mode,
                        source_onnx_sha256=fp32_manifest.networks[name]["sha256"], error_vs_fp32=error,
                        calibration={"streams": streams, "chunks": chunks, "seed": seed + 1, "device": device},
                        **extra)
        manifest.save(directory)
        detail = ", ".join(f"{k} {v:.3g}" for k, v in error.items())
        say(f"{name}: {mode} -> {directory / file} in {time.perf_counter() - t0:.1f} s" + (f" (vs fp32: {detail})" if detail else ""))
    manifest.save(directory)
    return {name: manifest.path(directory, name) for name in specs}
