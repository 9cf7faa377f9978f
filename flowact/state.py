"""Everything one stream carries between chunks, and where it lives.

`StreamState` is the only per-stream object: its tensors (`state_tensors`: the memory bank, the
decode context, the audio window, the last audio features) are views of one `StatePool` slot on
the engine's device, next to a per-stream generator, the chunk index and the conditioning texts.
`MemoryBank` reads the bank's tensors as [reference | long-term queue | short-term chunk]. The
snapshot layout (flowact.snapshot) is made from `StreamState.layout`.

The chunk computation that advances a state is flowact.engine.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from flowact.contract import DEFAULT_PROMPT
from flowact.presets import AUDIO_FEATURES_PER_CHUNK, LATENT_CHANNELS, LATENT_FRAMES_PER_CHUNK, SAMPLES_PER_CHUNK, Preset

Tensor = torch.Tensor


class MemoryBank:
    """Fixed-size latent memory of one stream: [reference | long-term queue | short-term chunk].

    Slots have fixed positions; `valid` marks the filled ones. When a new chunk arrives, the
    short-term chunk leaves and its last latent frame joins the long-term queue (oldest dropped).
    `latents` and `valid` may be views into a `StatePool` slot."""

    def __init__(self, reference: Tensor, long_term_size: int, latents: Tensor | None = None,
                 valid: Tensor | None = None):
        """A new bank holding only `reference` (16, h, w), in `latents` / `valid` when given."""
        c, h, w = reference.shape
        frames = 1 + long_term_size + LATENT_FRAMES_PER_CHUNK
        if latents is None:
            latents = torch.zeros(frames, c, h, w, dtype=reference.dtype, device=reference.device)
            valid = torch.zeros(frames, dtype=torch.bool, device=reference.device)
        self.long_term_size, self.latents, self.valid = long_term_size, latents, valid  # (Fm, C, h, w), (Fm,)
        self.latents.zero_()
        self.valid.zero_()
        self.latents[0] = reference
        self.valid[0] = True

    @classmethod
    def over(cls, latents: Tensor, valid: Tensor, long_term_size: int) -> "MemoryBank":
        """The bank already held in `latents` (Fm, C, h, w) and `valid` (Fm,) (a restored state)."""
        bank = cls.__new__(cls)
        bank.long_term_size, bank.latents, bank.valid = long_term_size, latents, valid
        return bank

    @property
    def short_term(self) -> slice:
        return slice(1 + self.long_term_size, None)

    def has_short_term(self) -> bool:
        return bool(self.valid[self.short_term].all())

    def full(self) -> bool:
        """Every slot filled: attention over this memory needs no mask."""
        return bool(self.valid.all())

    def push(self, chunk: Tensor) -> None:
        """chunk (3, C, h, w): the newest generated chunk becomes short-term memory."""
        lt = slice(1, 1 + self.long_term_size)
        if self.long_term_size and self.has_short_term():
            self.latents[lt] = torch.cat([self.latents[2:1 + self.long_term_size], self.latents[self.short_term][-1:]])
            self.valid[lt] = torch.cat([self.valid[2:1 + self.long_term_size],
                                        torch.ones(1, dtype=torch.bool, device=self.valid.device)])
        self.latents[self.short_term] = chunk
        self.valid[self.short_term] = True

    def without_short_term(self) -> Tensor:
        """Validity with the short-term slot hidden (memory refinement attends to the rest)."""
        valid = self.valid.clone()
        valid[self.short_term] = False
        return valid


RNG_STATE_BYTES = {"cpu": 5056, "cuda": 16}  # torch.Generator(device).get_state(): mt19937 on the CPU, Philox on CUDA


def rng_state_bytes(device: torch.device) -> int:
    """Size of a per-stream generator's state on this kind of device (known without the device: a CPU
    machine renders a GPU repository)."""
    if device.type not in RNG_STATE_BYTES:
        raise ValueError(f"no per-stream generator layout for device kind {device.type!r}")
    return RNG_STATE_BYTES[device.type]


def state_tensors(preset: Preset, dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The tensors of one stream's state: name -> (shape, dtype). The one list of them: the pool's
    slabs, the state's views and the snapshot layout are all made from it."""
    p, lat = preset, (LATENT_CHANNELS, preset.latent_height, preset.latent_width)
    return {
        "memory_latents": ((p.memory_frames, *lat), dtype),  # MemoryBank: [reference | long-term | short-term]
        "memory_valid": ((p.memory_frames,), torch.bool),  # MemoryBank: filled slots
        "decode_context": ((1, *lat), dtype),  # the last latent frame shown: the decoder's context
        "audio_window": ((p.audio_window_samples,), torch.float32),  # bounded audio context + newest chunk
        "last_audio_features": ((AUDIO_FEATURES_PER_CHUNK, p.audio.d_model), dtype),  # of the short-term chunk
    }


