"""Stage 4: few-step distillation of the many-step teacher into the 3-NFE student the engine runs.

    python -m flowact.train.distill --preset tiny [--teacher OUT/self_forcing/checkpoint] [--teacher-steps 24]

Trajectory (segment) distillation, a one-round form of progressive distillation: the teacher
integrates the flow ODE with `--teacher-steps` Euler steps on the sampler's shifted schedule;
because that schedule contains the student's 3 times (1, 0.857, 0.6, 0 for shift 3) whenever the
step count is a multiple of 3, the teacher's trajectory passes through the points the student
starts its steps from. The student (initialised from the teacher) is trained so that each of its
3 Euler steps lands where the teacher's many steps land:

    v_student(x_ti, t_i) ~ (x_teacher(t_{i+1}) - x_teacher(t_i)) / (t_{i+1} - t_i)

20% of samples distil the memory-refinement step instead: the engine refines the short-term
memory in one step from t_r = 0.3 (ceil(3 x 0.3) = 1); the target is the teacher's
`teacher_steps x 0.3`-step solution from the same noised latents. Memory is ground truth (GT
memory, GT audio, the sample's behaviour prompt); the audio and text encoders are frozen (the
student keeps the teacher's), so only the denoiser changes. No CFG is involved anywhere: the
models are trained without condition dropout and sampled without guidance.
"""

from __future__ import annotations

import copy
import math

import torch
from tqdm import tqdm

from flowact.engine import sampling_times
from flowact.presets import LATENT_FRAMES_PER_CHUNK
from flowact.networks import build_networks
from flowact.train.common import EMA, Stage, lr_at, setup, stage_parser, step_generator
from flowact.train.latents import build_latent_set, latent_weights, sample_batch, sample_long_term

STUDENT_NFE = 3


@torch.no_grad()
def teacher_targets(teacher, feats, prompt, b, g: torch.Generator, preset, teacher_steps: int):
    """Student inputs and targets: (x (N, 3, 16, h, w), t (N, 3), target velocity, sample index (N,))."""
    dev = b.x0.device
    refine = torch.tensor(b.refine, device=dev)
    kv = teacher.denoiser.memory_kv(b.memory, b.valid)
    xs, ts, vs, idx = [], [], [], []

    # normal samples: the teacher's trajectory from noise, read at the student's times
    normal = (~refine).nonzero().squeeze(1)
    if len(normal):
        sel = lambda x: x[normal]  # noqa: E731
        times = sampling_times(teacher_steps, preset.timestep_shift)
        per = teacher_steps // STUDENT_NFE
        x = torch.randn((len(normal), *b.x0.shape[1:]), generator=g).to(dev)
        points = [x]
        for i, (t_now, t_next) in enumerate(zip(times[:-1], times[1:])):
            t = torch.full((len(normal), LATENT_FRAMES_PER_CHUNK), t_now, device=dev)
            x = x + (t_next - t_now) * teacher.denoiser.forward_stream(x, t, sel(feats), sel(prompt), sel(kv), sel(b.valid))
            if (i + 1) % per == 0:
                points.append(x)
        student_times = times[::per]
        for i in range(STUDENT_NFE):
            xs.append(points[i])
            ts.append(torch.full((len(normal), LATENT_FRAMES_PER_CHUNK), student_times[i], device=dev))
            vs.append((points[i + 1] - points[i]) / (student_times[i + 1] - student_times[i]))
            idx.append(normal)

    # refinement samples: one student step from t_r to 0
    ref = refine.nonzero().squeeze(1)
    if len(ref):
        sel = lambda x: x[ref]  # noqa: E731
        t_r = preset.refine_t
        x_start = (1 - t_r) * b.x0[ref] + t_r * torch.randn((len(ref), *b.x0.shape[1:]), generator=g).to(dev)
        x = x_start
        times = sampling_times(max(1, math.ceil(teacher_steps * t_r)), 1.0, start=t_r)
        for t_now, t_next in zip(times[:-1], times[1:]):
            t = torch.full((len(ref), LATENT_FRAMES_PER_CHUNK), t_now, device=dev)
            x = x + (t_next - t_now) * teacher.denoiser.forward_stream(x, t, sel(feats), sel(prompt), sel(kv), sel(b.valid))
        xs.append(x_start)
        ts.append(torch.full((len(ref), LATENT_FRAMES_PER_CHUNK), t_r, device=dev))
        vs.append((x - x_start) / (0.0 - t_r))
        idx.append(ref)
    return torch.cat(xs), torch.cat(ts), torch.cat(vs), torch.cat(idx)


