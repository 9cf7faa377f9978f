"""Triton vae_decoder model: the ensemble's second step (LATENTS -> FRAMES), stateless, run by ONNX
Runtime (target embedded) or PyTorch (target torch); target trt serves a tensorrt_plan instead.

The bundled tritonserver has only the python backend, so this stands in for the onnxruntime /
tensorrt_plan backends; its inputs and outputs are rendered from the network's spec. Requests that
Triton's dynamic batcher groups run as one call. Parameters: `network` (the spec's name,
vae_decoder), `preset`, `runtime` (onnx | torch), `source` (the ONNX file; or the checkpoint
directory, empty for seeded random weights), `device`, `threads`. The onnx runtime path imports no
torch (a stub that imports torch starts about 2.5 s slower); the torch path builds only this
network's module, not the whole family.
"""

from __future__ import annotations

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from flowact.runtime import RuntimeKind
from flowact.serving.triton_tensors import output_tensor

PARAMETERS = ("network", "preset", "runtime", "source", "device", "threads")


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        for key in PARAMETERS:
            if key not in params:
                raise pb_utils.TritonModelException(f"model {config['name']}: config lacks parameter {key!r}")
        self.name = params["network"]
        self.input_names = [i["name"] for i in config["input"]]
        self.output_name = config["output"][0]["name"]
        runtime = RuntimeKind(params["runtime"])
        self.network = (OnnxNetwork if runtime == RuntimeKind.ONNX else TorchNetwork)(params, self.input_names,
                                                                                    self.output_name)

    def execute(self, requests):
        parts = [[pb_utils.get_input_tensor_by_name(r, name) for r in requests] for name in self.input_names]
        sizes = [p.shape()[0] for p in parts[0]]
        try:
            out = self.network(parts)  # (sum of the requests' batches, ...)
        except Exception as e:  # answer every request, say which network failed
            error = pb_utils.TritonError(f"network {self.name} failed: {e}")
            return [pb_utils.InferenceResponse(error=error) for _ in requests]
        offsets = np.cumsum([0] + sizes)
        return [pb_utils.InferenceResponse(output_tensors=[output_tensor(self.output_name, out[a:b])])
                for a, b in zip(offsets[:-1], offsets[1:])]


class OnnxNetwork:
    """The network's ONNX file in ONNX Runtime, numpy in and out."""

    def __init__(self, params: dict, input_names: list[str], output_name: str):
        from flowact.runtime.onnx import ort_session

        self.session = ort_session(params["source"], int(params["threads"]), spin=False)  # networks share the cores
        self.input_names, self.output_name = input_names, output_name

    def __call__(self, parts) -> np.ndarray:
        feed = {name: np.concatenate([t.as_numpy() for t in p]) if len(p) > 1 else p[0].as_numpy()
                for name, p in zip(self.input_names, parts)}
        return self.session.run([self.output_name], feed)[0]


class TorchNetwork:
    """The network's PyTorch module (and only it) on the model's device; GPU tensors come and go through DLPack."""

    def __init__(self, params: dict, input_names: list[str], output_name: str):
        import torch

        from flowact.presets import get_preset
        from flowact.runtime.pytorch import load_torch_runner, use_device

        torch.set_num_threads(int(params["threads"]))
        self.device = use_device(params["device"])
        self.run = load_torch_runner(get_preset(params["preset"]), params["network"], params["source"] or None,
                                     params["device"])

    def __call__(self, parts):
        import torch

        inputs = [torch.cat([self.torch_in(t) for t in p]) if len(p) > 1 else self.torch_in(p[0]) for p in parts]
        return self.run(*inputs)

    def torch_in(self, tensor):
        import torch

        if tensor.is_cpu():
            return torch.from_numpy(tensor.as_numpy()).to(self.device)
        return torch.utils.dlpack.from_dlpack(tensor.to_dlpack()).to(self.device)
