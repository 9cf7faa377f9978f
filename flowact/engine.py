"""The stream engine: the chunk computation of every stream in one process.

A `StreamEngine` owns what its streams share: the runners (the networks, whatever runs them), the
prompt cache and the state pool. Each stream is one `StreamState` (flowact.state) the engine hands
out with `start` / `resume` and takes back with `end`. Per 0.48 s of audio, `denoise` advances many
streams in one batched call per network (audio encoder, memory pass, 3-NFE flow matching, memory
refinement every K chunks) and returns the decoder's input; `decode` turns it into 12 frames per
stream; `step` is both. The Triton `stream` model runs `denoise` and the ensemble's decoder model
`decode`'s network; `flowact generate`, the benchmarks and calibration call the engine directly.

The engine trusts its inputs: requests are checked where they enter (flowact.validate, through
flowact.serving.streams.parse_request). It knows nothing about Triton, gRPC or files, and calls
its networks through `flowact.runtime.Runners`, so ONNX Runtime or TensorRT replace the PyTorch
modules without the sampler noticing.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from flowact.contract import DEFAULT_PROMPT
from flowact.models.text_encoder import tokenize
from flowact.presets import LATENT_CHANNELS, LATENT_FRAMES_PER_CHUNK, SAMPLES_PER_CHUNK, Preset
from flowact.runtime import Runners
from flowact.runtime.pytorch import default_dtype
from flowact.state import StatePool, StreamState

Tensor = torch.Tensor


def sampling_times(nfe: int, shift: float, start: float = 1.0) -> list[float]:
    """Shifted flow-matching times from `start` down to 0 (nfe + 1 values)."""
    times = []
    for i in range(nfe + 1):
        s = start * (1.0 - i / nfe)
        times.append(shift * s / (1.0 + (shift - 1.0) * s))
    return times


class PromptCache:
    """Prompt text -> prompt tokens, encoded once per distinct text (LRU)."""

    def __init__(self, text_encoder, preset: Preset, device: torch.device, dtype: torch.dtype, size: int = 64):
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


class StreamEngine:
    """Runners, prompt cache and the states of up to `capacity` streams, on one device.

    `dtype` (default: bf16 on CUDA, float32 elsewhere) is what the states and the sampler keep;
    with `check_fits` the pool refuses a capacity the device's free memory cannot hold
    (flowact.state.StateCapacityError names the numbers)."""

    def __init__(self, preset: Preset, runners: Runners, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None, capacity: int = 1, check_fits: bool = False):
        self.preset, self.runners = preset, runners
        self.device = torch.device(device)
        self.dtype = dtype or default_dtype(self.device)
        self.pool = StatePool(preset, capacity, self.device, self.dtype, check_fits, runners.kv_dtype)
        self.prompts = PromptCache(runners.text_encoder, preset, self.device, self.dtype)

    # --- streams ------------------------------------------------------------------------------

    def start(self, image: np.ndarray, seed: int = 0, prompt: str = DEFAULT_PROMPT) -> StreamState:
        """A new stream from its reference image (H, W, 3) uint8: a pool slot holding the reference
        latent, seeded noise and `prompt`."""
        state = self.pool.acquire()
        try:
            with torch.inference_mode():
                image_t = torch.from_numpy(np.ascontiguousarray(image))[None].to(self.device)  # (1, H, W, 3)
                state.begin(self.runners.vae_encoder(image_t)[0], seed, prompt)  # reference latent (16, h, w)
        except BaseException:
            self.pool.release(state)
            raise
        return state

    def resume(self, arrays: dict[str, np.ndarray], header: dict) -> StreamState:
        """A stream continued from checked snapshot parts (flowact.snapshot) instead of `start`."""
        state = self.pool.acquire()
        try:
            with torch.inference_mode():
                state.load(arrays, header)
        except BaseException:
            self.pool.release(state)
            raise
        return state

    def end(self, state: StreamState) -> None:
        """The stream is over: its slot goes back to the pool."""
        self.pool.release(state)

    def warm_up(self) -> None:
        """A throwaway stream, so that the first clients' chunks run warm (allocator arenas, kernels, the
        default prompt's tokens): until its memory is full (then attention without a mask: other
        kernels) and it has refined its memory once."""
        p = self.preset
        state = self.start(np.zeros((p.height, p.width, 3), dtype=np.uint8))
        try:
            for _ in range(max(p.long_term_size + 1, p.refine_every) + 1):  # the memory is full after 1 + long-term
                self.denoise([state], [np.zeros(SAMPLES_PER_CHUNK, dtype=np.float32)])
        finally:
            self.end(state)

    # --- the chunk step -----------------------------------------------------------------------

    def step(self, states: Sequence[StreamState], audio: Sequence[np.ndarray],
             prompts: Sequence[str | None] | None = None) -> list[np.ndarray]:
        """The next chunk of every stream, decoded: one uint8 (12, H, W, 3) array each."""
        if not states:
            return []
        return list(self.decode(self.denoise(states, audio, prompts)).cpu().numpy())

    def decode(self, latents: Tensor) -> Tensor:
        """[decode context | chunk] latents (B, 1+3, 16, h, w) -> frames (B, 12, H, W, 3) uint8."""
        with torch.inference_mode():
            return self.runners.vae_decoder(latents)

    def denoise(self, states: Sequence[StreamState], audio: Sequence[np.ndarray],
                prompts: Sequence[str | None] | None = None) -> Tensor:
        """The DiT half of a chunk step for many streams: one batched call per network and NFE.

        audio: one float32 (7680,) chunk per stream; prompts: this chunk's text per stream (None: the
        stream's own). Returns the decoder's input, [decode context | new chunk] latents
        (B, 1+3, 16, h, w) on the engine's device; the server decodes them in a separate pipeline
        stage, so decoding chunk n overlaps denoising n+1. Host<->device traffic: the audio chunks in,
        the latents out."""
        p, run, dev, dt = self.preset, self.runners, self.device, self.dtype
        texts = [st.prompt if pr is None else pr for st, pr in zip(states, prompts or [None] * len(states))]
        with torch.inference_mode():
            # Step 1: audio features of the new chunk from each stream's bounded audio context.
            new_audio = torch.from_numpy(np.stack(audio)).to(dev)  # (B, 7680): the only input that crosses
            windows = torch.stack([st.accept_audio(a) for st, a in zip(states, new_audio)])  # (B, S)
            features = run.audio_encoder(windows).to(dt)  # (B, 12, Da)
            prompt = self.prompts(texts)  # (B, P, Dt)

            # Step 2: memory refinement, every K chunks: re-noise short-term memory to t_r and denoise
            # it again against reference + long-term memory (with the audio and prompt it was made with).
            due = [st for st in states if st.refinement_due()]
            if due:
                self.refine(due)

            # Steps 3-4, per group of streams that attend to their memory alike: full memory without a
            # mask (flash / cuDNN kernels); a new stream's valid slots only, or its mask (memory_groups).
            x = torch.empty(len(states), LATENT_FRAMES_PER_CHUNK, LATENT_CHANNELS, p.latent_height, p.latent_width,
                            device=dev, dtype=dt)  # (B, 3, 16, h, w)
            for group, view in memory_groups([st.memory.valid for st in states], run.memory_subsets):
                members = [states[i] for i in group]
                idx = torch.tensor(group, device=dev)
                kv, valid = self.memory_pass(members, torch.stack([st.memory.valid for st in members]), view)
                noise = torch.stack([st.noise(tuple(x.shape[1:])) for st in members]).to(dt)  # (G, 3, 16, h, w)
                x[idx] = self.integrate(noise, sampling_times(p.nfe, p.timestep_shift), features[idx], prompt[idx],
                                        kv, valid)

            # Step 5: the decoder sees the last latent frame already shown (continuous seams).
            context = torch.stack([st.decode_context for st in states]).to(dt)  # (B, 1, 16, h, w)
            latents = torch.cat([context, x], dim=1)  # (B, 1+3, 16, h, w)

            # Step 6: memory update: this chunk becomes short-term memory.
            for i, st in enumerate(states):
                st.advance(x[i], features[i], texts[i])
        return latents

    def refine(self, states: Sequence[StreamState]) -> None:
        """Memory refinement: short-term memory re-noised to t_r and denoised against reference +
        long-term memory (the short-term slot hidden: its slots left out, or masked), batched per view,
        with the audio and prompt each chunk was made with."""
        p, dt = self.preset, self.dtype
        hidden = [st.memory.without_short_term() for st in states]  # (Fm,) each
        times = sampling_times(max(1, math.ceil(p.nfe * p.refine_t)), 1.0, start=p.refine_t)
        for group, view in memory_groups(hidden, self.runners.memory_subsets):
            members = [states[i] for i in group]
            kv, valid = self.memory_pass(members, torch.stack([hidden[i] for i in group]), view)
            short = torch.stack([st.memory.latents[st.memory.short_term] for st in members])  # (G, 3, 16, h, w)
            noise = torch.stack([st.noise(tuple(short.shape[1:])) for st in members]).to(dt)  # (G, 3, 16, h, w)
            x = (1.0 - p.refine_t) * short + p.refine_t * noise  # (G, 3, 16, h, w)
            audio = torch.stack([st.last_audio for st in members])  # (G, 12, Da)
            x = self.integrate(x, times, audio, self.prompts([st.last_prompt for st in members]), kv, valid)
            for st, refined in zip(members, x):
                st.memory.latents[st.memory.short_term] = refined

    def memory_pass(self, states: Sequence[StreamState], valid: Tensor,
                    view: MemoryView) -> tuple[Tensor, Tensor | None]:
        """The memory keys/values of a group, once per chunk (the fake-causal mask makes reusing them
        exact): valid (G, Fm) -> kv (G, depth, 2, H, Nm', Dh) and the mask the NFEs then need (None: none)."""
        memory = torch.stack([st.memory.latents for st in states])  # (G, Fm, 16, h, w)
        if view.slots is not None:
            slots = torch.tensor(view.slots, device=memory.device)  # (Fm',)
            return self.runners.denoiser_memory(memory[:, slots], None, slots), None
        mask = valid if view.masked else None
        return self.runners.denoiser_memory(memory, mask), mask

    def integrate(self, x: Tensor, times: Sequence[float], audio: Tensor, prompt: Tensor, kv: Tensor,
                  valid: Tensor | None) -> Tensor:
        """Euler flow matching of x (G, 3, 16, h, w) along `times` against the memory kv."""
        for t_now, t_next in zip(times[:-1], times[1:]):
            # float32 whatever the state's dtype: in bf16 0.857 would be 0.855 (x1000 in the time embedding)
            t = torch.full((x.shape[0], LATENT_FRAMES_PER_CHUNK), t_now, device=x.device, dtype=torch.float32)  # (G, 3)
            x = x + (t_next - t_now) * self.runners.denoiser(x, t, audio, prompt, kv, valid).to(self.dtype)  # (G, 3, 16, h, w)
        return x


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
