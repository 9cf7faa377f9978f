"""Stages 2 and 3: the MMDiT with chunkwise diffusion forcing, then its self-forcing variant.

    python -m flowact.train.forcing --preset tiny                  # stage 2 -> OUT/forcing/
    python -m flowact.train.forcing --preset tiny --self-forcing   # stage 3 -> OUT/self_forcing/

Stage 2 (diffusion forcing, ground-truth memory). A sample is one chunk k of a training clip.
Its memory bank is built with the engine's own MemoryBank from the ground-truth latents of the
chunks before k (reference image latent, long-term queue, short-term chunk), so slots, validity
and RoPE positions are exactly those of inference. The chunk's 3 latent frames are noised with
per-frame noise levels (diffusion forcing: 30% draw one level per frame, 70% one per chunk as at inference; levels follow the
sampler's shifted schedule) and the denoiser, trained through
`forward_joint` (the fake-causal reference path), predicts the flow-matching velocity eps - x0.
10% of samples are a stream's first chunk (reference only); 15% are memory-refinement samples
(the chunk is the short-term memory itself, hidden, as `engine.refine` sees it). Each batch uses
long-term size 3, 1 or 0 so the memory ablations stay in distribution. The audio and text
encoders train jointly; an auxiliary linear head on the audio features regresses the mouth
opening (weight 0.1; the head is not shipped), and the mouth region of the latent grid counts 3x.
Half the samples get Gaussian noise (sigma up to 0.25) on their memory (not on the reference), the
usual diffusion-forcing guard against imperfect context.

Stage 3 (self-forcing variant, FlowAct-R1 sec. 3.2): fine-tunes stage 2. For half the samples the
memory chunks are replaced by "generated-ground-truth" latents: each memory chunk is re-noised to
a random level s in [0.4, 1] (s = 1: generated from pure noise) and denoised in 3 steps by the
frozen stage-2 model (the "intermediate model"), given that chunk's own ground-truth memory. The
denoiser thus learns to produce the true next chunk from memory that carries its own kind of
errors, which is what it sees in a long stream.

Control for the ablation (`--control`, stage OUT/forcing_control/): the same fine-tune from
stage 2 with the same steps and settings but ground-truth memory only, so "with vs without
self-forcing" compares models with equal training.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from tqdm import tqdm

from flowact.networks import build_networks
from flowact.presets import LATENT_FRAMES_PER_CHUNK, Preset
from flowact.train.common import EMA, Stage, lr_at, setup, stage_parser, step_generator
from flowact.train.latents import (Batch, LatentSet, build_latent_set, latent_weights, make_bank, memory_chunks,
                                   sample_batch, sample_long_term)
from flowact.train.data import STATES
from flowact.models.text_encoder import tokenize

AUX_WEIGHT = 0.1
MEMORY_NOISE_PROB = 0.5  # samples whose memory (not the reference) gets Gaussian noise ...
MEMORY_NOISE_MAX = 0.25  # ... with sigma ~ U(0, this)
P_INDEPENDENT_T = 0.3  # samples with one noise level per frame (else one per chunk, as at inference)
SF_PROB = 0.5
SF_STEPS = 3
SF_LEVELS = (0.4, 1.0)


def sample_t(batch: int, g: torch.Generator, shift: float, p_independent: float = P_INDEPENDENT_T) -> torch.Tensor:
    """Per-frame flow-matching times (B, 3) from the sampler's shifted distribution."""
    u = torch.rand(batch, LATENT_FRAMES_PER_CHUNK, generator=g)
    shared = torch.rand(batch, 1, generator=g).expand(-1, LATENT_FRAMES_PER_CHUNK)
    u = torch.where(torch.rand(batch, 1, generator=g) < p_independent, u, shared)
    return shift * u / (1.0 + (shift - 1.0) * u)


