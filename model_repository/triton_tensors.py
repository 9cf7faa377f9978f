"""Output tensors of the python models: host arrays as numpy, CUDA tensors through DLPack (no host copy).

Only importable inside Triton's python stub. Imports torch only for a CUDA tensor, so a model on the
ONNX Runtime path stays torch-free.
"""

from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils


def output_tensor(name: str, value):
    """A numpy array or a torch tensor (host or CUDA) as a Triton output tensor."""
    if getattr(value, "is_cuda", False):
        from torch.utils.dlpack import to_dlpack

        return pb_utils.Tensor.from_dlpack(name, to_dlpack(value.contiguous()))
    return pb_utils.Tensor(name, np.ascontiguousarray(value if isinstance(value, np.ndarray) else value.numpy()))
