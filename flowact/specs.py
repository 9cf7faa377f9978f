"""One spec per exported network: the single place tensor names, dtypes and dims are written.

ONNX export, the FP8 inserter, TensorRT optimisation profiles, Triton config.pbtxt rendering and
the runtime adapters all read `network_specs(preset)`. Every dim is static for a preset except the
leading `batch` (the number of streams in one engine call): memory has fixed slots and a validity
mask (MEMORY_VALID), so its length never varies.

Networks, in the order of `flowact.runtime.Runners`' fields:
    audio_encoder    AUDIO_WINDOW -> AUDIO_FEATURES
    vae_encoder      REF_IMAGE -> REF_LATENT
    vae_decoder      LATENTS -> FRAMES
    denoiser_memory  MEMORY, MEMORY_VALID -> MEMORY_KV          (once per chunk)
    denoiser         X, T, AUDIO_FEATURES, PROMPT_TOKENS, MEMORY_KV, MEMORY_VALID -> VELOCITY  (per NFE)
    text_encoder     PROMPT_IDS -> PROMPT_TOKENS                 (once per distinct prompt)

This module knows nothing about ONNX or Triton beyond their dtype names; the export modules and
serving code import those themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Callable

import numpy as np
import torch
from torch import nn

from flowact.contract import FRAMES, REF_IMAGE
from flowact.presets import (AUDIO_FEATURES_PER_CHUNK, FRAMES_PER_CHUNK, LATENT_CHANNELS, LATENT_FRAMES_PER_CHUNK,
                             Preset)

BATCH = "batch"  # the only symbolic dim

# Network tensor names (REF_IMAGE and FRAMES are the ensemble's too: flowact.contract).
AUDIO_WINDOW = "AUDIO_WINDOW"
AUDIO_FEATURES = "AUDIO_FEATURES"
REF_LATENT = "REF_LATENT"
LATENTS = "LATENTS"
MEMORY = "MEMORY"
MEMORY_VALID = "MEMORY_VALID"
MEMORY_KV = "MEMORY_KV"
X = "X"
T = "T"
PROMPT_TOKENS = "PROMPT_TOKENS"
VELOCITY = "VELOCITY"
PROMPT_IDS = "PROMPT_IDS"

NETWORK_NAMES = ("audio_encoder", "vae_encoder", "vae_decoder", "denoiser_memory", "denoiser", "text_encoder")


# --- dtypes ---------------------------------------------------------------------------------------

# numpy dtype -> (torch dtype, Triton data type, ONNX TensorProto element type)
_DTYPES: dict[np.dtype, tuple[torch.dtype, str, int]] = {
    np.dtype(np.float32): (torch.float32, "TYPE_FP32", 1),
    np.dtype(np.float16): (torch.float16, "TYPE_FP16", 10),
    np.dtype(np.uint8): (torch.uint8, "TYPE_UINT8", 2),
    np.dtype(np.int32): (torch.int32, "TYPE_INT32", 6),
    np.dtype(np.int64): (torch.int64, "TYPE_INT64", 7),
    np.dtype(np.bool_): (torch.bool, "TYPE_BOOL", 9),
}


def _entry(dtype) -> tuple[torch.dtype, str, int]:
    try:
        return _DTYPES[np.dtype(dtype)]
    except (KeyError, TypeError):
        raise ValueError(f"dtype {dtype!r} has no mapping in flowact.specs") from None


def torch_dtype(dtype) -> torch.dtype:
    """numpy dtype -> torch dtype."""
    return _entry(dtype)[0]


def triton_dtype(dtype) -> str:
    """numpy dtype -> Triton config data type ("TYPE_FP32", ...)."""
    return _entry(dtype)[1]


def onnx_elem_type(dtype) -> int:
    """numpy dtype -> onnx.TensorProto element type (FLOAT = 1, ...)."""
    return _entry(dtype)[2]


def numpy_dtype(dtype) -> np.dtype:
    """torch dtype, Triton data type ("TYPE_FP32"), ONNX element type (int) or numpy dtype -> numpy dtype."""
    for np_dtype, (t, tri, onx) in _DTYPES.items():
        if isinstance(dtype, torch.dtype) and dtype == t:
            return np_dtype
        if isinstance(dtype, str) and dtype == tri:
            return np_dtype
        if isinstance(dtype, int) and not isinstance(dtype, bool) and dtype == onx:
            return np_dtype
    if isinstance(dtype, (torch.dtype, int)) or (isinstance(dtype, str) and dtype.startswith("TYPE_")):
        raise ValueError(f"dtype {dtype!r} has no mapping in flowact.specs")
    return np.dtype(dtype)


# --- specs ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: name, numpy dtype, dims with BATCH as the only symbolic dim."""

    name: str
    dtype: np.dtype
    dims: tuple[int | str, ...]

    def __post_init__(self):
        object.__setattr__(self, "dtype", np.dtype(self.dtype))
        if self.dims[0] != BATCH or any(not isinstance(d, int) for d in self.dims[1:]):
            raise ValueError(f"{self.name}: dims must be ({BATCH!r}, int, ...), got {self.dims}")

    def shape(self, batch: int) -> tuple[int, ...]:
        return (batch, *self.dims[1:])

    @property
    def dims_without_batch(self) -> tuple[int, ...]:
        """What Triton's config.pbtxt `dims` holds (batching implied by max_batch_size)."""
        return tuple(self.dims[1:])  # type: ignore[arg-type]

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype)

    @property
    def triton_dtype(self) -> str:
        return triton_dtype(self.dtype)


