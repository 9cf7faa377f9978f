"""Video VAE with the Wan2.1 latent geometry: 8x8 spatial, 4x temporal stride, 16 channels.

- `VAEEncoder`: reference image -> one latent frame (the memory bank's reference entry).
- `VAEDecoder`: CONTEXT latent frame(s) + one chunk of 3 latent frames -> 12 uint8 RGB frames.
  Temporal layers are causal convolutions at latent resolution, so a chunk's frames depend on the
  chunk and its context only: decoding is stateless per request, and seams are continuous because
  the previous chunk's last latent frame is the context (the reference latent for the first chunk).
  Spatial upsampling then runs per frame in 2D, where most of the pixels are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flowact.presets import LATENT_CHANNELS, LATENT_FRAMES_PER_CHUNK, VAE_TEMPORAL_STRIDE, Preset

CONTEXT_FRAMES = 1  # latent frames of the previous chunk the decoder sees


def norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels, eps=1e-6)


class ResBlock2d(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(norm(channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
                                  norm(channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W)
        return x + self.body(x)


class CausalConv3d(nn.Conv3d):
    """3x3x3 convolution that only looks at the current and earlier frames."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__(c_in, c_out, kernel_size=3, padding=(0, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T, h, w) -> (B, C', T, h, w)
        return super().forward(F.pad(x, (0, 0, 0, 0, 2, 0), mode="replicate"))


class FrameNorm(nn.Module):
    """GroupNorm per frame (statistics never mix frames, which keeps the decoder causal)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = norm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T, h, w)
        b, c, t, h, w = x.shape
        y = self.norm(x.transpose(1, 2).reshape(b * t, c, h, w))  # (B*T, C, h, w)
        return y.reshape(b, t, c, h, w).transpose(1, 2)


class CausalResBlock3d(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(FrameNorm(channels), nn.SiLU(), CausalConv3d(channels, channels),
                                  FrameNorm(channels), nn.SiLU(), CausalConv3d(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T, h, w)
        return x + self.body(x)


class VAEEncoder(nn.Module):
    """uint8 image (B, H, W, 3) -> latent frame (B, 16, H/8, W/8)."""

    def __init__(self, preset: Preset):
        super().__init__()
        chans = preset.vae_channels[::-1]  # pixels -> latent resolution
        layers: list[nn.Module] = [nn.Conv2d(3, chans[0], 3, padding=1)]
        for c_in, c_out in zip(chans[:-1], chans[1:]):
            layers += [ResBlock2d(c_in), nn.Conv2d(c_in, c_out, 3, stride=2, padding=1)]
        layers += [ResBlock2d(chans[-1]), norm(chans[-1]), nn.SiLU(), nn.Conv2d(chans[-1], LATENT_CHANNELS, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image.permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (B, 3, H, W) in [-1, 1]
        return self.net(x)  # (B, 16, h, w)


class VAEDecoder(nn.Module):
    """Latents (B, 1+3, 16, h, w) = [context | chunk] -> uint8 frames (B, 12, H, W, 3)."""

    def __init__(self, preset: Preset):
        super().__init__()
        c0 = preset.vae_channels[0]
        self.temporal = nn.Sequential(CausalConv3d(LATENT_CHANNELS, c0), CausalResBlock3d(c0), CausalResBlock3d(c0),
                                      FrameNorm(c0), nn.SiLU(), CausalConv3d(c0, c0 * VAE_TEMPORAL_STRIDE))
        layers: list[nn.Module] = []
        for c_in, c_out in zip(preset.vae_channels[:-1], preset.vae_channels[1:]):
            layers += [ResBlock2d(c_in), nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(c_in, c_out, 3, padding=1)]
        c_last = preset.vae_channels[-1]
        layers += [ResBlock2d(c_last), norm(c_last), nn.SiLU(), nn.Conv2d(c_last, 3, 3, padding=1)]
        self.spatial = nn.Sequential(*layers)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        b, _, _, h, w = latents.shape
        x = self.temporal(latents.transpose(1, 2))  # (B, 4*c0, T, h, w)
        # depth-to-time: every latent frame becomes VAE_TEMPORAL_STRIDE video frames
        x = x.unflatten(1, (VAE_TEMPORAL_STRIDE, -1)).permute(0, 3, 1, 2, 4, 5)  # (B, T, 4, c0, h, w)
        x = x[:, CONTEXT_FRAMES:].reshape(b * LATENT_FRAMES_PER_CHUNK * VAE_TEMPORAL_STRIDE, -1, h, w)  # (B*12, c0, h, w)
        rgb = self.spatial(x)  # (B*12, 3, H, W) in about [-1, 1]
        frames = ((rgb.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)  # (B*12, 3, H, W)
        return frames.reshape(b, -1, 3, rgb.shape[-2], rgb.shape[-1]).permute(0, 1, 3, 4, 2)  # (B, 12, H, W, 3)
