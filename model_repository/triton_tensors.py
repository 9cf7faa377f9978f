"""Output tensors of the python models: host arrays as numpy, CUDA tensors through DLPack (no host copy).

Only importable inside Triton's python stub. Imports no torch, so a model on the ONNX Runtime path
stays torch-free.
"""

from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils


def output_tensor(name: str, value):
    """A numpy array or a torch tensor (host or CUDA) as a Triton output tensor."""
    if getattr(value, "is_cuda", False):
        # The tensor itself, not a to_dlpack() capsule: for an object with __dlpack__ the stub passes its
        # own CUDA stream and synchronizes it, so torch's pending kernels finish before Triton reads the
        # memory; a bare capsule is taken with no synchronization (python_backend src/pb_tensor.cc).
        return pb_utils.Tensor.from_dlpack(name, value.contiguous())
    return pb_utils.Tensor(name, np.ascontiguousarray(value if isinstance(value, np.ndarray) else value.numpy()))
