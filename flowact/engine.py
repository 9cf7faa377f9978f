"""The per-stream engine: memory bank, 3-NFE flow-matching sampler, memory refinement, audio context.

A `StreamSession` turns a reference image plus 0.48 s audio chunks into 12 uint8 frames per
chunk, in constant memory, for as long as the stream lasts. `step_batch` steps many sessions in
one batched forward pass per network call, which is what the Triton `stream` model runs.

The engine knows nothing about Triton, gRPC or files. It calls its networks through `Engines`:
plain callables with the PyTorch modules' signatures, so ONNX Runtime or TensorRT adapters
replace them without the engine noticing.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from flowact.contract import MAX_AUDIO_MAGNITUDE, MAX_PROMPT_BYTES, MAX_SEED
from flowact.models.text_encoder import tokenize
from flowact.presets import LATENT_CHANNELS, LATENT_FRAMES_PER_CHUNK, SAMPLE_RATE, SAMPLES_PER_CHUNK, Preset

Tensor = torch.Tensor


class InputError(ValueError):
    """A request the engine refuses; the message names the field and the rule."""


@dataclass(frozen=True)
class Engines:
    """The networks as callables (PyTorch modules, ONNX Runtime or TensorRT adapters)."""

    audio_encoder: Callable[[Tensor], Tensor]  # audio window (B, S) f32 -> features (B, 12, Da)
    vae_encoder: Callable[[Tensor], Tensor]  # image (B, H, W, 3) u8 -> latent (B, 16, h, w)
    vae_decoder: Callable[[Tensor], Tensor]  # latents (B, 1+3, 16, h, w) -> frames (B, 12, H, W, 3) u8
    denoiser_memory: Callable[[Tensor, Tensor], Tensor]  # memory (B, Fm, 16, h, w), valid (B, Fm) -> kv
    denoiser: Callable[..., Tensor]  # x, t, audio, prompt, kv, valid -> velocity (B, 3, 16, h, w)
    text_encoder: Callable[[Tensor], Tensor]  # byte ids (B, P) i64 -> prompt tokens (B, P, Dt)

    @classmethod
    def from_networks(cls, nets) -> "Engines":
        return cls(nets.audio_encoder, nets.vae_encoder, nets.vae_decoder, nets.denoiser.memory_kv,
                   nets.denoiser.forward_stream, nets.text_encoder)


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
    short-term chunk leaves and its last latent frame joins the long-term queue (oldest dropped)."""

    def __init__(self, reference: Tensor, long_term_size: int):
        c, h, w = reference.shape
        self.long_term_size = long_term_size
        self.latents = torch.zeros(1 + long_term_size + LATENT_FRAMES_PER_CHUNK, c, h, w)  # (Fm, C, h, w)
        self.valid = torch.zeros(self.latents.shape[0], dtype=torch.bool)  # (Fm,)
        self.latents[0] = reference
        self.valid[0] = True

    @property
    def short_term(self) -> slice:
        return slice(1 + self.long_term_size, None)

    def has_short_term(self) -> bool:
        return bool(self.valid[self.short_term].all())

    def push(self, chunk: Tensor) -> None:
        """chunk (3, C, h, w): the newest generated chunk becomes short-term memory."""
        lt = slice(1, 1 + self.long_term_size)
        if self.long_term_size and self.has_short_term():
            self.latents[lt] = torch.cat([self.latents[2:1 + self.long_term_size], self.latents[self.short_term][-1:]])
            self.valid[lt] = torch.cat([self.valid[2:1 + self.long_term_size], torch.ones(1, dtype=torch.bool)])
        self.latents[self.short_term] = chunk
        self.valid[self.short_term] = True

    def without_short_term(self) -> Tensor:
        """Validity with the short-term slot hidden (memory refinement attends to the rest)."""
        valid = self.valid.clone()
        valid[self.short_term] = False
        return valid


