"""ONNX Runtime engines with the PyTorch modules' call signature.

`OrtEngine(path, spec)(*tensors) -> tensor` takes and returns torch tensors like the module it
replaces, so `flowact.engine` runs unchanged on it; `load_onnx_engines(directory)` builds the
whole `Engines` from an export directory (fp32 or fp8). The Triton embedded target uses the same
function inside its python models.

This module knows nothing about streams or Triton.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from flowact.engine import Engines
from flowact.export.manifest import Manifest, Precision, resolve
from flowact.presets import Preset, get_preset
from flowact.specs import NETWORK_NAMES, NetworkSpec, network_specs


class OrtEngine:
    """One ONNX network behind the PyTorch callable's signature: torch tensors in, a torch tensor out.

    Inputs are converted to the spec's dtypes (bf16 sessions work); the output comes back on the
    first input's device, in that input's float dtype when it is a float output."""

    def __init__(self, path: str | Path, spec: NetworkSpec, providers: list[str] | None = None,
                 threads: int | None = None):
        import onnxruntime as ort

        self.spec = spec
        self.path = Path(path)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])
        names = [i.name for i in self.session.get_inputs()]
        if names != spec.input_names:
            raise ValueError(f"{path}: inputs {names} differ from the spec's {spec.input_names}")

    def __repr__(self) -> str:
        return f"OrtEngine({self.spec.name}, {self.path})"

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        if len(inputs) != len(spec.inputs):
            raise TypeError(f"{spec.name} takes {len(spec.inputs)} inputs ({', '.join(spec.input_names)}), got {len(inputs)}")
        feeds = {}
        batch = inputs[0].shape[0]
        for t, x in zip(spec.inputs, inputs):
            if tuple(x.shape) != t.shape(batch):
                raise ValueError(f"{spec.name}: {t.name} must have shape {t.shape(batch)}, got {tuple(x.shape)}")
            feeds[t.name] = np.ascontiguousarray(x.detach().to("cpu", t.torch_dtype).numpy())
        (out,) = self.session.run(spec.output_names, feeds)
        result = torch.from_numpy(out)
        like = inputs[0]
        if result.is_floating_point() and like.is_floating_point():
            result = result.to(like.dtype)
        return result.to(like.device)


def load_onnx_engines(directory: str | Path, preset: Preset | str | None = None,
                      precision: Precision | str | None = None, providers: list[str] | None = None,
                      threads: int | None = None) -> Engines:
    """An `Engines` running the ONNX files of an export directory with ONNX Runtime.

    `directory` is a precision directory (holding manifest.json) or an export root with
    `precision` (default fp32) below it. The manifest's preset must equal `preset` when given."""
    directory = resolve(directory, precision)
    manifest = Manifest.load(directory)
    if preset is None:
        preset = get_preset(manifest.preset)
    elif isinstance(preset, str):
        preset = get_preset(preset)
    manifest.check_preset(preset, directory)
    specs = network_specs(preset)
    return Engines(**{name: OrtEngine(manifest.path(directory, name), specs[name], providers, threads)
                      for name in NETWORK_NAMES})