class StreamState:
    """Everything one stream carries between chunks, as tensors on one device.

    `tensors` (`state_tensors`: views of one `StatePool` slot), a per-stream generator on the same
    device, the chunk index and the conditioning texts. `memory` is the MemoryBank over the memory
    tensors. `layout()` lists what a snapshot holds; `arrays()` / `header()` / `load()` read and write
    exactly that."""

    HEADER = ("chunk_index", "prompt", "last_prompt", "has_last_audio")

    def __init__(self, preset: Preset, device: torch.device, dtype: torch.dtype, tensors: dict[str, Tensor]):
        self.preset, self.device, self.dtype = preset, device, dtype
        self.tensors = tensors
        self.memory: MemoryBank | None = None
        self.generator = torch.Generator(device=device)
        self.chunk_index = 0
        self.prompt = self.last_prompt = DEFAULT_PROMPT
        self.has_last_audio = False
        self.pool_slot: int | None = None

    @property
    def started(self) -> bool:
        """Begun, or loaded from a snapshot: its memory bank holds a reference."""
        return self.memory is not None

    @property
    def decode_context(self) -> Tensor:
        return self.tensors["decode_context"]  # (1, 16, h, w)

    @property
    def audio_window(self) -> Tensor:
        return self.tensors["audio_window"]  # (S,)

    @property
    def last_audio(self) -> Tensor:
        return self.tensors["last_audio_features"]  # (12, Da)

    # --- verbs --------------------------------------------------------------------------------

    def begin(self, reference: Tensor, seed: int, prompt: str) -> None:
        """A fresh stream: reference latent (16, h, w) in slot 0, empty context, seeded noise."""
        for t in self.tensors.values():
            t.zero_()
        self.memory = MemoryBank(reference.to(self.device, self.dtype), self.preset.long_term_size,
                                 self.tensors["memory_latents"], self.tensors["memory_valid"])
        self.decode_context.copy_(reference[None])
        self.generator.manual_seed(seed)
        self.chunk_index = 0
        self.prompt = self.last_prompt = prompt
        self.has_last_audio = False

    def accept_audio(self, chunk: Tensor) -> Tensor:
        """Append one chunk (7680,) to the bounded audio context -> the encoder's window (S,)."""
        window = self.audio_window
        window.copy_(torch.cat([window[SAMPLES_PER_CHUNK:], chunk.to(window.device)]))
        return window

    def refinement_due(self) -> bool:
        k = self.preset.refine_every
        return k > 0 and self.chunk_index > 0 and self.chunk_index % k == 0 and self.memory.has_short_term()

    def noise(self, shape: tuple[int, ...]) -> Tensor:
        return torch.randn(shape, generator=self.generator, device=self.device)

    def advance(self, chunk: Tensor, audio_features: Tensor, prompt: str) -> None:
        """chunk (3, 16, h, w) was generated with these features (12, Da): it becomes short-term memory."""
        self.memory.push(chunk)
        self.decode_context.copy_(chunk[-1:])
        self.last_audio.copy_(audio_features)
        self.has_last_audio = True
        self.last_prompt = prompt
        self.chunk_index += 1

    # --- snapshot layout ----------------------------------------------------------------------

    @staticmethod
    def layout(preset: Preset, device_kind: str = "cpu") -> list[tuple[str, np.dtype, tuple[int, ...]]]:
        """(name, dtype, shape) of every array of a snapshot, in order: the state's tensors (floats as
        float32: exact for bf16 states), then the generator state of this device kind."""
        arrays = [(name, np.dtype(np.bool_ if dt == torch.bool else np.float32), shape)
                  for name, (shape, dt) in state_tensors(preset, torch.float32).items()]
        return [*arrays, ("rng_state", np.dtype(np.uint8), (rng_state_bytes(torch.device(device_kind)),))]

    def arrays(self) -> dict[str, np.ndarray]:
        out = {name: (t.float() if t.is_floating_point() else t).cpu().numpy() for name, t in self.tensors.items()}
        return {**out, "rng_state": self.generator.get_state().cpu().numpy()}

    def header(self) -> dict:
        return {key: getattr(self, key) for key in self.HEADER}

    def load(self, arrays: dict[str, np.ndarray], header: dict) -> None:
        """Set every field from checked snapshot parts (`arrays()` / `header()` of another state)."""
        self.generator.set_state(torch.from_numpy(arrays["rng_state"].copy()))  # first: raises on a bad state
        for name, t in self.tensors.items():
            t.copy_(torch.from_numpy(arrays[name].copy()))
        self.memory = MemoryBank.over(self.tensors["memory_latents"], self.tensors["memory_valid"],
                                      self.preset.long_term_size)
        for key in self.HEADER:
            setattr(self, key, header[key])


