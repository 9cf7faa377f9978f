"""What every training stage shares: arguments, resumable state, EMA, loss curves, checkpoints,
and the two training-time views of the VAE that the inference modules do not expose.

A run directory (`--out`, default runs/<preset>) holds one folder per stage:
    runs/tiny/vae/       state.pt (resume), checkpoint/ (a flowact checkpoint, fp32), loss.png, log.jsonl
    runs/tiny/forcing/   ... reads runs/tiny/vae/checkpoint
    runs/tiny/self_forcing/  reads runs/tiny/forcing/checkpoint
    runs/tiny/distill/   reads runs/tiny/self_forcing/checkpoint (the teacher)
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from flowact.networks import Networks
from flowact.presets import LATENT_FRAMES_PER_CHUNK, VAE_TEMPORAL_STRIDE, Preset, get_preset
from flowact.models.vae import CONTEXT_FRAMES

SHARD_BYTES = 16 * 1024 * 1024  # tracked files stay well under 20 MB: larger networks are split


# ------------------------------------------------------------------------------------------------
# Arguments


def stage_parser(description: str, steps: int, batch: int, lr: float) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--preset", default="tiny", help="model preset (tiny, cpu, ...)")
    p.add_argument("--out", default=None, help="run directory (default runs/<preset>); each stage writes OUT/<stage>/")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1 ...")
    p.add_argument("--steps", type=int, default=steps, help="total optimiser steps (a resumed run continues to this)")
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--resume", action="store_true", help="continue from OUT/<stage>/state.pt")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a shared 2-core machine)")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="processes rendering the training clips")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=200, help="steps between resumable saves")
    p.add_argument("--minutes", type=float, default=None, help="stop (and save) after this much wall time")
    return p


def setup(args) -> tuple[Preset, Path, torch.device]:
    torch.set_num_threads(args.threads)
    preset = get_preset(args.preset)
    out = Path(args.out or f"runs/{preset.name}")
    device = torch.device(args.device)
    if device.type == "cuda":  # TF32 matmuls and convolutions: fp32 training at tensor-core speed
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return preset, out, device


# ------------------------------------------------------------------------------------------------
# Checkpoints (flowact checkpoint directories; shards for networks above SHARD_BYTES)


def save_networks(nets: Networks, directory: str | Path, dtype: torch.dtype = torch.float32) -> dict[str, int]:
    """Write a checkpoint directory that flowact.networks reads; returns bytes per file.

    A network whose weights exceed SHARD_BYTES in `dtype` is written as NAME-0000k-of-0000n.safetensors
    shards instead (flowact.networks.load_weights merges them)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.safetensors"):
        stale.unlink()
    nets.save(directory)  # preset.json and fp32 weights
    sizes = {}
    for name, module in nets.modules().items():
        state = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
                 for k, v in module.state_dict().items()}
        total = sum(v.numel() * v.element_size() for v in state.values())
        (directory / f"{name}.safetensors").unlink()
        if total <= SHARD_BYTES:
            shards = [state]
        else:
            shards, current, used = [], {}, 0
            for k, v in state.items():
                nbytes = v.numel() * v.element_size()
                if current and used + nbytes > SHARD_BYTES:
                    shards.append(current)
                    current, used = {}, 0
                current[k] = v
                used += nbytes
            shards.append(current)
        for i, shard in enumerate(shards):
            fname = f"{name}.safetensors" if len(shards) == 1 else f"{name}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(directory / fname))
            sizes[fname] = (directory / fname).stat().st_size
    return sizes


# ------------------------------------------------------------------------------------------------
# Training-time VAE views


