"""The denoiser's training set: procedural clips encoded once with the trained VAE, and the
per-sample views the stages need (memory bank, audio window, prompt), built exactly as the stream
engine builds them at inference.

Nothing is trained here. The set is cached in the run directory (latents.pt), keyed by its
configuration and the VAE checkpoint it was encoded with.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from flowact.state import MemoryBank
from flowact.models.text_encoder import tokenize
from flowact.presets import (AUDIO_FEATURES_PER_CHUNK, LATENT_FRAMES_PER_CHUNK, SAMPLES_PER_CHUNK, Preset)
from flowact.train.common import encode_groups
from flowact.train.data import MOUTH_BOX, STATES, make_clips

TRAIN_SEED0 = 1000  # training clips use seeds TRAIN_SEED0 + i; held-out evaluation uses 900000+


@dataclass
class LatentSet:
    latents: torch.Tensor  # (N, chunks*3, 16, h, w) pooled group latents
    refs: torch.Tensor  # (N, 16, h, w) reference image latents
    audio: torch.Tensor  # (N, chunks*7680) float32
    states: torch.Tensor  # (N, chunks) int64 indices into STATES
    mouth: torch.Tensor  # (N, chunks*12) ground-truth mouth opening (the audio envelope)

    @property
    def chunks(self) -> int:
        return self.states.shape[1]

    def chunk(self, i: int, k: int) -> torch.Tensor:
        return self.latents[i, k * LATENT_FRAMES_PER_CHUNK:(k + 1) * LATENT_FRAMES_PER_CHUNK]  # (3, 16, h, w)

    def audio_window(self, i: int, k: int, window: int) -> torch.Tensor:
        """The stream engine's audio window for chunk k: left context (zeros before the start) + chunk."""
        end = (k + 1) * SAMPLES_PER_CHUNK
        start = end - window
        if start >= 0:
            return self.audio[i, start:end]
        return torch.cat([torch.zeros(-start), self.audio[i, :end]])


def _vae_key(vae_checkpoint: Path) -> str:
    h = hashlib.sha256()
    for name in ("vae_encoder.safetensors", "preset.json"):
        h.update((vae_checkpoint / name).read_bytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def build_latent_set(preset: Preset, vae_encoder, vae_checkpoint: Path, cache: Path, clips: int, chunks: int,
                     speech: str = "mixed", workers: int = 1) -> LatentSet:
    """Generate `clips` clips of `chunks` chunks (in `workers` processes) and encode them with
    `vae_encoder` on its device (cached in `cache`)."""
    key = {"preset": preset.name, "clips": clips, "chunks": chunks, "speech": speech, "vae": _vae_key(vae_checkpoint)}
    if cache.is_file():
        saved = torch.load(cache, weights_only=False)
        if saved["key"] == key:
            return saved["set"]
    dev = next(vae_encoder.parameters()).device
    lat, refs, audio, states, mouth = [], [], [], [], []
    rendered = make_clips([TRAIN_SEED0 + i for i in range(clips)], preset.height, chunks, speech, workers)
    for c in tqdm(rendered, desc="encode clips", unit="clip"):
        frames = torch.from_numpy(c.frames).to(dev)  # (T, H, W, 3) uint8
        z = torch.cat([encode_groups(vae_encoder, frames[None, s:s + 96].float()) for s in range(0, len(frames), 96)], 1)
        lat.append(z[0].half().cpu())  # (T/4, 16, h, w)
        refs.append(vae_encoder(torch.from_numpy(c.reference)[None].to(dev).float())[0].cpu())
        audio.append(torch.from_numpy(c.audio))
        states.append(torch.tensor([STATES.index(s) for s in c.states]))
        mouth.append(torch.from_numpy(c.mouth))
    ds = LatentSet(torch.stack(lat), torch.stack(refs), torch.stack(audio), torch.stack(states), torch.stack(mouth))
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"key": key, "set": ds}, cache)
    return ds


