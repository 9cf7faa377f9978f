"""What runs a network: one adapter per runtime, one bag of callables, one way to build it.

Every adapter has the PyTorch module's call signature (torch tensors in, a torch tensor out), so
the stream engine (flowact.engine) cannot tell which one runs:

    torch     PyTorch modules on a device and dtype (flowact.runtime.pytorch; CPU fp32, CUDA bf16; one
              network alone, its module the only one built: `load_torch_runner`, the torch vae_decoder model)
    onnx      ONNX Runtime on the CPU (flowact.runtime.onnx; the embedded target)
    trt       TensorRT plans on a GPU (flowact.runtime.tensorrt)

(Calling separate Triton network models through BLS was measured slower than running the
networks in the stream model's own process, even on the CPU: benchmarks/results/cpu_{bls,colocated}_vs_inprocess.json.)

Memory validity: `denoiser_memory(memory, valid)` and `denoiser(..., kv, valid)` take `valid=None`
when every memory slot of every stream in the batch is valid. The torch runner then runs attention
without a mask (so SDPA may pick the flash or cuDNN kernels); runners whose graph has a mask input
feed an all-true one (`full_valid`). A stream whose bank still has empty slots: the torch runners
(`memory_subsets`) take only its valid slots, `denoiser_memory(memory[:, slots], None, slots)`, also
without a mask and with less work; the others take the whole bank and the mask.

This package knows nothing about streams or Triton's sequence batching. It imports torch only
where a runner needs it: the embedded decoder model opens its ONNX session without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch

    from flowact.specs import NetworkSpec

    Tensor = torch.Tensor


class RuntimeKind(str, Enum):
    TORCH = "torch"
    ONNX = "onnx"
    TRT = "trt"


@dataclass(frozen=True)
class Runners:
    """The networks as callables with the PyTorch modules' signatures, whatever runs them."""

    audio_encoder: Callable[[Tensor], Tensor]  # audio window (B, S) f32 -> features (B, 12, Da)
    vae_encoder: Callable[[Tensor], Tensor]  # image (B, H, W, 3) u8 -> latent (B, 16, h, w)
    vae_decoder: Callable[[Tensor], Tensor]  # latents (B, 1+3, 16, h, w) -> frames (B, 12, H, W, 3) u8
    denoiser_memory: Callable[..., Tensor]  # memory (B, Fm, 16, h, w), valid (B, Fm) | None[, positions (Fm',)] -> kv
    denoiser: Callable[..., Tensor]  # x, t, audio, prompt, kv, valid | None -> velocity (B, 3, 16, h, w)
    text_encoder: Callable[[Tensor], Tensor]  # byte ids (B, P) i64 -> prompt tokens (B, P, Dt)
    kv_dtype: torch.dtype  # what denoiser_memory returns the memory K/V in (a stream's K/V workspace is sized by it)
    # denoiser_memory takes `positions` (only the valid bank slots, no mask) and the denoiser K/V of any
    # length: PyTorch's dynamic shapes. ONNX graphs and TensorRT plans have the whole bank and a mask.
    memory_subsets: bool = False
    quantized: bool = False  # int8 networks: frames differ from the float runners' (a snapshot does not cross)

    @classmethod
    def from_networks(cls, nets, dtype: "torch.dtype | None" = None) -> "Runners":
        """PyTorch modules where they are; a `dtype` other than float32 runs them under autocast."""
        from flowact.runtime.pytorch import torch_runners

        return torch_runners(nets, dtype)


def full_valid(spec: NetworkSpec, inputs: tuple, batch: int, device: "torch.device | str" = "cpu") -> tuple:
    """Replace a `None` MEMORY_VALID by an all-true mask of the spec's shape (graphs that always take
    one), made on `device` (where the graph runs: no host-to-device copy per call)."""
    import torch

    from flowact.specs import MEMORY_VALID

    return tuple(torch.ones(t.shape(batch), dtype=torch.bool, device=device) if x is None and t.name == MEMORY_VALID
                 else x for t, x in zip(spec.inputs, inputs))


def check_arity(spec: NetworkSpec, inputs: tuple) -> None:
    if len(inputs) != len(spec.inputs):
        raise TypeError(f"{spec.name} takes {len(spec.inputs)} inputs ({', '.join(spec.input_names)}), got {len(inputs)}")


def build_runners(kind: RuntimeKind | str, preset, source: str | Path | None = None, device: str = "cpu",
                  dtype: "torch.dtype | None" = None, threads: int | None = None) -> Runners:
    """The one way to build a preset's runners.

    torch: `source` is a checkpoint directory (None: seeded random weights), on `device` in `dtype`
    (default bf16 on CUDA, float32 elsewhere); onnx: `source` is an export directory (fp32 below it);
    trt: `source` is a plan directory."""
    kind = RuntimeKind(kind)
    if kind == RuntimeKind.TORCH:
        from flowact.runtime.pytorch import load_torch_runners

        return load_torch_runners(preset, source, device, dtype)
    if kind == RuntimeKind.ONNX:
        from flowact.runtime.onnx import load_onnx_runners

        return load_onnx_runners(source, preset, threads=threads, spin=False)  # the server's processes share the cores
    from flowact.runtime.tensorrt import load_trt_runners

    return load_trt_runners(source, preset, device)