class StateCapacityError(RuntimeError):
    """A pool of this capacity does not fit in the device's free memory."""


def free_bytes(device: torch.device) -> int:
    """Free memory on a device: the CUDA allocator's view, or the host's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


class StatePool:
    """The per-stream state of `capacity` streams, allocated once on one device.

    One slab per state tensor, a row per stream, so a stream's state never moves, and a server
    knows at start whether its capacity fits: with `check_fits`, capacity x (state + memory K/V
    workspace) must fit in the device's free memory, or `StateCapacityError` names the numbers.
    The memory keys/values are computed once per chunk by the runners (`kv_bytes_per_stream`)."""

    def __init__(self, preset: Preset, capacity: int, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, check_fits: bool = False, kv_dtype: torch.dtype | None = None):
        """`kv_dtype`: what the runners compute the memory K/V in (default `dtype`; ONNX graphs and
        TensorRT plans: their MEMORY_KV output's)."""
        self.preset, self.capacity = preset, capacity
        self.device, self.dtype, self.kv_dtype = torch.device(device), dtype, kv_dtype or dtype
        self.shapes = state_tensors(preset, dtype)
        if check_fits:
            need, free = capacity * (self.bytes_per_stream + self.kv_bytes_per_stream), free_bytes(self.device)
            if need > free:
                raise StateCapacityError(
                    f"capacity {capacity} needs {need / 2**30:.2f} GiB of per-stream state on {self.device} "
                    f"({self.describe_stream()}), but {free / 2**30:.2f} GiB are free: lower the capacity")
        self.slabs = {name: torch.zeros((capacity, *shape), dtype=dt, device=self.device)
                      for name, (shape, dt) in self.shapes.items()}
        self.free = list(range(capacity - 1, -1, -1))

    @property
    def bytes_per_stream(self) -> int:
        return sum(math.prod(shape) * torch.tensor([], dtype=dt).element_size() for shape, dt in self.shapes.values())

    @property
    def kv_bytes_per_stream(self) -> int:
        """Memory keys/values of one stream in the runners' K/V dtype: depth x 2 x Nm x dim."""
        p = self.preset
        tokens = p.memory_frames * (p.latent_height // p.patch) * (p.latent_width // p.patch)
        return p.depth * 2 * tokens * p.dim * torch.tensor([], dtype=self.kv_dtype).element_size()

    def describe_stream(self) -> str:
        return (f"{(self.bytes_per_stream + self.kv_bytes_per_stream) / 2**20:.1f} MiB per stream: state "
                f"{self.bytes_per_stream / 2**20:.2f} MiB + memory K/V {self.kv_bytes_per_stream / 2**20:.1f} MiB "
                f"in {str(self.kv_dtype).removeprefix('torch.')}")

    def acquire(self) -> StreamState:
        if not self.free:
            raise RuntimeError(f"state pool exhausted ({self.capacity} slots)")
        i = self.free.pop()
        state = StreamState(self.preset, self.device, self.dtype, {k: v[i] for k, v in self.slabs.items()})
        state.pool_slot = i
        return state

    def release(self, state: StreamState) -> None:
        if state.pool_slot is not None and state.pool_slot not in self.free:
            self.free.append(state.pool_slot)
            state.pool_slot = None
