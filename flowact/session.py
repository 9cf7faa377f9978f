"""One avatar stream and the batched chunk step: memory bank, 3-NFE flow-matching sampler, memory
refinement, audio context.

A `StreamSession` turns a reference image plus 0.48 s audio chunks into 12 uint8 frames per
chunk, in constant memory, for as long as the stream lasts. Everything it carries between chunks
is one `StreamState` (tensors on the session's device, verbs to advance them); a `StatePool`
allocates the states of a server's streams up front, sized by its capacity. `step_batch` /
`denoise_batch` step many sessions in one batched call per network, which is what the Triton
`stream` model runs.

This module knows nothing about Triton, gRPC or files. It calls its networks through
`flowact.runtime.Runners`: callables with the PyTorch modules' signatures, so ONNX Runtime,
or TensorRT runners replace the modules without the sampler noticing.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from flowact.contract import DEFAULT_PROMPT, MAX_AUDIO_MAGNITUDE, MAX_PROMPT_BYTES, MAX_SEED
from flowact.models.text_encoder import tokenize
from flowact.presets import (AUDIO_FEATURES_PER_CHUNK, LATENT_CHANNELS, LATENT_FRAMES_PER_CHUNK, SAMPLE_RATE,
                             SAMPLES_PER_CHUNK, Preset)
from flowact.runtime import Runners

Tensor = torch.Tensor


class InputError(ValueError):
    """A request the sampler refuses; the message names the field and the rule."""


def sampling_times(nfe: int, shift: float, start: float = 1.0) -> list[float]:
    """Shifted flow-matching times from `start` down to 0 (nfe + 1 values)."""
    times = []
    for i in range(nfe + 1):
        s = start * (1.0 - i / nfe)
        times.append(shift * s / (1.0 + (shift - 1.0) * s))
    return times


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


class StreamSession:
    """One avatar stream. `start()` once (or `restore()` from a snapshot), then `step()` per 0.48 s chunk."""

    def __init__(self, preset: Preset, runners: Runners, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, prompt_cache: "PromptCache | None" = None,
                 state: StreamState | None = None):
        self.preset = preset
        self.runners = runners
        self.device = torch.device(device)
        self.dtype = dtype
        self.prompts = prompt_cache or PromptCache(runners.text_encoder, preset, self.device, dtype)
        self.state = state or StatePool(preset, 1, self.device, dtype).acquire()
        self.started = False

    @property
    def chunk_index(self) -> int:
        return self.state.chunk_index

    # --- lifecycle --------------------------------------------------------------------------

    def start(self, ref_image: np.ndarray, seed: int = 0, prompt: str = DEFAULT_PROMPT) -> None:
        image = check_image(ref_image, self.preset)
        check_seed(seed)
        prompt = check_prompt(prompt, "prompt")
        with torch.inference_mode():
            image_t = torch.from_numpy(np.ascontiguousarray(image))[None].to(self.device)  # (1, H, W, 3)
            reference = self.runners.vae_encoder(image_t)[0]  # (16, h, w)
            self.state.begin(reference, seed, prompt)
        self.started = True

    def restore(self, arrays: dict[str, np.ndarray], header: dict) -> None:
        """Continue a stream from checked snapshot parts (flowact.snapshot) instead of `start()`."""
        with torch.inference_mode():
            self.state.load(arrays, header)
        self.started = True

    def step(self, audio_chunk: np.ndarray, prompt: str | None = None, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
        """audio_chunk float32 (7680,) at 16 kHz -> frames uint8 (12, H, W, 3)."""
        if sample_rate != SAMPLE_RATE:
            raise InputError(f"audio: sample rate must be {SAMPLE_RATE} Hz, got {sample_rate} "
                             "(resample first, e.g. flowact.media.resample)")
        return step_batch([self], [audio_chunk], [prompt])[0]


class PromptCache:
    """Prompt text -> prompt tokens, encoded once per distinct text (LRU)."""

    def __init__(self, text_encoder, preset: Preset, device, dtype, size: int = 64):
        self.text_encoder, self.preset, self.device, self.dtype, self.size = text_encoder, preset, device, dtype, size
        self.cache: OrderedDict[str, Tensor] = OrderedDict()

    def __call__(self, texts: Sequence[str]) -> Tensor:
        """B texts -> (B, P, Dt)."""
        missing = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if missing:
            ids = tokenize(missing, self.preset.prompt_tokens).to(self.device)  # (M, P)
            with torch.inference_mode():
                tokens = self.text_encoder(ids).to(self.dtype)  # (M, P, Dt)
            for text, tok in zip(missing, tokens):
                self.cache[text] = tok
        for text in texts:
            self.cache.move_to_end(text)
        while len(self.cache) > self.size:
            self.cache.popitem(last=False)
        return torch.stack([self.cache[t] for t in texts])


# --- validation -----------------------------------------------------------------------------------


def check_audio_chunk(audio, name: str = "audio") -> np.ndarray:
    if not isinstance(audio, np.ndarray):
        raise InputError(f"{name}: expected a numpy float32 array, got {type(audio).__name__}")
    if audio.dtype != np.float32:
        raise InputError(f"{name}: dtype must be float32, got {audio.dtype}")
    if audio.shape != (SAMPLES_PER_CHUNK,):
        raise InputError(f"{name}: shape must be ({SAMPLES_PER_CHUNK},) (0.48 s at 16 kHz), got {audio.shape}")
    if not np.isfinite(audio).all():
        raise InputError(f"{name}: contains NaN or Inf samples")
    if np.abs(audio).max(initial=0.0) > MAX_AUDIO_MAGNITUDE:
        raise InputError(f"{name}: sample magnitude {np.abs(audio).max():.3g} is absurd (expected about [-1, 1])")
    return audio


def check_image(image, preset: Preset, name: str = "reference image") -> np.ndarray:
    if not isinstance(image, np.ndarray):
        raise InputError(f"{name}: expected a numpy uint8 array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise InputError(f"{name}: dtype must be uint8, got {image.dtype}")
    expected = (preset.height, preset.width, 3)
    if image.shape != expected:
        raise InputError(f"{name}: shape must be {expected} (H, W, RGB) for preset {preset.name}, got {image.shape}")
    return image


def check_prompt(prompt, name: str = "prompt") -> str:
    if not isinstance(prompt, str):
        raise InputError(f"{name}: expected text, got {type(prompt).__name__}")
    if len(prompt.encode("utf-8")) > MAX_PROMPT_BYTES:
        raise InputError(f"{name}: {len(prompt.encode('utf-8'))} bytes is longer than {MAX_PROMPT_BYTES}")
    return prompt


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise InputError(f"seed: expected an integer, got {type(seed).__name__}")
    if not 0 <= int(seed) <= MAX_SEED:
        raise InputError(f"seed: {seed} is out of range [0, {MAX_SEED}]")
    return int(seed)


# --- the batched chunk step -----------------------------------------------------------------------


def step_batch(sessions: Sequence[StreamSession], audio_chunks: Sequence[np.ndarray],
               prompts: Sequence[str | None]) -> list[np.ndarray]:
    """Generate and decode the next chunk of every session: one uint8 (12, H, W, 3) array each."""
    if not sessions:
        return []
    latents = denoise_batch(sessions, audio_chunks, prompts)  # (B, 1+3, 16, h, w)
    with torch.inference_mode():
        frames = sessions[0].runners.vae_decoder(latents).cpu().numpy()  # (B, 12, H, W, 3) uint8
    return list(frames)


def denoise_batch(sessions: Sequence[StreamSession], audio_chunks: Sequence[np.ndarray],
                  prompts: Sequence[str | None]) -> Tensor:
    """The DiT half of a chunk step for many sessions: one batched call per network and NFE.

    Returns the decoder's input, [decode context | new chunk] latents (B, 1+3, 16, h, w) on the
    sessions' device; the server decodes them in a separate pipeline stage so decoding chunk n
    overlaps denoising n+1. All sessions must share preset, runners and device; state advances only
    if every input is valid. Host<->device traffic: the audio chunks in, the latents out."""
    first = sessions[0]
    p, run, dev, dt = first.preset, first.runners, first.device, first.dtype
    for s in sessions:
        if not s.started:
            raise InputError("stream not started: send the reference image with START first")
        if s.runners is not run or s.preset != p or s.device != dev:
            raise ValueError("denoise_batch needs sessions that share one preset, one set of runners and one device")
    chunks = [check_audio_chunk(a) for a in audio_chunks]
    texts = [s.state.prompt if pr is None else check_prompt(pr) for s, pr in zip(sessions, prompts)]
    states = [s.state for s in sessions]

    with torch.inference_mode():
        # Step 1: audio features of the new chunk from each stream's bounded audio context.
        new_audio = torch.from_numpy(np.stack(chunks)).to(dev)  # (B, 7680): the only input that crosses
        windows = torch.stack([st.accept_audio(a) for st, a in zip(states, new_audio)])  # (B, S)
        audio = run.audio_encoder(windows).to(dt)  # (B, 12, Da)
        prompt = first.prompts(texts)  # (B, P, Dt)

        # Step 2: memory refinement, every K chunks: re-noise short-term memory to t_r and denoise
        # it again against reference + long-term memory (with the audio and prompt it was made with).
        due = [st for st in states if st.refinement_due()]
        if due:
            refine(due, run, first.prompts)

        # Steps 3-4, per group of streams that attend to their memory alike: full memory without a
        # mask (flash / cuDNN kernels); a new stream's valid slots only, or its mask (memory_groups).
        x = torch.empty(len(states), LATENT_FRAMES_PER_CHUNK, LATENT_CHANNELS, p.latent_height, p.latent_width,
                        device=dev, dtype=dt)  # (B, 3, 16, h, w)
        for group, view in memory_groups([st.memory.valid for st in states], run.memory_subsets):
            idx = torch.tensor(group, device=dev)
            x[idx] = denoise_group([states[i] for i in group], view, audio[idx], prompt[idx], run)

        # Step 5: the decoder sees the last latent frame already shown (continuous seams).
        context = torch.stack([st.decode_context for st in states]).to(dt)  # (B, 1, 16, h, w)
        latents = torch.cat([context, x], dim=1)  # (B, 1+3, 16, h, w)

        # Step 6: memory update: this chunk becomes short-term memory.
        for i, st in enumerate(states):
            st.advance(x[i], audio[i], texts[i])
    return latents


@dataclass(frozen=True)
class MemoryView:
    """How a group of streams attends to its memory bank."""

    slots: tuple[int, ...] | None  # only these bank slots, without a mask (memory_subsets runners); None: all
    masked: bool  # all slots with the validity mask (some slot empty, runners without subsets)


def memory_groups(valid: Sequence[Tensor], subsets: bool) -> list[tuple[list[int], MemoryView]]:
    """Streams grouped by how they attend, from each bank's validity (Fm,): a full bank with no mask;
    a partial one through its valid slots only (identical slots batch together), or with its mask.
    A new stream never puts a mask on the steady ones."""
    groups: dict[MemoryView, list[int]] = {}
    for i, v in enumerate(valid):
        slots = valid_slots(v)
        if len(slots) == len(v):
            view = MemoryView(None, False)
        elif subsets:
            view = MemoryView(slots, False)
        else:
            view = MemoryView(None, True)
        groups.setdefault(view, []).append(i)
    return [(group, view) for view, group in groups.items()]


def valid_slots(valid: Tensor) -> tuple[int, ...]:
    """The filled slots of one bank's validity (Fm,) bool, in bank order."""
    return tuple(j for j, filled in enumerate(valid.tolist()) if filled)


