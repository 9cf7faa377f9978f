"""ONNX Runtime runners with the PyTorch modules' call signature, and the one place session options are made.

`OrtRunner(path, spec)(*tensors) -> tensor` takes and returns torch tensors like the module it
replaces; `load_onnx_runners(directory)` builds the whole `Runners` from an export directory (fp32
or fp8). Every ONNX Runtime session is opened through `ort_session`: the runners', the embedded
target's vae_decoder model's and the FP8 export's error check's.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from flowact.runtime import Runners, check_arity, full_valid

if TYPE_CHECKING:  # torch, the specs and the manifest are imported where used: `ort_session` needs neither
    import torch

    from flowact.specs import NetworkSpec


def ort_session(model: str | Path | bytes, threads: int | None = None, spin: bool = True,
                providers: list[str] | None = None):
    """An InferenceSession of a file (or serialized model), quiet, fully optimised. `threads` intra-op threads (None: ORT's default);
    `spin=False` for processes that share the cores with other sessions (the server's: the stream model's
    six sessions and vae_decoder's on the same cores, where idle spinning pools slow every one of them)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    if not spin:
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=providers or ["CPUExecutionProvider"])


class OrtRunner:
    """One ONNX network behind the PyTorch callable's signature: torch tensors in, a torch tensor out.

    Inputs are converted to the spec's dtypes (bf16 sessions work); the output comes back on the
    first input's device, in that input's float dtype when it is a float output."""

    def __init__(self, path: str | Path, spec: NetworkSpec, providers: list[str] | None = None,
                 threads: int | None = None, spin: bool = True):
        self.spec = spec
        self.path = Path(path)
        self.session = ort_session(path, threads, spin, providers)
        names = [i.name for i in self.session.get_inputs()]
        if names != spec.input_names:
            raise ValueError(f"{path}: inputs {names} differ from the spec's {spec.input_names}")

    def __repr__(self) -> str:
        return f"OrtRunner({self.spec.name}, {self.path})"

    def __call__(self, *inputs: torch.Tensor | None) -> torch.Tensor:
        import torch

        spec = self.spec
        check_arity(spec, inputs)
        batch = inputs[0].shape[0]
        inputs = full_valid(spec, inputs, batch)
        feeds = {}
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


def load_onnx_runners(directory: str | Path, preset=None, precision=None, providers: list[str] | None = None,
                      threads: int | None = None, spin: bool = True) -> Runners:
    """`Runners` running the ONNX files of an export directory with ONNX Runtime.

    `directory` is a precision directory (holding manifest.json) or an export root with
    `precision` (default fp32) below it. The manifest's preset (a name or a Preset) must equal
    `preset` when given."""
    from flowact.runtime.manifest import Manifest, Precision, resolve
    from flowact.presets import get_preset
    from flowact.specs import NETWORK_NAMES, network_specs

    directory = resolve(directory, precision)
    manifest = Manifest.load(directory)
    if preset is None:
        preset = get_preset(manifest.preset)
    elif isinstance(preset, str):
        preset = get_preset(preset)
    manifest.check_preset(preset, directory)
    specs = network_specs(preset)
    return Runners(**{name: OrtRunner(manifest.path(directory, name), specs[name], providers, threads, spin)
                      for name in NETWORK_NAMES}, kv_dtype=specs["denoiser_memory"].outputs[0].torch_dtype,
                   quantized=manifest.precision == Precision.INT8.value)
