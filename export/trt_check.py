"""A CPU-side check that flags ONNX ops and patterns TensorRT 10's ONNX parser would reject.

Run before a GPU ever sees the graph (`flowact export trt` runs it first; `flowact export check`
runs it alone). Rules come from onnx-tensorrt's operator support matrix for TensorRT 10 and
TensorRT's quantized-type rules:
- opset: TensorRT 10.0 parses opsets 9..20 (later 10.x parsers go further; 20 is the safe ceiling);
- only standard-domain operators of the support matrix (no contrib/custom domains);
- UINT8 only as network input/output converted by a Cast; FP8/INT8/INT4 only through Q/DQ;
  no STRING tensors; DOUBLE is cast down (warning);
- Q/DQ: zero points zero, scales constant, activation (non-constant) quantization per-tensor,
  FP8 as e4m3fn only;
- `axes`-style inputs that must be build-time constants; Resize/Pad modes; only `batch` may be
  symbolic in the network inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from flowact.export import graph
from flowact.specs import BATCH, NetworkSpec

MIN_OPSET, MAX_OPSET = 9, 20

# Operators with "Y" in onnx-tensorrt's docs/operators.md (TensorRT 10). Ops introduced after opset 20
# (Attention, RMSNormalization, RotaryEmbedding, TensorScatter) are rejected by the opset ceiling.
SUPPORTED_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization BlackmanWindow Cast
CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv DepthToSpace
DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND
Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample GroupNormalization GRU
HammingWindow HannWindow HardSigmoid HardSwish Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN
LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max
MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad
ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range
Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum
ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign Round STFT ScaledTanh Scan Scatter
ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign
SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample
Where Xor
""".split())

QUANTIZED_TYPES = {TensorProto.FLOAT8E4M3FN, TensorProto.INT8, TensorProto.INT4}
FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16}
# (op, input index) that must be build-time constants
_REDUCE = ("L1", "L2", "LogSum", "LogSumExp", "Max", "Mean", "Min", "Prod", "Sum", "SumSquare")
CONSTANT_INPUTS = {("Squeeze", 1), ("Unsqueeze", 1), ("CumSum", 1), ("TopK", 1), ("OneHot", 1)} | {
    (f"Reduce{r}", 1) for r in _REDUCE}
