"""TensorRT plans as runners: the PyTorch callable's signature, CUDA torch tensors in and out.

`TrtRunner(plan, spec)` runs one plan (batches above the profile's max are split);
`load_trt_runners(directory)` builds `Runners` from a plan directory (ROOT or ROOT/trt-fp8). The
builder (flowact.export.tensorrt) is not imported here. TensorRT is imported lazily: without it
every entry point raises `TensorRTUnavailable` with a clear message.
"""

from __future__ import annotations

from pathlib import Path

import torch

from flowact.runtime.manifest import Manifest, Precision, resolve
from flowact.presets import Preset, get_preset
from flowact.runtime import Runners, check_arity, full_valid
from flowact.specs import NETWORK_NAMES, NetworkSpec, network_specs


class TensorRTUnavailable(RuntimeError):
    """TensorRT (or a GPU) is missing."""


class TensorRTBuildError(RuntimeError):
    """The parser or builder rejected a network."""


def import_tensorrt():
    try:
        import tensorrt as trt  # noqa: PLC0415 - optional dependency, imported only when used
    except Exception as e:  # ImportError, or the PyPI stub failing to fetch its wheel
        raise TensorRTUnavailable(
            "TensorRT is not installed: `flowact export trt` and the TensorRT engines need the `tensorrt` Python "
            "package (TensorRT 10, e.g. inside the NGC tritonserver or TensorRT container) and an NVIDIA GPU. "
            "The fp32 and fp8 ONNX exports (`flowact export onnx|fp8`) run without it.") from e
    major = int(str(trt.__version__).split(".")[0])
    if major < 10:
        raise TensorRTUnavailable(f"TensorRT {trt.__version__} found; flowact needs TensorRT 10 or newer")
    return trt


class TrtRunner:
    """One TensorRT plan behind the PyTorch callable's signature (torch tensors in, a CUDA tensor out)."""

    def __init__(self, plan: str | Path, spec: NetworkSpec, device: str | torch.device = "cuda"):
        trt = import_tensorrt()
        self.spec, self.device = spec, torch.device(device)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        with torch.cuda.device(self.device):
            self.engine = self.runtime.deserialize_cuda_engine(Path(plan).read_bytes())
            if self.engine is None:
                raise TensorRTBuildError(f"{plan}: TensorRT could not deserialize the plan (built for another "
                                         "GPU or TensorRT version? rebuild with `flowact export trt`)")
            self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        expected = spec.input_names + spec.output_names
        if sorted(names) != sorted(expected):
            raise ValueError(f"{plan}: engine tensors {names} differ from the spec's {expected}")

    def __repr__(self) -> str:
        return f"TrtRunner({self.spec.name}, {self.device})"

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        check_arity(spec, inputs)
        batch, step = inputs[0].shape[0], spec.profile.max
        inputs = full_valid(spec, inputs, batch, self.device)
        if batch > step:  # above the profile: run in slices
            return torch.cat([self(*(x[i:i + step] for x in inputs)) for i in range(0, batch, step)])
        feeds = []
        for t, x in zip(spec.inputs, inputs):
            if tuple(x.shape) != t.shape(batch):
                raise ValueError(f"{spec.name}: {t.name} must have shape {t.shape(batch)}, got {tuple(x.shape)}")
            x = x.detach().to(self.device, t.torch_dtype).contiguous()
            feeds.append(x)  # keep alive until the stream is done
            self.context.set_input_shape(t.name, tuple(x.shape))
            self.context.set_tensor_address(t.name, x.data_ptr())
        o = spec.outputs[0]
        out = torch.empty(o.shape(batch), dtype=o.torch_dtype, device=self.device)
        self.context.set_tensor_address(o.name, out.data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT execution of {spec.name} failed")
        # The engine's own dtype: the sampler casts what it keeps, and MEMORY_KV (fp32, 3.75 GiB per r1-480p
        # stream) goes straight back into the denoiser's plan three times a chunk: no bf16 round trip.
        return out


def load_trt_runners(directory: str | Path, preset: Preset | str | None = None,
                     device: str | torch.device = "cuda") -> Runners:
    """`Runners` running the TensorRT plans of an export directory (ROOT or ROOT/trt-fp8)."""
    directory = resolve(directory, Precision.TRT_FP8)
    manifest = Manifest.load(directory)
    preset = get_preset(manifest.preset) if preset is None else get_preset(preset) if isinstance(preset, str) else preset
    manifest.check_preset(preset, directory)
    specs = network_specs(preset)
    return Runners(**{n: TrtRunner(manifest.path(directory, n), specs[n], device) for n in NETWORK_NAMES},
                   kv_dtype=specs["denoiser_memory"].outputs[0].torch_dtype)
