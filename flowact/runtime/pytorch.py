"""PyTorch modules as runners: CPU in float32 (the reference), CUDA in bf16 under autocast.

The torch target of the serving repository runs these inside the `stream` model's process, next
to the per-stream state, on the device the state lives on.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable

import torch

from flowact.runtime import Runners


def default_dtype(device: str | torch.device) -> torch.dtype:
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def use_device(device: str | torch.device) -> torch.device:
    """Make a CUDA device the process's current one (Triton's python stub leaves device 0 current for
    a KIND_GPU instance on another GPU, where TensorRT would enqueue); -> the device."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def cuda_context_lost(device: torch.device) -> bool:
    """After a failed call: whether the device's CUDA context is unusable. A sticky error (illegal
    address, device-side assert) makes every later call fail while the process looks healthy."""
    if device.type != "cuda":
        return False
    try:
        torch.cuda.synchronize(device)
    except Exception:  # noqa: BLE001 - any error here means the context cannot run work
        return True
    return False


class TorchRunner:
    """A module's method behind the runner signature; `dtype` other than float32 runs under autocast."""

    def __init__(self, fn: Callable[..., torch.Tensor], dtype: torch.dtype, device_type: str):
        self.fn, self.dtype, self.device_type = fn, dtype, device_type

    def __repr__(self) -> str:
        return f"TorchRunner({getattr(self.fn, '__qualname__', self.fn)}, {self.dtype})"

    def __call__(self, *inputs):
        autocast = (torch.autocast(self.device_type, dtype=self.dtype) if self.dtype != torch.float32
                    else contextlib.nullcontext())
        with torch.inference_mode(), autocast:
            return self.fn(*inputs)


def torch_runners(nets, dtype: torch.dtype | None = None) -> Runners:
    """Each network's callable, by name, as its spec finds it in the family (`NetworkSpec.callable`)."""
    from flowact.specs import network_specs

    device_type = next(nets.denoiser.parameters()).device.type
    dtype = dtype or torch.float32
    return Runners(**{name: TorchRunner(spec.callable(nets), dtype, device_type)
                      for name, spec in network_specs(nets.preset).items()}, kv_dtype=dtype, memory_subsets=True)


def load_torch_runners(preset, checkpoint: str | Path | None, device: str | torch.device = "cpu",
                       dtype: torch.dtype | None = None) -> Runners:
    """A preset's networks (checkpoint or seeded random), built on `device` with weights in `dtype`."""
    from flowact.networks import build_networks

    dtype = dtype or default_dtype(device)
    nets = build_networks(preset, checkpoint=checkpoint, device=device).to(device, dtype)
    return torch_runners(nets, dtype)


def load_torch_runner(preset, name: str, checkpoint: str | Path | None, device: str | torch.device = "cpu",
                      dtype: torch.dtype | None = None) -> TorchRunner:
    """One network's runner (a NETWORK_NAMES name) with only its own module built and loaded (from a
    checkpoint; seeded random weights are drawn for the whole family: flowact.networks.build_network)."""
    from flowact.networks import build_network
    from flowact.specs import network_specs

    dtype = dtype or default_dtype(device)
    spec = network_specs(preset)[name]
    owner = build_network(preset, spec.owner, checkpoint=checkpoint, device=device).to(device, dtype)
    return TorchRunner(spec.owner_callable(owner), dtype, torch.device(device).type)