RESIZE_MODES = {"nearest", "linear"}
RESIZE_TRANSFORMS = {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"}
RESIZE_NEAREST = {"floor", "ceil", "round_prefer_floor", "round_prefer_ceil"}
PAD_MODES = {"constant", "reflect", "edge", "wrap"}


@dataclass(frozen=True)
class Finding:
    severity: str  # "error": the parser or builder would reject it; "warning": accepted with a caveat
    where: str  # node name or tensor name
    message: str

    def __str__(self) -> str:
        return f"{self.severity}: {self.where}: {self.message}"


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            v = onnx.helper.get_attribute_value(a)
            return v.decode() if isinstance(v, bytes) else v
    return default


def check_tensorrt_compat(model: onnx.ModelProto, spec: NetworkSpec | None = None) -> list[Finding]:
    """Everything in `model` TensorRT 10's ONNX parser/builder would reject (errors) or degrade (warnings).

    Works on a model loaded without its external weights; initializer values are read when present."""
    out: list[Finding] = []
    g = model.graph
    opset = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    v = opset.get("ai.onnx")
    if v is None or not MIN_OPSET <= v <= MAX_OPSET:
        out.append(Finding("error", "model", f"opset {v}: TensorRT 10 parsers accept opset {MIN_OPSET}..{MAX_OPSET}"))
    try:
        model = graph.infer_shapes(_copy(model), strict=False)
    except Exception as e:  # unknown domains or broken graphs: check what is typed
        out.append(Finding("warning", "model", f"shape inference failed ({str(e).splitlines()[0][:200]})"))
    g = model.graph
    types = graph.tensor_types(model)
    inits = {t.name: t for t in g.initializer}
    constants = set(inits) | {n.output[0] for n in g.node if n.op_type == "Constant"}
    uses = graph.consumers(model)
    prod = graph.producers(model)
    io = {x.name for x in g.input} | {x.name for x in g.output}

    for n in g.node:
        where = n.name or n.op_type
        if n.domain not in ("", "ai.onnx"):
            out.append(Finding("error", where, f"operator {n.domain}::{n.op_type} is outside the standard ONNX domain"))
            continue
        if n.op_type not in SUPPORTED_OPS:
            out.append(Finding("error", where, f"operator {n.op_type} is not supported by TensorRT's ONNX parser"))
        for i, name in enumerate(n.input):
            if name and (n.op_type, i) in CONSTANT_INPUTS and name not in constants:
                out.append(Finding("error", where, f"{n.op_type} input {i} ({name}) must be a build-time constant"))
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            out += _check_qdq(n, where, inits, constants, types)
        if n.op_type == "Resize":
            mode, ctm = _attr(n, "mode", "nearest"), _attr(n, "coordinate_transformation_mode", "half_pixel")
            if mode not in RESIZE_MODES:
                out.append(Finding("error", where, f"Resize mode {mode!r} (TensorRT: nearest, linear)"))
            if ctm not in RESIZE_TRANSFORMS:
                out.append(Finding("error", where, f"Resize coordinate_transformation_mode {ctm!r}"))
            if mode == "nearest" and _attr(n, "nearest_mode", "round_prefer_floor") not in RESIZE_NEAREST:
                out.append(Finding("error", where, f"Resize nearest_mode {_attr(n, 'nearest_mode')!r}"))
            if _attr(n, "antialias", 0):
                out.append(Finding("error", where, "Resize antialias is not supported"))
        if n.op_type == "Pad" and _attr(n, "mode", "constant") not in PAD_MODES:
            out.append(Finding("error", where, f"Pad mode {_attr(n, 'mode')!r}"))
        if n.op_type == "LayerNormalization" and any(o for o in n.output[1:]):
            out.append(Finding("error", where, "LayerNormalization: only the first output is supported"))
        if n.op_type == "MaxPool" and len(n.output) > 1 and n.output[1]:
            out.append(Finding("error", where, "MaxPool Indices output is not supported"))
        if n.op_type == "TopK" and _attr(n, "sorted", 1) != 1:
            out.append(Finding("error", where, "TopK must be sorted"))
        if n.op_type in ("MatMul", "Gemm", "Conv", "ConvTranspose"):
            for name in n.input[:2]:
                if name and types.get(name) not in FLOAT_TYPES and name in types:
                    out.append(Finding("error", where, f"{n.op_type} on {TensorProto.DataType.Name(types[name])} "
                                                       f"input {name} (TensorRT: FP32/FP16/BF16, or FP8/INT8 via Q/DQ)"))

    for name, t in types.items():
        if t == TensorProto.STRING:
            out.append(Finding("error", name, "STRING tensors are not supported"))
        elif t == TensorProto.DOUBLE:
            out.append(Finding("warning", name, "DOUBLE is cast down to FLOAT by TensorRT"))
        elif t == TensorProto.UINT8:
            readers = [r for r, _ in uses.get(name, [])]
            writer = prod.get(name)
            ok = name in io and all(r.op_type in ("Cast", "CastLike") for r in readers) and (
                writer is None or writer.op_type in ("Cast", "CastLike"))
            if not ok:
                what = ", ".join(sorted({r.op_type for r in readers} | ({writer.op_type} if writer else set())))
                out.append(Finding("error", name, f"UINT8 is only supported as network I/O converted by Cast "
                                                  f"(used by {what or 'nothing'})"))
        elif t in QUANTIZED_TYPES | {TensorProto.FLOAT8E5M2, TensorProto.FLOAT8E4M3FNUZ, TensorProto.FLOAT8E5M2FNUZ}:
            if t != TensorProto.FLOAT8E4M3FN and t not in (TensorProto.INT8, TensorProto.INT4):
                out.append(Finding("error", name, f"{TensorProto.DataType.Name(t)}: TensorRT's FP8 is e4m3fn"))
            writer = prod.get(name)
            # allowed: DequantizeLinear inputs, QuantizeLinear zero points
            bad = [r.op_type for r, i in uses.get(name, [])
                   if not (r.op_type == "DequantizeLinear" or (r.op_type == "QuantizeLinear" and i == 2))]
            if bad or (writer is not None and writer.op_type not in ("QuantizeLinear", "Constant")):
                out.append(Finding("error", name, f"{TensorProto.DataType.Name(t)} tensors may only flow from "
                                                  f"QuantizeLinear to DequantizeLinear (read by {', '.join(bad) or '-'})"))
            if name in io:
                out.append(Finding("error", name, "quantized types cannot be network I/O"))

    if spec is not None:
        by_name = {x.name: x for x in g.input}
        for t in spec.inputs:
            x = by_name.get(t.name)
            if x is None:
                out.append(Finding("error", t.name, "spec input missing from the graph"))
                continue
            dims = [d.dim_param or d.dim_value for d in x.type.tensor_type.shape.dim]
            symbolic = [d for d in dims if isinstance(d, str) and d != BATCH]
            if symbolic or dims != list(t.dims):
                out.append(Finding("error", t.name, f"dims {dims} differ from the spec's {list(t.dims)} "
                                                    "(optimisation profiles cover only the batch dim)"))
    return out


def _check_qdq(n, where, inits, constants, types) -> list[Finding]:
    out = []
    scale = n.input[1]
    if scale not in constants:
        out.append(Finding("error", where, f"{n.op_type} scale {scale} must be a constant"))
    if len(n.input) > 2 and n.input[2]:
        zp = n.input[2]
        if zp not in constants:
            out.append(Finding("error", where, f"{n.op_type} zero point must be a constant"))
        elif zp in inits and _has_data(inits[zp]) and np.any(numpy_helper.to_array(inits[zp]).astype(np.float32) != 0):
            out.append(Finding("error", where, f"{n.op_type} zero point must be zero"))
    if _attr(n, "block_size", 0) and types.get(n.input[0] if n.op_type == "DequantizeLinear" else n.output[0]) != TensorProto.INT4:
        out.append(Finding("error", where, "blocked quantization is only supported for INT4 weights"))
    if n.op_type == "QuantizeLinear":
        if n.input[0] not in inits and scale in inits and _numel(inits[scale]) != 1:
            out.append(Finding("error", where, "activations must be quantized per-tensor (scalar scale)"))
        if _attr(n, "saturate", 1) == 0:
            out.append(Finding("warning", where, "saturate=0: TensorRT always saturates FP8"))
    return out


def _numel(t: onnx.TensorProto) -> int:
    return int(np.prod(t.dims)) if t.dims else 1


def _has_data(t: onnx.TensorProto) -> bool:
    return t.data_location != TensorProto.EXTERNAL


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    return m


def errors(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.severity == "error"]