@dataclass(frozen=True)
class BatchProfile:
    """Batch sizes an engine is built for (TensorRT optimisation profile; Triton max_batch_size = max)."""

    min: int
    opt: int
    max: int

    def __post_init__(self):
        if not 1 <= self.min <= self.opt <= self.max:
            raise ValueError(f"batch profile needs 1 <= min <= opt <= max, got {self}")


# streams per engine call, per preset
BATCH_PROFILES: dict[str, BatchProfile] = {
    "tiny": BatchProfile(1, 2, 8),
    "cpu": BatchProfile(1, 2, 8),
    "r1-480p": BatchProfile(1, 1, 4),
}
DEFAULT_PROFILE = BatchProfile(1, 2, 8)


class DenoiserMemory(nn.Module):
    """`MMDiT.memory_kv` as a module's forward (what torch.onnx.export traces)."""

    def __init__(self, denoiser: nn.Module):
        super().__init__()
        self.denoiser = denoiser

    def forward(self, memory: torch.Tensor, memory_valid: torch.Tensor) -> torch.Tensor:
        return self.denoiser.memory_kv(memory, memory_valid)


class DenoiserStream(nn.Module):
    """`MMDiT.forward_stream` as a module's forward (what torch.onnx.export traces)."""

    def __init__(self, denoiser: nn.Module):
        super().__init__()
        self.denoiser = denoiser

    def forward(self, x, t, audio, prompt, memory_kv, memory_valid) -> torch.Tensor:
        return self.denoiser.forward_stream(x, t, audio, prompt, memory_kv, memory_valid)


_WRAPPERS = {"memory_kv": DenoiserMemory, "forward_stream": DenoiserStream}


class Int8(str, Enum):
    """How `flowact export int8` quantizes a network (export/int8.py says why each one)."""

    DYNAMIC = "dynamic"  # linear layers: int8 per-channel weights, activations quantized per call
    STATIC = "static"  # convolutions: QDQ, int8 per-channel weights, calibrated uint8 activations