def main(argv=None) -> None:
    p = stage_parser(__doc__.splitlines()[0], steps=1200, batch=16, lr=2e-4)
    p.add_argument("--teacher", default=None, help="teacher checkpoint (default OUT/self_forcing/checkpoint)")
    p.add_argument("--teacher-steps", type=int, default=24, help="teacher Euler steps (a multiple of 3)")
    p.add_argument("--name", default="distill", help="stage folder name (e.g. distill_no_sf for the ablation)")
    p.add_argument("--clips", type=int, default=None)
    p.add_argument("--chunks", type=int, default=24)
    args = p.parse_args(argv)
    if args.teacher_steps % STUDENT_NFE:
        p.error(f"--teacher-steps must be a multiple of {STUDENT_NFE}")
    preset, out, device = setup(args)
    if preset.nfe != STUDENT_NFE:
        p.error(f"preset {preset.name} samples with {preset.nfe} NFE; this stage distils to {STUDENT_NFE}")
    stage = Stage(out, args.name)
    teacher_dir = args.teacher or str(out / "self_forcing" / "checkpoint")
    teacher = build_networks(preset, checkpoint=teacher_dir).to(device)
    student = copy.deepcopy(teacher)
    clips = args.clips or (160 if preset.height <= 64 else 192)
    ds = build_latent_set(preset, teacher.vae_encoder, out / "vae" / "checkpoint", out / "latents.pt", clips, args.chunks,
                          workers=args.workers)

    den = student.denoiser.train().requires_grad_(True)
    opt = torch.optim.AdamW(den.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99))
    ema = EMA(den, 0.995)
    modules = {"denoiser": den, "opt": opt, "ema_denoiser": ema}
    if args.resume and stage.resume(modules):
        print(f"resumed {stage.state_path} at step {stage.step}")
    weights = latent_weights(preset).to(device)

    bar = tqdm(total=args.steps, initial=stage.step, desc=f"distill {preset.name}", unit="step")
    while stage.step < args.steps:
        g = step_generator(args.seed + 13, stage.step)
        b = sample_batch(ds, preset, args.batch, g, sample_long_term(g, preset), p_refine=0.2).to(device)
        with torch.no_grad():
            feats, prompt = teacher.audio_encoder(b.audio), teacher.text_encoder(b.prompt_ids)
        x, t, v_target, idx = teacher_targets(teacher, feats, prompt, b, g, preset, args.teacher_steps)
        for group in opt.param_groups:
            group["lr"] = lr_at(stage.schedule_step(args), args.steps, args.lr, warmup=50)
        v, _ = den.forward_joint(x, t, feats[idx], prompt[idx], b.memory[idx], b.valid[idx])
        loss = ((v - v_target).pow(2) * weights).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(den.parameters(), 1.0)
        opt.step()
        ema.update(den)
        if stage.end_of_step(modules, args, bar, ("loss",), loss=loss.item()):
            break
    bar.close()
    student.denoiser.load_state_dict(ema.module.state_dict())
    stage.done(student, {"teacher": teacher_dir, "teacher_steps": args.teacher_steps, "student_nfe": STUDENT_NFE})
    print(f"distill: {stage.step} steps in {stage.elapsed() / 60:.1f} min -> {stage.checkpoint}")


if __name__ == "__main__":
    main()