def decode_float(decoder: nn.Module, latents: torch.Tensor, select: torch.Tensor | None = None) -> torch.Tensor:
    """VAEDecoder.forward without the uint8 rounding, for gradients: (B, 1+3, 16, h, w) -> (B, 12, H, W, 3) in [-1, 1].

    `select` (B, k) int64 picks k of the 12 output frames per item to run through the (per-frame,
    expensive) spatial upsampler -> (B, k, H, W, 3): the same maths for those frames, a third of
    the cost for k = 4. Mirrors flowact.models.vae.VAEDecoder.forward step for step
    (tests/test_train.py checks that rounding this gives the module's output)."""
    b, _, _, h, w = latents.shape
    x = decoder.temporal(latents.transpose(1, 2))  # (B, 4*c0, T, h, w)
    x = x.unflatten(1, (VAE_TEMPORAL_STRIDE, -1)).permute(0, 3, 1, 2, 4, 5)  # (B, T, 4, c0, h, w)
    x = x[:, CONTEXT_FRAMES:].reshape(b, LATENT_FRAMES_PER_CHUNK * VAE_TEMPORAL_STRIDE, -1, h, w)  # (B, 12, c0, h, w)
    if select is not None:
        x = torch.gather(x, 1, select[:, :, None, None, None].expand(-1, -1, *x.shape[2:]))  # (B, k, c0, h, w)
    rgb = decoder.spatial(x.flatten(0, 1))  # (B*k, 3, H, W)
    return rgb.reshape(b, -1, 3, rgb.shape[-2], rgb.shape[-1]).permute(0, 1, 3, 4, 2)  # (B, k, H, W, 3)


def encode_groups(encoder: nn.Module, frames: torch.Tensor, grad_frames: int | None = None) -> torch.Tensor:
    """Video -> latent frames: every group of 4 consecutive frames is encoded frame by frame with the
    single-image encoder and the 4 latents are averaged (temporal average pooling; a still image,
    e.g. the reference, encodes to the same latent as a group of 4 copies of it).

    frames (B, 4k, H, W, 3) uint8 or float 0..255 -> (B, k, 16, h, w).
    grad_frames (training): only that many frames of each group (the first ones) carry gradients,
    the others are encoded without; same values, a cheaper (partial) gradient."""
    b, t = frames.shape[:2]
    k = t // VAE_TEMPORAL_STRIDE
    groups = frames.reshape(b, k, VAE_TEMPORAL_STRIDE, *frames.shape[2:])
    if grad_frames is None or grad_frames >= VAE_TEMPORAL_STRIDE:
        z = encoder(groups.flatten(0, 2))  # (B*4k, 16, h, w)
        return z.reshape(b, k, VAE_TEMPORAL_STRIDE, *z.shape[1:]).mean(dim=2)
    z_grad = encoder(groups[:, :, :grad_frames].flatten(0, 2))
    with torch.no_grad():
        z_rest = encoder(groups[:, :, grad_frames:].flatten(0, 2))
    z = torch.cat([z_grad.reshape(b, k, grad_frames, *z_grad.shape[1:]),
                   z_rest.reshape(b, k, VAE_TEMPORAL_STRIDE - grad_frames, *z_rest.shape[1:])], dim=2)
    return z.mean(dim=2)


# ------------------------------------------------------------------------------------------------
# EMA, schedules, resumable state, curves


class EMA:
    """Exponential moving average of a module's weights, with the usual warm-up of the decay."""

    def __init__(self, module: nn.Module, decay: float = 0.999):
        self.decay = decay
        self.module = copy.deepcopy(module).eval().requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for e, p in zip(self.module.state_dict().values(), module.state_dict().values()):
            if e.is_floating_point():
                e.mul_(d).add_(p.detach(), alpha=1 - d)
            else:
                e.copy_(p)


