"""Engine adapters that call Triton engine models through BLS, with the PyTorch callables' signatures.

Used inside the `stream` model: `bls_engines(preset, names)` returns a `flowact.engine.Engines`
whose callables send their torch tensors to the engine models and return torch tensors, so the
per-stream engine runs unchanged. Only importable inside Triton's python stub.
"""

from __future__ import annotations

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from flowact.engine import Engines
from flowact.specs import NetworkSpec, network_specs


class EngineCallError(RuntimeError):
    """An engine model answered a BLS request with an error."""


class BlsEngine:
    def __init__(self, spec: NetworkSpec, model_name: str):
        self.spec = spec
        self.model_name = model_name

    def __call__(self, *tensors: torch.Tensor) -> torch.Tensor:
        inputs = [pb_utils.Tensor(s.name, np.ascontiguousarray(t.detach().cpu().numpy().astype(s.dtype, copy=False)))
                  for s, t in zip(self.spec.inputs, tensors, strict=True)]
        request = pb_utils.InferenceRequest(model_name=self.model_name, inputs=inputs,
                                            requested_output_names=self.spec.output_names)
        response = request.exec()
        if response.has_error():
            raise EngineCallError(f"engine model {self.model_name!r} failed: {response.error().message()}")
        out = pb_utils.get_output_tensor_by_name(response, self.spec.outputs[0].name)
        return torch.from_numpy(out.as_numpy())


def bls_engines(preset) -> Engines:
    """Engines whose networks are the repository's engine models (named after the specs)."""
    specs = network_specs(preset)
    return Engines(**{name: BlsEngine(spec, name) for name, spec in specs.items()})
