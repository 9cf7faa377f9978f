"""Stage 1: the VAE (encoder + decoder) on procedural talking-head clips.

    python -m flowact.train.vae --preset tiny [--steps 1500] [--device cpu] [--resume] [--out runs/tiny]

Training sample: 16 consecutive frames (4 latent groups) of a clip. Each group of 4 frames is
encoded with the single-image encoder and pooled (`common.encode_groups`); the decoder gets
[group 0 | groups 1-3] and must reproduce the 12 frames of groups 1-3, exactly the decoder's
streaming contract. In 20% of samples the context is the clip's reference image latent instead,
as for a stream's first chunk. Latents get Gaussian noise (sigma 0.1) so the decoder tolerates the
denoiser's errors, and a small L2 penalty keeps them bounded.

To fit a shared 2-core CPU, only 3 random frames of the 12 per sample go through the (per-frame)
spatial decoder and the loss (same maths, a quarter of the decoder's cost), and only one frame
per 4-frame group is encoded with gradients (the other three without). Loss: L1 + MSE on pixels in [-1, 1], weighted x6 in the mouth box and x2 in the eye box (lip
sync lives in a few pixels). At the end every latent channel is rescaled to unit RMS over the
training clips by folding the scale into the encoder's last and the decoder's first convolution
(exact), because the denoiser's flow matching assumes unit-scale latents.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from flowact.networks import build_networks
from flowact.presets import FRAMES_PER_CHUNK, VAE_TEMPORAL_STRIDE, Preset
from flowact.stats import psnr_db
from flowact.train.common import (EMA, Stage, decode_float, encode_groups, lr_at, setup, stage_parser,
                                  step_generator)
from flowact.train.data import EYE_BOX, MOUTH_BOX, make_clip, make_clips

NAME = "vae"
CLIP_CHUNKS = 2  # 24 frames per pool clip
WINDOW = 4 * VAE_TEMPORAL_STRIDE  # 16 frames: context group + 3 groups
LATENT_NOISE = 0.1
LATENT_PENALTY = 1e-3
REFERENCE_CONTEXT = 0.2
DECODED_FRAMES = 3  # of the 12 output frames, scored per sample (the spatial decoder is the cost)


def clip_pool(preset: Preset, n: int, seed0: int = 1000, workers: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """n short clips: frames (n, 24, H, W, 3) uint8 and references (n, H, W, 3) uint8."""
    clips = make_clips([seed0 + i for i in range(n)], preset.height, CLIP_CHUNKS, workers=workers)
    return torch.from_numpy(np.stack([c.frames for c in clips])), torch.from_numpy(np.stack([c.reference for c in clips]))


def pixel_weights(preset: Preset) -> torch.Tensor:
    w = torch.ones(preset.height, preset.width)
    for box, weight in ((MOUTH_BOX, 6.0), (EYE_BOX, 2.0)):
        x0, y0, x1, y1 = box
        w[int(y0 * preset.height):int(np.ceil(y1 * preset.height)), int(x0 * preset.width):int(np.ceil(x1 * preset.width))] = weight
    return (w / w.mean())[None, None, :, :, None]  # (1, 1, H, W, 1)


def vae_batch(frames: torch.Tensor, refs: torch.Tensor, batch: int, g: torch.Generator):
    """Random 16-frame windows (group aligned): -> (B, 16, H, W, 3) uint8, refs (B, H, W, 3), use_ref (B,)."""
    idx = torch.randint(len(frames), (batch,), generator=g)
    starts = torch.randint((frames.shape[1] - WINDOW) // VAE_TEMPORAL_STRIDE + 1, (batch,), generator=g) * VAE_TEMPORAL_STRIDE
    win = torch.stack([frames[i, s:s + WINDOW] for i, s in zip(idx.tolist(), starts.tolist())])
    return win, refs[idx], torch.rand(batch, generator=g) < REFERENCE_CONTEXT


def vae_loss(encoder, decoder, win, refs, use_ref, weights, g: torch.Generator | None = None):
    """Reconstruction loss of one batch -> (loss, parts dict)."""
    z = encode_groups(encoder, win.float(), grad_frames=1)  # (B, 4, 16, h, w)
    z_ref = encoder(refs.float())  # (B, 16, h, w)
    context = torch.where(use_ref[:, None, None, None], z_ref, z[:, 0])
    latents = torch.cat([context[:, None], z[:, 1:]], dim=1)  # (B, 1+3, 16, h, w)
    noise = torch.randn(latents.shape, generator=g).to(latents.device) if g is not None else torch.randn_like(latents)
    select = torch.stack([torch.randperm(FRAMES_PER_CHUNK, generator=g)[:DECODED_FRAMES] for _ in range(len(win))])
    select = select.to(latents.device)  # (B, k): the frames decoded and scored this step
    rgb = decode_float(decoder, latents + LATENT_NOISE * noise, select)  # (B, k, H, W, 3)
    target = win[:, VAE_TEMPORAL_STRIDE:].float() / 127.5 - 1.0  # (B, 12, H, W, 3)
    target = torch.gather(target, 1, select[:, :, None, None, None].expand(-1, -1, *target.shape[2:]))
    err = rgb - target
    l1 = (err.abs() * weights).mean()
    l2 = (err.pow(2) * weights).mean()
    penalty = z.pow(2).mean()
    return l1 + l2 + LATENT_PENALTY * penalty, {"l1": l1.item(), "mse": l2.item(), "latent_ms": penalty.item()}


@torch.no_grad()
def normalise_latents(nets, frames: torch.Tensor, refs: torch.Tensor, device) -> torch.Tensor:
    """Rescale each latent channel to unit RMS over the pool, folded into the weights. Returns the scales."""
    zs = []
    for i in range(0, len(frames), 8):
        zs.append(encode_groups(nets.vae_encoder, frames[i:i + 8].to(device).float()).flatten(0, 1))
        zs.append(nets.vae_encoder(refs[i:i + 8].to(device).float()))
    z = torch.cat(zs)  # (N, 16, h, w)
    scale = z.pow(2).mean(dim=(0, 2, 3)).sqrt().clamp_min(1e-4)  # (16,)
    last = nets.vae_encoder.net[-1]  # Conv2d(c, 16)
    last.weight.div_(scale[:, None, None, None])
    last.bias.div_(scale)
    first = nets.vae_decoder.temporal[0]  # CausalConv3d(16, c0)
    first.weight.mul_(scale[None, :, None, None, None])
    return scale


def main(argv=None) -> None:
    p = stage_parser(__doc__.splitlines()[0], steps=800, batch=6, lr=2e-3)
    p.add_argument("--clips", type=int, default=None, help="clips in the training pool (default by preset)")
    args = p.parse_args(argv)
    preset, out, device = setup(args)
    stage = Stage(out, NAME)
    n_clips = args.clips or (384 if preset.height <= 64 else 256)
    frames, refs = clip_pool(preset, n_clips, workers=args.workers)

    nets = build_networks(preset, seed=args.seed)
    enc, dec = nets.vae_encoder.to(device).train().requires_grad_(True), nets.vae_decoder.to(device).train().requires_grad_(True)
    params = list(enc.parameters()) + list(dec.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99))
    ema_enc, ema_dec = EMA(enc, 0.995), EMA(dec, 0.995)
    modules = {"encoder": enc, "decoder": dec, "opt": opt, "ema_encoder": ema_enc, "ema_decoder": ema_dec}
    if args.resume and stage.resume(modules):
        print(f"resumed {stage.state_path} at step {stage.step}")
    weights = pixel_weights(preset).to(device)

    bar = tqdm(total=args.steps, initial=stage.step, desc=f"vae {preset.name}", unit="step")
    while stage.step < args.steps:
        g = step_generator(args.seed, stage.step)
        win, r, use_ref = vae_batch(frames, refs, args.batch, g)
        for group in opt.param_groups:
            group["lr"] = lr_at(stage.schedule_step(args), args.steps, args.lr)
        loss, parts = vae_loss(enc, dec, win.to(device), r.to(device), use_ref.to(device), weights, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_enc.update(enc)
        ema_dec.update(dec)
        if stage.end_of_step(modules, args, bar, ("loss", "mse"), loss=loss.item(), **parts):
            break
    bar.close()

    nets.vae_encoder.load_state_dict(ema_enc.module.state_dict())
    nets.vae_decoder.load_state_dict(ema_dec.module.state_dict())
    for m in nets.modules().values():
        m.eval().requires_grad_(False)
    scale = normalise_latents(nets, frames, refs, device)
    nets.to("cpu")
    psnr = evaluate(nets, preset)
    stage.done(nets, {"latent_scale": scale.tolist(), "heldout_psnr_db": psnr})
    print(f"vae: {stage.step} steps in {stage.elapsed() / 60:.1f} min, held-out PSNR {psnr:.2f} dB -> {stage.checkpoint}")


@torch.no_grad()
def evaluate(nets, preset: Preset, clips: int = 4) -> float:
    """PSNR of uint8 reconstructions (the inference modules) on held-out clips."""
    errs = []
    for i in range(clips):
        c = make_clip(900_000 + i, preset.height, 1)
        frames = torch.from_numpy(c.frames)  # (12, H, W, 3)
        z = encode_groups(nets.vae_encoder, frames[None])  # (1, 3, 16, h, w)
        ref = nets.vae_encoder(torch.from_numpy(c.reference)[None])[:, None]
        rec = nets.vae_decoder(torch.cat([ref, z], dim=1))[0]
        errs.append(F.mse_loss(rec.float(), frames.float()).item())
    return psnr_db(float(np.mean(errs)))


if __name__ == "__main__":
    main()
