"""PyTorch -> ONNX, one file per network spec (torch.onnx.export with dynamo=True, dynamic batch).

`export_onnx(preset, out)` writes ROOT/fp32/<network>.onnx and its manifest; networks whose
file is current are skipped. After export every graph gets `isolate_uint8` (TensorRT takes UINT8
only as Cast-converted network I/O) and is checked against its spec (names, dtypes, dims, the
symbolic batch dim).
"""

from __future__ import annotations

import hashlib
import logging
import time
import warnings
from pathlib import Path
from typing import Callable, Iterable

import onnx
import torch

from flowact.export import graph
from flowact.runtime.manifest import Manifest, Precision, digest, preset_fields
from flowact.networks import Networks, build_networks, checkpoint_files
from flowact.presets import Preset
from flowact.specs import BATCH, NetworkSpec, network_specs, onnx_elem_type

OPSET = 20  # every TensorRT 10.x parser accepts opset 9..20; opset 19+ has FP8 Q/DQ
EXPORT_BATCH = 2  # sample batch used for tracing (batch 1 would let the exporter specialise it)
MAX_DYNAMIC_BATCH = 1024  # the exporter's bound on the symbolic batch (runtimes take any batch below it)

log = logging.getLogger("flowact.export")


def source_hash(extra: Iterable[Path] = ()) -> str:
    """Hash of the code that defines the exported graphs (model code, specs, export code)."""
    import flowact.models
    import flowact.specs

    files = sorted(Path(flowact.models.__file__).parent.glob("*.py")) + [Path(flowact.specs.__file__),
                                                                            Path(__file__), Path(graph.__file__)]
    h = hashlib.sha256()
    for f in [*files, *extra]:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def weights_hash(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class WeightSource:
    """The weights to export, identified without building the networks (built on first use).

    Key per network owner: the weights' hash when networks are given, the checkpoint file's hash
    for a checkpoint, else the seed (seeded init is a function of seed, code and torch version,
    all part of the export key)."""

    def __init__(self, preset: Preset, checkpoint: str | Path | None = None, seed: int = 0,
                 nets: Networks | None = None):
        self.preset, self.checkpoint, self.seed, self._nets = preset, checkpoint, seed, nets
        self._given = nets is not None
        self._keys: dict[str, str] = {}

    @property
    def nets(self) -> Networks:
        if self._nets is None:
            self._nets = build_networks(self.preset, seed=self.seed, checkpoint=self.checkpoint)
        return self._nets

    def key(self, owner: str) -> str:
        if owner not in self._keys:
            if self._given:
                self._keys[owner] = weights_hash(getattr(self._nets, owner))
            elif self.checkpoint is not None:
                directory = Path(self.checkpoint)
                self._keys[owner] = digest(*(graph.sha256_file(f) for f in checkpoint_files(directory, owner)),
                                           graph.sha256_file(directory / "preset.json"))
            else:
                self._keys[owner] = digest("seeded", self.seed, torch.__version__)
        return self._keys[owner]

    def describe(self) -> dict:
        return {"checkpoint": str(self.checkpoint) if self.checkpoint else None,
                "seed": None if self.checkpoint else self.seed}


def export_network(spec: NetworkSpec, nets: Networks, opset: int = OPSET) -> onnx.ModelProto:
    """Trace one network to an ONNX model (dynamic batch), TensorRT-ready and checked against its spec."""
    module = spec.module(nets)
    args = spec.sample_inputs(EXPORT_BATCH)
    batch = torch.export.Dim(BATCH, min=1, max=MAX_DYNAMIC_BATCH)
    with warnings.catch_warnings(), _quiet_exporter():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, args, f=None, dynamo=True, opset_version=opset,
                                    input_names=spec.input_names, output_names=spec.output_names,
                                    dynamic_shapes=tuple({0: batch} for _ in spec.inputs), verbose=False)
    model = program.model_proto
    model = graph.isolate_uint8(graph.infer_shapes(model))
    model.doc_string = f"flowact {spec.name} ({nets.preset.name})"
    onnx.helper.set_model_props(model, {"flowact.network": spec.name, "flowact.preset": nets.preset.name})
    check_against_spec(model, spec)
    return model


