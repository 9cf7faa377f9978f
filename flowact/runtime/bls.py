"""Runners that call the repository's Triton network models through BLS (embedded target).

Used inside the `stream` model: `bls_runners(preset)` returns `Runners` whose callables send their
torch tensors to the network models and return torch tensors, so the stream sampler runs unchanged.
Only importable inside Triton's python stub.
"""

from __future__ import annotations

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from flowact.runtime import Runners, check_arity, full_valid
from flowact.specs import NetworkSpec, network_specs


class NetworkCallError(RuntimeError):
    """A network model answered a BLS request with an error."""


class BlsRunner:
    def __init__(self, spec: NetworkSpec, model_name: str):
        self.spec = spec
        self.model_name = model_name

    def __call__(self, *tensors: torch.Tensor | None) -> torch.Tensor:
        check_arity(self.spec, tensors)
        tensors = full_valid(self.spec, tensors, tensors[0].shape[0])
        inputs = [pb_utils.Tensor(s.name, np.ascontiguousarray(t.detach().cpu().numpy().astype(s.dtype, copy=False)))
                  for s, t in zip(self.spec.inputs, tensors, strict=True)]
        request = pb_utils.InferenceRequest(model_name=self.model_name, inputs=inputs,
                                            requested_output_names=self.spec.output_names)
        response = request.exec()
        if response.has_error():
            raise NetworkCallError(f"network model {self.model_name!r} failed: {response.error().message()}")
        out = pb_utils.get_output_tensor_by_name(response, self.spec.outputs[0].name)
        return torch.from_numpy(out.as_numpy())


def bls_runners(preset) -> Runners:
    """Runners whose networks are the repository's network models (named after the specs)."""
    specs = network_specs(preset)
    return Runners(**{name: BlsRunner(spec, name) for name, spec in specs.items()})