def augment_memory(b: Batch, g: torch.Generator) -> None:
    """Noise augmentation of the memory (in place): the reference slot stays exact, the other slots
    of MEMORY_NOISE_PROB of the samples get N(0, sigma^2), sigma ~ U(0, MEMORY_NOISE_MAX)."""
    n = len(b.memory)
    sigma = MEMORY_NOISE_MAX * torch.rand(n, generator=g) * (torch.rand(n, generator=g) < MEMORY_NOISE_PROB)
    noise = torch.randn(b.memory.shape, generator=g) * sigma[:, None, None, None, None]
    noise[:, 0] = 0.0
    b.memory += noise.to(b.memory.device)


def forcing_loss(nets, aux_head, b: Batch, g: torch.Generator, weights: torch.Tensor, shift: float):
    """Flow-matching loss of one batch (+ the auxiliary mouth loss) -> (loss, parts)."""
    dev = b.x0.device
    feats = nets.audio_encoder(b.audio)  # (B, 12, Da)
    prompt = nets.text_encoder(b.prompt_ids)  # (B, P, Dt)
    t = sample_t(len(b.x0), g, shift).to(dev)  # (B, 3)
    eps = torch.randn(b.x0.shape, generator=g).to(dev)
    tt = t[:, :, None, None, None]
    xt = (1.0 - tt) * b.x0 + tt * eps
    v, _ = nets.denoiser.forward_joint(xt, t, feats, prompt, b.memory, b.valid)  # (B, 3, 16, h, w)
    fm = ((v - (eps - b.x0)).pow(2) * weights).mean()
    aux = F.mse_loss(aux_head(feats).squeeze(-1), b.mouth)
    return fm + AUX_WEIGHT * aux, {"flow": fm.item(), "mouth_aux": aux.item()}


@torch.no_grad()
def generated_memory(teacher, ds: LatentSet, preset: Preset, b: Batch, use: list[bool], g: torch.Generator,
                     device) -> None:
    """Replace the memory of samples marked in `use` with generated-ground-truth latents (in place)."""
    jobs = []  # (sample, chunk)
    for s, (i, k, r) in enumerate(zip(b.clip, b.chunk, b.refine)):
        if use[s]:
            jobs += [(s, c) for c in memory_chunks(k, b.long_term, r)]
    if not jobs:
        return
    L = b.long_term
    gt = torch.stack([ds.chunk(b.clip[s], c).float() for s, c in jobs])  # (J, 3, 16, h, w)
    mem, val = zip(*(make_bank(ds.refs[b.clip[s]], [ds.chunk(b.clip[s], m) for m in memory_chunks(c, L, False)], L, False)
                     for s, c in jobs))
    mem, val = torch.stack(mem).to(device), torch.stack(val).to(device)
    audio = torch.stack([ds.audio_window(b.clip[s], c, preset.audio_window_samples) for s, c in jobs]).to(device)
    ids = tokenize([STATES[int(ds.states[b.clip[s], c])] for s, c in jobs], preset.prompt_tokens).to(device)
    feats, prompt = teacher.audio_encoder(audio), teacher.text_encoder(ids)
    level = SF_LEVELS[0] + (SF_LEVELS[1] - SF_LEVELS[0]) * torch.rand(len(jobs), generator=g)  # (J,)
    x = (1 - level[:, None, None, None, None]) * gt + level[:, None, None, None, None] * torch.randn(gt.shape, generator=g)
    x = x.to(device)
    kv = teacher.denoiser.memory_kv(mem, val)
    for step in range(SF_STEPS):  # Euler on a linear schedule from each job's level to 0
        t_now = level * (1 - step / SF_STEPS)
        t_next = level * (1 - (step + 1) / SF_STEPS)
        t = t_now.to(device)[:, None].expand(-1, LATENT_FRAMES_PER_CHUNK)
        x = x + (t_next - t_now).to(device)[:, None, None, None, None] * teacher.denoiser.forward_stream(
            x, t, feats, prompt, kv, val)
    generated = {job: x[j].float().cpu() for j, job in enumerate(jobs)}
    for s, (i, k, r) in enumerate(zip(b.clip, b.chunk, b.refine)):
        if use[s]:
            m, v = make_bank(ds.refs[i], [generated[(s, c)] for c in memory_chunks(k, L, r)], L, r)
            b.memory[s] = m.to(device)
            b.valid[s] = v.to(device)