class _quiet_exporter:
    """Silence the exporter's progress prints and registry warnings (it logs through `torch.onnx`)."""

    def __enter__(self):
        self.loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch._dynamo", "torch.export", "torch._export")]
        self.levels = [lg.level for lg in self.loggers]
        for lg in self.loggers:
            lg.setLevel(logging.ERROR)
        import contextlib
        import io

        self.stdout = contextlib.redirect_stdout(io.StringIO())
        self.stdout.__enter__()

    def __exit__(self, *exc):
        self.stdout.__exit__(*exc)
        for lg, level in zip(self.loggers, self.levels):
            lg.setLevel(level)


def check_against_spec(model: onnx.ModelProto, spec: NetworkSpec) -> None:
    """The graph's I/O must be exactly the spec's: names, order, element types, dims (batch symbolic)."""
    g = model.graph
    for kind, values, specs in (("input", g.input, spec.inputs), ("output", g.output, spec.outputs)):
        names = [v.name for v in values]
        if names != [t.name for t in specs]:
            raise ValueError(f"{spec.name}: ONNX {kind}s {names} differ from the spec's {[t.name for t in specs]}")
        for v, t in zip(values, specs):
            tt = v.type.tensor_type
            dims = [d.dim_param or d.dim_value for d in tt.shape.dim]
            if tt.elem_type != onnx_elem_type(t.dtype):
                raise ValueError(f"{spec.name}: {t.name} has ONNX type {tt.elem_type}, spec says {t.dtype}")
            if dims != list(t.dims):
                raise ValueError(f"{spec.name}: {t.name} has dims {dims}, spec says {list(t.dims)}")


def export_onnx(preset: Preset, out: str | Path, checkpoint: str | Path | None = None, seed: int = 0,
                names: Iterable[str] | None = None, opset: int = OPSET, say: Callable[[str], None] = print,
                nets: Networks | None = None, source: WeightSource | None = None) -> dict[str, Path]:
    """ROOT/fp32/<network>.onnx for every network of the preset; current files are kept.

    Weights: `nets` if given, else `checkpoint`, else seeded random weights (`seed`); the networks
    are only built if something needs exporting. Returns network name -> ONNX file (the manifest
    beside them records hashes and shapes)."""
    source = source or WeightSource(preset, checkpoint, seed, nets)
    directory = Path(out) / Precision.FP32.value
    directory.mkdir(parents=True, exist_ok=True)
    manifest = Manifest.open(directory, preset, Precision.FP32)
    code = source_hash()
    for name, spec in network_specs(preset).items():
        if names is not None and name not in names:
            continue
        key = digest("onnx", preset_fields(preset), source.key(spec.owner), code, opset, torch.__version__,
                     onnx.__version__, [(t.name, t.dtype.name, t.dims) for t in spec.inputs + spec.outputs])
        file = f"{name}.onnx"
        if manifest.up_to_date(name, key, directory, graph.model_hash):
            say(f"{name}: {directory / file} is up to date, skipping")
            continue
        t0 = time.perf_counter()
        model = export_network(spec, source.nets, opset)
        graph.save_model(model, directory / file)
        manifest.record(name, file, graph.model_hash(directory / file), key, spec, Precision.FP32.value,
                        opset=opset, weights_key=source.key(spec.owner), source_sha256=code, **source.describe())
        manifest.save(directory)
        say(f"{name}: exported {directory / file} in {time.perf_counter() - t0:.1f} s")
    manifest.save(directory)
    return {name: manifest.path(directory, name) for name in manifest.networks if names is None or name in names}