def lr_at(step: int, total: int, base: float, warmup: int = 100) -> float:
    """Linear warm-up then cosine decay to 10% of `base`."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass
class History:
    """Loss values per step (and wall time), saved in the state and plotted."""

    values: dict[str, list[float]] = field(default_factory=dict)
    steps: list[int] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, step: int, **losses: float) -> None:
        self.steps.append(step)
        for k, v in losses.items():
            self.values.setdefault(k, []).append(float(v))

    def recent(self, key: str, n: int = 50) -> float:
        vals = self.values.get(key, [])[-n:]
        return float(np.mean(vals)) if vals else float("nan")

    def plot(self, path: Path, title: str) -> None:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        keys = list(self.values)
        fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.2), squeeze=False)
        for ax, k in zip(axes[0], keys):
            v = np.asarray(self.values[k])
            ax.plot(self.steps, v, alpha=0.3, lw=0.8)
            if len(v) >= 20:
                w = max(5, len(v) // 50)
                smooth = np.convolve(v, np.ones(w) / w, mode="valid")
                ax.plot(self.steps[w - 1:], smooth, lw=1.5)
            ax.set_title(k)
            ax.set_xlabel("step")
            if (v > 0).all():
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
        fig.suptitle(f"{title} ({self.seconds / 60:.1f} min)")
        fig.tight_layout()
        fig.savefig(path, dpi=90)
        plt.close(fig)


class Stage:
    """One training stage's folder: resumable state, log, curve and checkpoint."""

    def __init__(self, out: Path, name: str):
        self.name = name
        self.dir = out / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.state_path = self.dir / "state.pt"
        self.checkpoint = self.dir / "checkpoint"
        self.history = History()
        self.step = 0
        self.t_start = time.perf_counter()
        self.seconds_before = 0.0

    def resume(self, modules: dict[str, object]) -> bool:
        """Load state.pt into `modules` (name -> module / optimiser / EMA). False when there is none."""
        if not self.state_path.is_file():
            return False
        state = torch.load(self.state_path, map_location="cpu", weights_only=False)
        for name, obj in modules.items():
            if isinstance(obj, EMA):
                obj.module.load_state_dict(state[name]["module"])
                obj.updates = state[name]["updates"]
            else:
                obj.load_state_dict(state[name])
        self.step = state["step"]
        self.history = state["history"]
        self.seconds_before = self.history.seconds
        torch.set_rng_state(state["torch_rng"])
        return True

    def elapsed(self) -> float:
        return self.seconds_before + time.perf_counter() - self.t_start

    def schedule_step(self, args) -> int:
        """The step the learning-rate schedule is at: the step count, or further along when the
        --minutes budget will run out first (so a time-bounded run still decays its rate)."""
        if not args.minutes:
            return self.step
        return max(self.step, int(args.steps * self.elapsed() / (60 * args.minutes)))

    def save(self, modules: dict[str, object]) -> None:
        self.history.seconds = self.elapsed()
        state = {"step": self.step, "history": self.history, "torch_rng": torch.get_rng_state()}
        for name, obj in modules.items():
            state[name] = {"module": obj.module.state_dict(), "updates": obj.updates} if isinstance(obj, EMA) \
                else obj.state_dict()
        tmp = self.state_path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.state_path)
        self.history.plot(self.dir / "loss.png", f"{self.name}")
        with open(self.dir / "log.jsonl", "a") as f:
            f.write(json.dumps({"step": self.step, "seconds": round(self.history.seconds, 1),
                                **{k: self.history.recent(k) for k in self.history.values}}) + "\n")

    def end_of_step(self, modules: dict[str, object], args, bar, shown: tuple[str, ...], **losses: float) -> bool:
        """Count the step, log its losses, show the recent mean of `shown` on the progress bar; save
        every --save-every steps and at the last; True when --minutes is spent (save, then stop)."""
        self.step += 1
        self.history.add(self.step, **losses)
        bar.update(1)
        bar.set_postfix({k: f"{self.history.recent(k):.4f}" for k in shown})
        if self.step % args.save_every == 0 or self.step == args.steps:
            self.save(modules)
        if args.minutes and self.elapsed() > 60 * args.minutes:
            self.save(modules)
            print(f"stopping at step {self.step}: --minutes {args.minutes} reached")
            return True
        return False

    def done(self, nets: Networks, extra: dict | None = None) -> None:
        """Put the networks on the CPU in eval mode; write the stage's checkpoint (fp32) and a summary."""
        for m in nets.to("cpu").modules().values():
            m.eval().requires_grad_(False)
        save_networks(nets, self.checkpoint)
        summary = {"stage": self.name, "steps": self.step, "wall_seconds": round(self.elapsed(), 1),
                   "final": {k: self.history.recent(k) for k in self.history.values}, **(extra or {})}
        (self.dir / "summary.json").write_text(json.dumps(summary, indent=2))


def step_generator(seed: int, step: int) -> torch.Generator:
    """A generator for one step's randomness: batches do not depend on where a run was resumed."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)