def latent_weights(preset: Preset, mouth_weight: float = 3.0) -> torch.Tensor:
    """Loss weights on the latent grid: the mouth box counts `mouth_weight` times. (1, 1, 1, h, w), mean 1."""
    h, w = preset.latent_height, preset.latent_width
    wts = torch.ones(h, w)
    x0, y0, x1, y1 = MOUTH_BOX
    wts[int(y0 * h):int(np.ceil(y1 * h)), int(x0 * w):int(np.ceil(x1 * w))] = mouth_weight
    return (wts / wts.mean())[None, None, None]


@dataclass
class Batch:
    """One training batch of chunk positions, with ground-truth memory."""

    clip: list[int]
    chunk: list[int]
    refine: list[bool]  # memory-refinement samples: short-term memory hidden, target = the hidden chunk
    long_term: int  # long-term memory size of this batch (the memory shape is per batch)
    x0: torch.Tensor  # (B, 3, 16, h, w) target chunk latents
    memory: torch.Tensor  # (B, Fm, 16, h, w)
    valid: torch.Tensor  # (B, Fm) bool
    audio: torch.Tensor  # (B, S) audio windows
    prompt_ids: torch.Tensor  # (B, P) behaviour prompt bytes
    mouth: torch.Tensor  # (B, 12) ground-truth mouth opening of the target chunk

    def to(self, device) -> "Batch":
        for name in ("x0", "memory", "valid", "audio", "prompt_ids", "mouth"):
            setattr(self, name, getattr(self, name).to(device))
        return self


def memory_chunks(k: int, long_term: int, refine: bool) -> list[int]:
    """The chunks pushed into a fresh memory bank to reach its state when chunk k is generated
    (or, for refinement, when chunk k is refined: the bank after chunk k itself was pushed).
    Only the last long_term + 1 pushes matter."""
    last = k + 1 if refine else k
    return list(range(max(0, last - long_term - 1), last))


def make_bank(ref: torch.Tensor, chunks: list[torch.Tensor], long_term: int, refine: bool) -> tuple[torch.Tensor, torch.Tensor]:
    bank = MemoryBank(ref.float(), long_term)
    for c in chunks:
        bank.push(c.float())
    return bank.latents, (bank.without_short_term() if refine else bank.valid.clone())


def sample_batch(ds: LatentSet, preset: Preset, batch: int, g: torch.Generator, long_term: int,
                 p_first: float = 0.1, p_refine: float = 0.15) -> Batch:
    clips = torch.randint(len(ds.latents), (batch,), generator=g).tolist()
    ks = torch.randint(ds.chunks, (batch,), generator=g)
    ks = torch.where(torch.rand(batch, generator=g) < p_first, torch.zeros_like(ks), ks).tolist()
    refine = [(k > 0 and r) for k, r in zip(ks, (torch.rand(batch, generator=g) < p_refine).tolist())]
    mem, val, x0, aud, ids, mouth = [], [], [], [], [], []
    for i, k, r in zip(clips, ks, refine):
        target = k
        m, v = make_bank(ds.refs[i], [ds.chunk(i, c) for c in memory_chunks(k, long_term, r)], long_term, r)
        mem.append(m)
        val.append(v)
        x0.append(ds.chunk(i, target).float())
        aud.append(ds.audio_window(i, target, preset.audio_window_samples))
        ids.append(STATES[int(ds.states[i, target])])
        mouth.append(ds.mouth[i, target * AUDIO_FEATURES_PER_CHUNK:(target + 1) * AUDIO_FEATURES_PER_CHUNK])
    return Batch(clips, ks, refine, long_term, torch.stack(x0), torch.stack(mem), torch.stack(val), torch.stack(aud),
                 tokenize(ids, preset.prompt_tokens), torch.stack(mouth))


def sample_long_term(g: torch.Generator, preset: Preset) -> int:
    """Long-term memory size of a batch: the preset's (60%), or 1 or 0 (20% each), so the
    ablations over long_term_size stay in distribution."""
    u = float(torch.rand(1, generator=g))
    full = preset.long_term_size
    return full if u < 0.6 else min(1, full) if u < 0.8 else 0