def main(argv=None) -> None:
    p = stage_parser(__doc__.splitlines()[0], steps=2500, batch=32, lr=5e-4)
    p.add_argument("--self-forcing", action="store_true", help="stage 3: fine-tune stage 2 with generated memory")
    p.add_argument("--control", action="store_true", help="stage 3's fine-tune without generated memory (ablation)")
    p.add_argument("--init", default=None, help="checkpoint to start from (default: OUT/vae/checkpoint, "
                   "or OUT/forcing/checkpoint with --self-forcing)")
    p.add_argument("--clips", type=int, default=None, help="training clips (default by preset)")
    p.add_argument("--chunks", type=int, default=24, help="chunks per training clip")
    args = p.parse_args(argv)
    preset, out, device = setup(args)
    finetune = args.self_forcing or args.control
    if args.self_forcing and args.control:
        p.error("--self-forcing and --control are two different stages")
    name = "self_forcing" if args.self_forcing else "forcing_control" if args.control else "forcing"
    stage = Stage(out, name)
    init = args.init or str(out / ("forcing" if finetune else "vae") / "checkpoint")
    nets = build_networks(preset, checkpoint=init)
    vae_ckpt = out / "vae" / "checkpoint"
    clips = args.clips or (160 if preset.height <= 64 else 192)
    ds = build_latent_set(preset, nets.vae_encoder.to(device), vae_ckpt if vae_ckpt.is_dir() else init,
                          out / "latents.pt", clips, args.chunks, workers=args.workers)

    teacher = None
    if args.self_forcing:
        teacher = copy.deepcopy(nets).to(device)  # the frozen intermediate model
    trained = {"denoiser": nets.denoiser, "audio_encoder": nets.audio_encoder, "text_encoder": nets.text_encoder}
    for m in trained.values():
        m.to(device).train().requires_grad_(True)
    aux_head = torch.nn.Linear(preset.audio.d_model, 1).to(device)
    params = [q for m in trained.values() for q in m.parameters()] + list(aux_head.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.99))
    emas = {k: EMA(m, 0.995 if finetune else 0.998) for k, m in trained.items()}
    modules = {**trained, "aux_head": aux_head, "opt": opt, **{f"ema_{k}": e for k, e in emas.items()}}
    if args.resume and stage.resume(modules):
        print(f"resumed {stage.state_path} at step {stage.step}")
    weights = latent_weights(preset).to(device)

    bar = tqdm(total=args.steps, initial=stage.step, desc=f"{name} {preset.name}", unit="step")
    while stage.step < args.steps:
        g = step_generator(args.seed + (7 if finetune else 0), stage.step)
        b = sample_batch(ds, preset, args.batch, g, sample_long_term(g, preset)).to(device)
        use_generated = (torch.rand(args.batch, generator=g) < SF_PROB).tolist()  # drawn in both fine-tunes
        if teacher is not None:
            generated_memory(teacher, ds, preset, b, use_generated, g, device)
        augment_memory(b, g)
        for group in opt.param_groups:
            group["lr"] = lr_at(stage.schedule_step(args), args.steps, args.lr, warmup=50 if finetune else 100)
        loss, parts = forcing_loss(nets, aux_head, b, g, weights, preset.timestep_shift)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        for k, e in emas.items():
            e.update(trained[k])
        if stage.end_of_step(modules, args, bar, ("flow", "mouth_aux"), loss=loss.item(), **parts):
            break
    bar.close()
    for k, e in emas.items():
        getattr(nets, k).load_state_dict(e.module.state_dict())
    stage.done(nets, {"clips": clips, "chunks": args.chunks, "init": init})
    print(f"{name}: {stage.step} steps in {stage.elapsed() / 60:.1f} min -> {stage.checkpoint}")


if __name__ == "__main__":
    main()
