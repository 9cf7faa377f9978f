"""Calibration and evaluation data that look like real streams.

`record_streams` runs real streams of a `StreamEngine` (the shipped reference image and speech,
varied by stream: crops, flips, gains, offsets, behaviour prompts) through the PyTorch networks,
exactly as the engine calls them: memory banks that fill up over the chunks, the NFE timesteps of the
schedule, refinement passes, batched streams. While it runs it records
- `amax[network][module path]`: max |input| of every nn.Linear, per network (the denoiser's weights
  serve both `denoiser_memory` and `denoiser`, which see different activations); the FP8 inserter
  takes its activation scales from here, so calibration runs wherever torch runs (a GPU for r1-480p);
- `calls[network]`: the inputs of the first `keep` calls per network, for measuring errors
  (a r1-480p denoiser call carries gigabytes of memory keys/values, so keep few there).
FP8 scales are calibrated on one seed's recording and errors are measured on another's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from flowact.contract import BEHAVIOURS
from flowact.engine import StreamEngine
from flowact.media import REFERENCE_IMAGE, SPEECH_WAV, load_audio, load_image, split_chunks
from flowact.networks import Networks
from flowact.presets import SAMPLES_PER_CHUNK, Preset
from flowact.runtime import Runners, full_valid
from flowact.specs import NETWORK_NAMES, network_specs

PROMPTS = (*BEHAVIOURS, "nod and smile", "raise the left hand")


@dataclass
class Recording:
    """What the networks saw: linear-input amax per network and module path, and sample calls."""

    calls: dict[str, list[tuple[np.ndarray, ...]]] = field(default_factory=lambda: {n: [] for n in NETWORK_NAMES})
    amax: dict[str, dict[str, float]] = field(default_factory=lambda: {n: {} for n in NETWORK_NAMES})
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(NETWORK_NAMES, 0))


class _Recorder:
    """Wraps one network callable: marks it current (for the amax hooks) and keeps its first calls."""

    def __init__(self, name: str, fn, rec: Recording, state: dict, keep: int | None, spec):
        self.name, self.fn, self.rec, self.state, self.keep, self.spec = name, fn, rec, state, keep, spec

    def __call__(self, *inputs: torch.Tensor | None) -> torch.Tensor:
        self.rec.counts[self.name] += 1
        if self.keep is None or len(self.rec.calls[self.name]) < self.keep:  # as the ONNX graph takes them
            graph_inputs = full_valid(self.spec, inputs, inputs[0].shape[0])
            self.rec.calls[self.name].append(tuple(x.detach().cpu().numpy().copy() for x in graph_inputs))
        self.state["network"] = self.name
        try:
            return self.fn(*inputs)
        finally:
            self.state["network"] = None


def _amax_hooks(nets: Networks, rec: Recording, state: dict) -> list:
    """forward pre-hooks on every nn.Linear of the networks: amax of its input, per current network."""
    handles = []
    for owner in {spec.owner for spec in network_specs(nets.preset).values()}:
        for path, module in getattr(nets, owner).named_modules():
            if not isinstance(module, nn.Linear):
                continue

            def hook(mod, inputs, path=path):
                net = state["network"]
                if net is not None:
                    value = float(inputs[0].detach().abs().max())
                    rec.amax[net][path] = max(rec.amax[net].get(path, 0.0), value)

            handles.append(module.register_forward_pre_hook(hook))
    return handles


def stream_media(preset: Preset, streams: int, chunks: int, seed: int) -> tuple[list, list, list]:
    """Per stream: a varied reference image, `chunks` audio chunks and a prompt."""
    rng = np.random.default_rng(seed)
    image = load_image(REFERENCE_IMAGE, preset.height, preset.width)  # (H, W, 3) uint8, the shipped reference
    speech = load_audio(SPEECH_WAV)  # (S,) float32 16 kHz, the shipped speech
    images, audios, prompts = [], [], []
    for s in range(streams):
        img = image.astype(np.float32)
        if rng.random() < 0.5:
            img = img[:, ::-1]
        shift = rng.integers(-preset.width // 8, preset.width // 8 + 1)
        img = np.roll(img, shift, axis=1) * rng.uniform(0.7, 1.2) + rng.uniform(-20, 20)
        images.append(np.clip(img, 0, 255).astype(np.uint8))
        offset = int(rng.integers(0, len(speech)))
        total = chunks * SAMPLES_PER_CHUNK
        audio = np.resize(np.roll(speech, -offset), total) * rng.uniform(0.3, 1.5)
        if s % 4 == 3:  # a listening stream: mostly silence with low noise
            audio = audio * 0.02 + 0.002 * rng.standard_normal(total)
        audios.append(split_chunks(audio.astype(np.float32))[0])
        prompts.append(PROMPTS[int(rng.integers(0, len(PROMPTS)))])
    return images, audios, prompts


def record_streams(preset: Preset, nets: Networks, streams: int = 4, chunks: int = 6, seed: int = 0,
                   keep: int | None = None, device: str | torch.device = "cpu") -> Recording:
    """Run `streams` batched streams for `chunks` chunks on the PyTorch networks (on `device`),
    recording linear-input amax per network and the first `keep` calls of each network (all if None)."""
    rec = Recording()
    state: dict = {"network": None}
    device = torch.device(device)
    if device.type != "cpu":
        nets.to(device)
    base = Runners.from_networks(nets)
    specs = network_specs(preset)
    runners = Runners(**{n: _Recorder(n, getattr(base, n), rec, state, keep, specs[n]) for n in NETWORK_NAMES},
                      kv_dtype=base.kv_dtype)
    handles = _amax_hooks(nets, rec, state)
    try:
        images, audios, prompts = stream_media(preset, streams, chunks, seed)
        engine = StreamEngine(preset, runners, device, torch.float32, capacity=streams)  # the networks' dtype
        states = [engine.start(images[i], seed=seed * 1000 + i, prompt=prompts[i]) for i in range(streams)]
        for k in range(chunks):
            # every few chunks one stream switches behaviour (prompt tokens vary within a stream)
            step_prompts = [PROMPTS[(k + i) % len(PROMPTS)] if k % 3 == 2 and i == 0 else None
                            for i in range(streams)]
            engine.step(states, [a[k] for a in audios], step_prompts)
    finally:
        for h in handles:
            h.remove()
        if device.type != "cpu":
            nets.to("cpu")
    return rec


def feeds(spec, call: tuple[np.ndarray, ...]) -> dict[str, np.ndarray]:
    """One recorded call as an ONNX Runtime feed dict (spec dtypes)."""
    return {t.name: np.ascontiguousarray(x.astype(t.dtype, copy=False)) for t, x in zip(spec.inputs, call)}
