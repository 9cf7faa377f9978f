"""Triton engine model for the embedded target: one network's ONNX file run with ONNX Runtime.

Stateless. The bundled tritonserver has only the python backend, so this stands in for the
onnxruntime / tensorrt_plan backends; its inputs and outputs are rendered from the network's spec.
Requests that Triton's dynamic batcher groups run as one ONNX Runtime call.
"""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        for key in ("onnx_path", "threads"):
            if key not in params:
                raise pb_utils.TritonModelException(f"engine model {config['name']}: config lacks parameter {key!r}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params["threads"])
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # engines share the cores
        self.session = ort.InferenceSession(params["onnx_path"], options, providers=["CPUExecutionProvider"])
        self.input_names = [i["name"] for i in config["input"]]
        self.output_names = [o["name"] for o in config["output"]]

    def execute(self, requests):
        arrays = {name: [pb_utils.get_input_tensor_by_name(r, name).as_numpy() for r in requests]
                  for name in self.input_names}
        sizes = [a.shape[0] for a in arrays[self.input_names[0]]]
        feed = {name: np.concatenate(parts) if len(parts) > 1 else parts[0] for name, parts in arrays.items()}
        try:
            outputs = self.session.run(self.output_names, feed)
        except Exception as e:  # answer every request, say which engine failed
            error = pb_utils.TritonError(f"onnxruntime failed: {e}")
            return [pb_utils.InferenceResponse(error=error) for _ in requests]
        offsets = np.cumsum([0] + sizes)
        return [pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor(name, np.ascontiguousarray(out[offsets[k]:offsets[k + 1]]))
                    for name, out in zip(self.output_names, outputs)])
                for k in range(len(requests))]