def memory_pass(memory: Tensor, valid: Tensor, view: MemoryView, run: Runners) -> tuple[Tensor, Tensor | None]:
    """memory (G, Fm, 16, h, w), valid (G, Fm) -> memory keys/values (G, depth, 2, H, Nm', Dh) and the
    mask the NFEs then need (None: none)."""
    if view.slots is not None:
        slots = torch.tensor(view.slots, device=memory.device)  # (Fm',)
        return run.denoiser_memory(memory[:, slots], None, slots), None
    mask = valid if view.masked else None
    return run.denoiser_memory(memory, mask), mask


def denoise_group(states: Sequence[StreamState], view: MemoryView, audio: Tensor, prompt: Tensor, run: Runners) -> Tensor:
    """Step 3: memory keys/values once per chunk (the fake-causal mask makes reusing them exact);
    step 4: 3-NFE Euler flow matching from each stream's seeded noise. -> x (G, 3, 16, h, w)."""
    p, dev, dt = states[0].preset, states[0].device, states[0].dtype
    memory = torch.stack([st.memory.latents for st in states])  # (G, Fm, 16, h, w)
    kv, valid = memory_pass(memory, torch.stack([st.memory.valid for st in states]), view, run)
    shape = (LATENT_FRAMES_PER_CHUNK, LATENT_CHANNELS, p.latent_height, p.latent_width)
    x = torch.stack([st.noise(shape) for st in states]).to(dt)  # (G, 3, 16, h, w)
    times = sampling_times(p.nfe, p.timestep_shift)
    for t_now, t_next in zip(times[:-1], times[1:]):
        # float32 whatever the state's dtype: in bf16 0.857 would be 0.855 (x1000 in the time embedding)
        t = torch.full((len(states), LATENT_FRAMES_PER_CHUNK), t_now, device=dev, dtype=torch.float32)  # (G, 3)
        x = x + (t_next - t_now) * run.denoiser(x, t, audio, prompt, kv, valid).to(dt)  # (G, 3, 16, h, w)
    return x