class StreamSession:
    """One avatar stream. `start()` once, then `step()` per 0.48 s audio chunk."""

    def __init__(self, preset: Preset, engines: Engines, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, prompt_cache: "PromptCache | None" = None):
        self.preset = preset
        self.engines = engines
        self.device = torch.device(device)
        self.dtype = dtype
        self.prompts = prompt_cache or PromptCache(engines.text_encoder, preset, self.device, dtype)
        self.started = False

    # --- lifecycle --------------------------------------------------------------------------

    def start(self, ref_image: np.ndarray, seed: int = 0, prompt: str = "speaking") -> None:
        p = self.preset
        image = check_image(ref_image, p)
        check_seed(seed)
        self.prompt = check_prompt(prompt, "prompt")
        with torch.inference_mode():
            image_t = torch.from_numpy(np.ascontiguousarray(image))[None].to(self.device)  # (1, H, W, 3)
            reference = self.engines.vae_encoder(image_t)[0].float().cpu()  # (16, h, w)
        self.memory = MemoryBank(reference, p.long_term_size)
        self.decode_context = reference[None]  # (1, 16, h, w): the last latent frame shown so far
        self.audio_window = np.zeros(p.audio_window_samples, dtype=np.float32)  # bounded left context + chunk
        self.generator = torch.Generator().manual_seed(seed)
        self.chunk_index = 0
        self.last_audio_features: Tensor | None = None  # (12, Da) of the short-term chunk, for refinement
        self.last_prompt = self.prompt
        self.started = True

    def step(self, audio_chunk: np.ndarray, prompt: str | None = None, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
        """audio_chunk float32 (7680,) at 16 kHz -> frames uint8 (12, H, W, 3)."""
        if sample_rate != SAMPLE_RATE:
            raise InputError(f"audio: sample rate must be {SAMPLE_RATE} Hz, got {sample_rate} "
                             "(resample first, e.g. flowact.media.resample)")
        return step_batch([self], [audio_chunk], [prompt])[0]

    # --- per-chunk pieces used by step_batch --------------------------------------------------

    def accept_audio(self, audio_chunk: np.ndarray) -> np.ndarray:
        """Append one chunk to the audio context buffer -> the encoder's window (S,)."""
        self.audio_window = np.concatenate([self.audio_window[SAMPLES_PER_CHUNK:], audio_chunk])
        return self.audio_window

    def refinement_due(self) -> bool:
        k = self.preset.refine_every
        return k > 0 and self.chunk_index > 0 and self.chunk_index % k == 0 and self.memory.has_short_term()

    def noise(self, shape: tuple[int, ...]) -> Tensor:
        return torch.randn(shape, generator=self.generator)


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
        frames = sessions[0].engines.vae_decoder(latents).cpu().numpy()  # (B, 12, H, W, 3) uint8
    return list(frames)


def denoise_batch(sessions: Sequence[StreamSession], audio_chunks: Sequence[np.ndarray],
                  prompts: Sequence[str | None]) -> Tensor:
    """The DiT half of a chunk step for many sessions: one batched call per network and NFE.

    Returns the decoder's input, [decode context | new chunk] latents (B, 1+3, 16, h, w); the
    server decodes them in a separate pipeline stage so decoding chunk n overlaps denoising n+1.
    All sessions must share preset and engines; state advances only if every input is valid."""
    first = sessions[0]
    p, eng, dev, dt = first.preset, first.engines, first.device, first.dtype
    for s in sessions:
        if not s.started:
            raise InputError("stream not started: send the reference image with START first")
        if s.engines is not eng or s.preset != p:
            raise ValueError("denoise_batch needs sessions that share one preset and one set of engines")
    chunks = [check_audio_chunk(a) for a in audio_chunks]
    texts = [s.prompt if pr is None else check_prompt(pr) for s, pr in zip(sessions, prompts)]
    b = len(sessions)

    with torch.inference_mode():
        # Step 1: audio features of the new chunk from each stream's bounded audio context.
        windows = torch.from_numpy(np.stack([s.accept_audio(a) for s, a in zip(sessions, chunks)]))  # (B, S)
        audio = eng.audio_encoder(windows.to(dev)).to(dt)  # (B, 12, Da)
        prompt = first.prompts(texts)  # (B, P, Dt)

        # Step 2: memory refinement, every K chunks: re-noise short-term memory to t_r and denoise
        # it again against reference + long-term memory (with the audio and prompt it was made with).
        due = [i for i, s in enumerate(sessions) if s.refinement_due()]
        if due:
            refine([sessions[i] for i in due])

        # Step 3: memory keys/values once per chunk; every NFE reuses them (the fake-causal mask
        # makes this exact).
        memory = torch.stack([s.memory.latents for s in sessions]).to(dev, dt)  # (B, Fm, 16, h, w)
        valid = torch.stack([s.memory.valid for s in sessions]).to(dev)  # (B, Fm)
        kv = eng.denoiser_memory(memory, valid)  # (B, depth, 2, H, Nm, Dh)

        # Step 4: 3-NFE Euler flow matching from per-stream seeded noise.
        shape = (LATENT_FRAMES_PER_CHUNK, LATENT_CHANNELS, p.latent_height, p.latent_width)
        x = torch.stack([s.noise(shape) for s in sessions]).to(dev, dt)  # (B, 3, 16, h, w)
        times = sampling_times(p.nfe, p.timestep_shift)
        for t_now, t_next in zip(times[:-1], times[1:]):
            t = torch.full((b, LATENT_FRAMES_PER_CHUNK), t_now, device=dev, dtype=dt)  # (B, 3)
            x = x + (t_next - t_now) * eng.denoiser(x, t, audio, prompt, kv, valid)  # (B, 3, 16, h, w)

        # Step 5: the decoder sees the last latent frame already shown (continuous seams).
        context = torch.stack([s.decode_context for s in sessions]).to(dev, dt)  # (B, 1, 16, h, w)

        # Step 6: memory update: this chunk becomes short-term memory.
        x_cpu = x.float().cpu()
        for i, s in enumerate(sessions):
            s.memory.push(x_cpu[i])
            s.decode_context = x_cpu[i, -1:]
            s.last_audio_features = audio[i].float().cpu()
            s.last_prompt = texts[i]
            s.chunk_index += 1
    return torch.cat([context, x], dim=1)  # (B, 1+3, 16, h, w)


def refine(group: Sequence[StreamSession]) -> None:
    """Memory refinement of a group of sessions (batched)."""
    first = group[0]
    p, eng, dev, dt = first.preset, first.engines, first.device, first.dtype
    short = torch.stack([s.memory.latents[s.memory.short_term] for s in group]).to(dev, dt)  # (G, 3, 16, h, w)
    valid = torch.stack([s.memory.without_short_term() for s in group]).to(dev)  # (G, Fm)
    kv = eng.denoiser_memory(torch.stack([s.memory.latents for s in group]).to(dev, dt), valid)
    audio = torch.stack([s.last_audio_features for s in group]).to(dev, dt)  # (G, 12, Da)
    prompt = first.prompts([s.last_prompt for s in group])  # (G, P, Dt)
    noise = torch.stack([s.noise(tuple(short.shape[1:])) for s in group]).to(dev, dt)
    times = sampling_times(max(1, math.ceil(p.nfe * p.refine_t)), 1.0, start=p.refine_t)
    x = (1.0 - p.refine_t) * short + p.refine_t * noise  # (G, 3, 16, h, w)
    for t_now, t_next in zip(times[:-1], times[1:]):
        t = torch.full((len(group), LATENT_FRAMES_PER_CHUNK), t_now, device=dev, dtype=dt)
        x = x + (t_next - t_now) * eng.denoiser(x, t, audio, prompt, kv, valid)
    for s, refined in zip(group, x.float().cpu()):
        s.memory.latents[s.memory.short_term] = refined