@dataclass(frozen=True)
class NetworkSpec:
    """Everything export, engine build, Triton configs and runtime buffers need about one network."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    profile: BatchProfile
    owner: str  # attribute of flowact.networks.Networks holding the weights
    method: str = "forward"  # method of that module computing this network
    int8: Int8 | None = None  # its quantization in the int8 export; None: kept float32
    sample: Callable[[int, torch.Generator], tuple[torch.Tensor, ...]] = field(repr=False, default=None)  # type: ignore[assignment]

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    @property
    def max_batch_size(self) -> int:
        return self.profile.max

    def module(self, nets) -> nn.Module:
        """The exportable nn.Module for this network (eval mode), taking the inputs in spec order."""
        owner = getattr(nets, self.owner)
        return (owner if self.method == "forward" else _WRAPPERS[self.method](owner)).eval()

    def callable(self, nets) -> Callable[..., torch.Tensor]:
        """The PyTorch callable `flowact.runtime.Runners` holds for this network, from the family."""
        return self.owner_callable(getattr(nets, self.owner))

    def owner_callable(self, owner: nn.Module) -> Callable[..., torch.Tensor]:
        """The same callable from the owner module alone (a network built without the rest of its family)."""
        return owner if self.method == "forward" else getattr(owner, self.method)

    def sample_inputs(self, batch: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
        """Random inputs of the right dtypes and shapes (export tracing, smoke tests)."""
        tensors = self.sample(batch, torch.Generator().manual_seed(seed))
        for spec, tensor in zip(self.inputs, tensors, strict=True):
            assert tuple(tensor.shape) == spec.shape(batch) and tensor.dtype == spec.torch_dtype, spec.name
        return tensors

    def zeros(self, batch: int) -> dict[str, np.ndarray]:
        """Zero-filled input buffers by name (runtime buffers, warm-up requests)."""
        return {t.name: np.zeros(t.shape(batch), dtype=t.dtype) for t in self.inputs}


def network_specs(preset: Preset) -> dict[str, NetworkSpec]:
    """The specs of a preset's networks, in the order of `flowact.runtime.Runners`' fields."""
    p = preset
    f32, u8, i64, b8 = np.dtype(np.float32), np.dtype(np.uint8), np.dtype(np.int64), np.dtype(np.bool_)
    lat = (p.latent_height, p.latent_width)
    fm = p.memory_frames
    head_dim = p.dim // p.heads
    profile = BATCH_PROFILES.get(p.name, DEFAULT_PROFILE)

    audio_window = TensorSpec(AUDIO_WINDOW, f32, (BATCH, p.audio_window_samples))
    audio_features = TensorSpec(AUDIO_FEATURES, f32, (BATCH, AUDIO_FEATURES_PER_CHUNK, p.audio.d_model))
    ref_image = TensorSpec(REF_IMAGE, u8, (BATCH, p.height, p.width, 3))
    ref_latent = TensorSpec(REF_LATENT, f32, (BATCH, LATENT_CHANNELS, *lat))
    latents = TensorSpec(LATENTS, f32, (BATCH, 1 + LATENT_FRAMES_PER_CHUNK, LATENT_CHANNELS, *lat))
    frames = TensorSpec(FRAMES, u8, (BATCH, FRAMES_PER_CHUNK, p.height, p.width, 3))
    memory = TensorSpec(MEMORY, f32, (BATCH, fm, LATENT_CHANNELS, *lat))
    memory_valid = TensorSpec(MEMORY_VALID, b8, (BATCH, fm))
    memory_kv = TensorSpec(MEMORY_KV, f32, (BATCH, p.depth, 2, p.heads, fm * p.tokens_per_frame, head_dim))
    x = TensorSpec(X, f32, (BATCH, LATENT_FRAMES_PER_CHUNK, LATENT_CHANNELS, *lat))
    t = TensorSpec(T, f32, (BATCH, LATENT_FRAMES_PER_CHUNK))
    prompt_tokens = TensorSpec(PROMPT_TOKENS, f32, (BATCH, p.prompt_tokens, p.text_dim))
    velocity = TensorSpec(VELOCITY, f32, (BATCH, LATENT_FRAMES_PER_CHUNK, LATENT_CHANNELS, *lat))
    prompt_ids = TensorSpec(PROMPT_IDS, i64, (BATCH, p.prompt_tokens))

    def randn(spec: TensorSpec, b: int, g: torch.Generator) -> torch.Tensor:
        return torch.randn(spec.shape(b), generator=g)

    def valid_mask(b: int, g: torch.Generator) -> torch.Tensor:
        v = torch.rand(memory_valid.shape(b), generator=g) < 0.7
        v[:, 0] = True  # the reference slot is always filled
        return v

    specs = [
        NetworkSpec("audio_encoder", (audio_window,), (audio_features,), profile, "audio_encoder",
                    sample=lambda b, g: (0.1 * randn(audio_window, b, g),)),
        NetworkSpec("vae_encoder", (ref_image,), (ref_latent,), profile, "vae_encoder",
                    sample=lambda b, g: (torch.randint(0, 256, ref_image.shape(b), generator=g, dtype=torch.uint8),)),
        NetworkSpec("vae_decoder", (latents,), (frames,), profile, "vae_decoder", int8=Int8.STATIC,
                    sample=lambda b, g: (randn(latents, b, g),)),
        NetworkSpec("denoiser_memory", (memory, memory_valid), (memory_kv,), profile, "denoiser", "memory_kv", Int8.DYNAMIC,
                    sample=lambda b, g: (randn(memory, b, g), valid_mask(b, g))),
        NetworkSpec("denoiser", (x, t, audio_features, prompt_tokens, memory_kv, memory_valid), (velocity,), profile,
                    "denoiser", "forward_stream", Int8.DYNAMIC,
                    sample=lambda b, g: (randn(x, b, g), torch.rand(t.shape(b), generator=g),
                                         randn(audio_features, b, g), randn(prompt_tokens, b, g),
                                         randn(memory_kv, b, g), valid_mask(b, g))),
        NetworkSpec("text_encoder", (prompt_ids,), (prompt_tokens,), profile, "text_encoder",
                    sample=lambda b, g: (torch.randint(0, 257, prompt_ids.shape(b), generator=g),)),
    ]
    assert tuple(s.name for s in specs) == NETWORK_NAMES
    return {s.name: s for s in specs}