def refine(states: Sequence[StreamState], run: Runners, prompts: PromptCache) -> None:
    """Memory refinement: short-term memory re-noised to t_r and denoised against reference +
    long-term memory (the short-term slot hidden: its slots left out, or masked), batched per view."""
    hidden = [st.memory.without_short_term() for st in states]  # (Fm,) each
    for group, view in memory_groups(hidden, run.memory_subsets):
        refine_group([states[i] for i in group], torch.stack([hidden[i] for i in group]), view, run, prompts)


def refine_group(states: Sequence[StreamState], valid: Tensor, view: MemoryView, run: Runners,
                 prompts: PromptCache) -> None:
    p, dev, dt = states[0].preset, states[0].device, states[0].dtype
    short = torch.stack([st.memory.latents[st.memory.short_term] for st in states])  # (G, 3, 16, h, w)
    kv, valid = memory_pass(torch.stack([st.memory.latents for st in states]), valid, view, run)
    audio = torch.stack([st.last_audio for st in states])  # (G, 12, Da)
    prompt = prompts([st.last_prompt for st in states])  # (G, P, Dt)
    noise = torch.stack([st.noise(tuple(short.shape[1:])) for st in states]).to(dt)
    times = sampling_times(max(1, math.ceil(p.nfe * p.refine_t)), 1.0, start=p.refine_t)
    x = (1.0 - p.refine_t) * short + p.refine_t * noise  # (G, 3, 16, h, w)
    for t_now, t_next in zip(times[:-1], times[1:]):
        t = torch.full((len(states), LATENT_FRAMES_PER_CHUNK), t_now, device=dev, dtype=torch.float32)  # (G, 3)
        x = x + (t_next - t_now) * run.denoiser(x, t, audio, prompt, kv, valid).to(dt)
    for st, refined in zip(states, x):
        st.memory.latents[st.memory.short_term] = refined
