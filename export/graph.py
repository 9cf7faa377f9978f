"""ONNX graph utilities shared by the export steps: load/save (external data for big models),
hashing, uint8 I/O isolation (TensorRT accepts UINT8 only at network I/O through Cast), and a
float16/bfloat16 converter that keeps numerically fragile islands in float32.

Nothing here knows about the flowact networks; the callers pass names and policies.
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's 2 GB limit: bigger models keep weights beside the .onnx

FLOAT = TensorProto.FLOAT


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def model_files(path: str | Path) -> list[Path]:
    """The .onnx file and its external data file, if any."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    return [path, data] if data.exists() else [path]


def model_hash(path: str | Path) -> str:
    """sha256 over the .onnx file and its external data (one hash per model)."""
    h = hashlib.sha256()
    for f in model_files(path):
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def weights_bytes(model: onnx.ModelProto) -> int:
    """Bytes of initializer data held in memory (protobuf's ByteSize is unreliable past 2 GB)."""
    return sum(len(t.raw_data) or t.ByteSize() for t in model.graph.initializer)


def save_model(model: onnx.ModelProto, path: str | Path) -> None:
    """Write atomically; weights go to `<name>.onnx.data` when the model is too big for one protobuf."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    data = path.with_name(path.name + ".data")
    if weights_bytes(model) > EXTERNAL_DATA_BYTES:
        tmp_data = data.name + ".tmp"
        onnx.save_model(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=tmp_data, size_threshold=1024)
        # the .onnx names its data file: rewrite the location after the rename
        m = onnx.load(str(tmp), load_external_data=False)
        for t in m.graph.initializer:
            for e in t.external_data:
                if e.key == "location":
                    e.value = data.name
        os.replace(tmp.with_name(tmp_data), data)
        onnx.save_model(m, str(tmp))
    else:
        onnx.save_model(model, str(tmp))
        if data.exists():
            data.unlink()
    os.replace(tmp, path)


def load_model(path: str | Path, weights: bool = True) -> onnx.ModelProto:
    return onnx.load(str(path), load_external_data=weights)


def weightless(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy without the data of big initializers (names, dims and types kept): cheap to serialise and infer."""
    light = onnx.ModelProto()
    for f in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(light, f, getattr(model, f))
    light.opset_import.extend(model.opset_import)
    light.metadata_props.extend(model.metadata_props)
    light.functions.extend(model.functions)
    g, src = light.graph, model.graph
    g.name = src.name
    g.node.extend(src.node)
    g.input.extend(src.input)
    g.output.extend(src.output)
    g.value_info.extend(src.value_info)
    for t in src.initializer:  # big weights: type and shape only (inference reads values of small ones)
        if len(t.raw_data) > 65536:
            g.initializer.add(name=t.name, data_type=t.data_type, dims=t.dims)
        else:
            g.initializer.append(t)
    return light


def infer_shapes(model: onnx.ModelProto, strict: bool = True) -> onnx.ModelProto:
    """Fresh shape/type inference (stale value_info removed first). `strict=False` infers what it can.
    Big models are inferred on a weightless copy and get its value_info."""
    del model.graph.value_info[:]
    if weights_bytes(model) < EXTERNAL_DATA_BYTES:
        return onnx.shape_inference.infer_shapes(model, strict_mode=strict, data_prop=True)
    inferred = onnx.shape_inference.infer_shapes(weightless(model), strict_mode=strict, data_prop=True)
    model.graph.value_info.extend(inferred.graph.value_info)
    return model


def tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every typed tensor (inputs, outputs, value_info, initializers)."""
    types: dict[str, int] = {}
    g = model.graph
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        types[vi.name] = vi.type.tensor_type.elem_type
    for t in g.initializer:
        types[t.name] = t.data_type
    for n in g.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    types[n.output[0]] = a.t.data_type
    return types


def consumers(model: onnx.ModelProto) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
    uses: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
    for n in model.graph.node:
        for i, name in enumerate(n.input):
            if name:
                uses[name].append((n, i))
    return uses


def producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {out: n for n in model.graph.node for out in n.output}


def unique_name(taken: set[str], base: str) -> str:
    name, i = base, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    taken.add(name)
    return name


def all_names(model: onnx.ModelProto) -> set[str]:
    g = model.graph
    names = {n.name for n in g.node} | {t.name for t in g.initializer}
    names |= {x for n in g.node for x in (*n.input, *n.output)}
    return names | {v.name for v in (*g.input, *g.output)}


def rebuild_order(model: onnx.ModelProto) -> None:
    """Topologically sort the nodes (after inserting nodes out of order)."""
    g = model.graph
    ready = {v.name for v in g.input} | {t.name for t in g.initializer} | {""}
    pending = list(g.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        progressed = []
        rest = []
        for n in pending:
            (progressed if all(i in ready for i in n.input) else rest).append(n)
        if not progressed:
            raise ValueError(f"graph has a cycle or a missing input near node {rest[0].name}")
        for n in progressed:
            ready.update(n.output)
        ordered += progressed
        pending = rest
    del g.node[:]
    g.node.extend(ordered)


# --- uint8 I/O isolation ----------------------------------------------------------------------------

def isolate_uint8(model: onnx.ModelProto) -> onnx.ModelProto:
    """Make uint8 tensors appear only as graph inputs/outputs next to a Cast.

    TensorRT supports UINT8 only as network I/O converted by a Cast; exporters put layout ops
    (Transpose, Reshape) on the uint8 side. Layout ops are type-agnostic and uint8 <-> float32 is
    exact for 0..255, so the graph moves them to the float side: an input Cast right after each
    uint8 input, internal Casts to UINT8 become Casts to FLOAT, and one Cast to UINT8 ends each
    uint8 output. The result is bit-identical."""
    g = model.graph
    taken = all_names(model)
    uint8_inputs = [v for v in g.input if v.type.tensor_type.elem_type == TensorProto.UINT8]
    uint8_outputs = [v for v in g.output if v.type.tensor_type.elem_type == TensorProto.UINT8]
    if not uint8_inputs and not uint8_outputs:
        return model
    new_nodes = []
    for v in uint8_inputs:
        uses = consumers(model)[v.name]
        if all(n.op_type == "Cast" for n, _ in uses):
            continue
        f = unique_name(taken, v.name + "_f32")
        for n, i in uses:
            n.input[i] = f
        new_nodes.append(helper.make_node("Cast", [v.name], [f], to=FLOAT, name=unique_name(taken, "cast_" + f)))
    g.node.extend(new_nodes)  # rebuild_order puts them first
    output_names = {v.name for v in uint8_outputs}
    prod = producers(model)
    for n in g.node:
        if n.op_type == "Cast" and n.output[0] not in output_names:
            to = next(a for a in n.attribute if a.name == "to")
            if to.i == TensorProto.UINT8:
                to.i = FLOAT
    for v in uint8_outputs:
        p = prod[v.name]
        if p.op_type == "Cast":
            continue
        inner = unique_name(taken, v.name + "_f32")
        p.output[list(p.output).index(v.name)] = inner
        g.node.append(helper.make_node("Cast", [inner], [v.name], to=TensorProto.UINT8,
                                       name=unique_name(taken, "cast_" + v.name)))
    rebuild_order(model)
    return infer_shapes(model)


# --- float16 / bfloat16 conversion ------------------------------------------------------------------

# numerically fragile ops that stay float32 inside a half-precision graph (norm statistics)
KEEP_FLOAT32_OPS = frozenset({"LayerNormalization", "InstanceNormalization", "GroupNormalization",
                              "RMSNormalization", "ReduceMean", "Pow", "Sqrt", "Reciprocal"})
# ops whose whole input cone stays float32: sinusoidal timestep embeddings (cos(1000 t) needs float32
# arguments) and the log-mel front end (power spectra, 1e-10 clamp, log)
KEEP_FLOAT32_CONES = frozenset({"Cos", "Sin", "Log"})
# (op, input index) slots that must stay float32 whatever the graph's precision
FLOAT32_SLOTS = {("Resize", 1), ("Resize", 2)}

HALF_TYPES = {"float16": (TensorProto.FLOAT16, np.float16), "bfloat16": (TensorProto.BFLOAT16, None)}


def _half_array(array: np.ndarray, elem: int) -> onnx.TensorProto:
    if elem == TensorProto.FLOAT16:
        return numpy_helper.from_array(np.clip(array, -65504, 65504).astype(np.float16))
    import ml_dtypes

    return numpy_helper.from_array(array.astype(ml_dtypes.bfloat16))


def float32_cone(model: onnx.ModelProto, roots: frozenset[str] = KEEP_FLOAT32_CONES) -> set[str]:
    """Names of the nodes that feed (transitively) a node whose op is in `roots`, roots included."""
    prod = producers(model)
    keep: set[str] = set()
    stack = [n for n in model.graph.node if n.op_type in roots]
    while stack:
        n = stack.pop()
        if n.name in keep:
            continue
        keep.add(n.name)
        stack += [prod[i] for i in n.input if i in prod]
    return keep


def to_half(model: onnx.ModelProto, dtype: str = "float16", keep_ops=KEEP_FLOAT32_OPS,
            keep_cones=KEEP_FLOAT32_CONES, keep_nodes: set[str] | None = None) -> onnx.ModelProto:
    """Convert float32 compute to float16/bfloat16, keeping graph I/O types.

    Nodes in `keep_ops`, the input cones of `keep_cones`, and `keep_nodes` (by name) stay float32,
    with Casts at the island borders. Q/DQ scales follow their node's precision (TensorRT infers the
    dequantized type from the scale type in strongly typed networks)."""
    half, _ = HALF_TYPES[dtype]
    model = infer_shapes(model)
    g = model.graph
    types = tensor_types(model)
    taken = all_names(model)
    keep = {n.name for n in g.node if n.op_type in keep_ops} | float32_cone(model, keep_cones) | set(keep_nodes or ())
    for n in g.node:
        if not n.name:
            n.name = unique_name(taken, n.op_type)

    def is_float(name: str) -> bool:
        return types.get(name) == FLOAT

    # 1. decide the precision of every float tensor: float32 where produced by a kept node, a graph
    #    input, or a float32 slot; half elsewhere
    graph_inputs = {v.name for v in g.input}
    inits = {t.name: t for t in g.initializer}
    prod = producers(model)
    tensor_half: dict[str, bool] = {}
    for name, t in types.items():
        if t != FLOAT:
            continue
        if name in graph_inputs:
            tensor_half[name] = False
        elif name in prod:
            p = prod[name]
            tensor_half[name] = p.name not in keep
        else:
            tensor_half[name] = name in inits  # initializers: decided per use below
    # 2. walk the nodes: fix each float input to the node's precision with a Cast (cached)
    casts: dict[tuple[str, bool], str] = {}
    new_nodes: list[onnx.NodeProto] = []
    init_uses: dict[str, set[bool]] = defaultdict(set)
    uses = consumers(model)
    for name in inits:
        for n, i in uses.get(name, []):
            if is_float(name):
                init_uses[name].add(n.name not in keep and (n.op_type, i) not in FLOAT32_SLOTS)

    def cast(name: str, to_half: bool) -> str:
        key = (name, to_half)
        if key not in casts:
            out = unique_name(taken, f"{name}_{'half' if to_half else 'f32'}")
            new_nodes.append(helper.make_node("Cast", [name], [out], to=half if to_half else FLOAT,
                                              name=unique_name(taken, "cast_" + out)))
            casts[key] = out
        return casts[key]

    # initializers used in both precisions get a half twin
    half_twin: dict[str, str] = {}
    for name, modes in init_uses.items():
        if modes == {True}:
            inits[name].CopyFrom(_half_array(numpy_helper.to_array(inits[name]), half))
            inits[name].name = name
        elif modes == {True, False}:
            twin = _half_array(numpy_helper.to_array(inits[name]), half)
            twin.name = unique_name(taken, name + "_half")
            g.initializer.append(twin)
            half_twin[name] = twin.name
    for name in inits:
        if name in tensor_half:
            tensor_half[name] = init_uses.get(name) == {True}

    for n in list(g.node):
        node_half = n.name not in keep
        for i, name in enumerate(n.input):
            if not name or not is_float(name):
                continue
            want_half = node_half and (n.op_type, i) not in FLOAT32_SLOTS
            if name in inits:
                if want_half and name in half_twin:
                    n.input[i] = half_twin[name]
                elif want_half != tensor_half[name]:
                    n.input[i] = cast(name, want_half)
                continue
            if tensor_half.get(name, False) != want_half:
                n.input[i] = cast(name, want_half)
        if node_half:
            if n.op_type == "Cast":
                to = next(a for a in n.attribute if a.name == "to")
                if to.i == FLOAT:
                    to.i = half
            elif n.op_type in ("Constant", "ConstantOfShape"):
                for a in n.attribute:
                    if a.name == "value" and a.t.data_type == FLOAT:
                        converted = _half_array(numpy_helper.to_array(a.t), half)
                        a.t.CopyFrom(converted)
    # 3. graph outputs keep float32
    for v in g.output:
        if is_float(v.name) and tensor_half.get(v.name, False):
            inner = unique_name(taken, v.name + "_half")
            prod[v.name].output[list(prod[v.name].output).index(v.name)] = inner
            for n, i in uses.get(v.name, []):
                if n.input[i] == v.name:
                    n.input[i] = inner
            new_nodes.append(helper.make_node("Cast", [inner], [v.name], to=FLOAT, name=unique_name(taken, "cast_" + v.name)))
    g.node.extend(new_nodes)
    rebuild_order(model)
    model = infer_shapes(model)
    if weights_bytes(model) < EXTERNAL_DATA_BYTES:
        onnx.checker.check_model(model)
    return model
