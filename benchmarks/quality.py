"""Objective quality of trained checkpoints over long streams: lip sync, identity drift, seams.

    python -m flowact.benchmarks.quality --preset tiny [--minutes 5] [--identities 4] [--checkpoints checkpoints] [--device cuda]

Every configuration streams the same held-out avatars (the demo identity plus unseen random
ones, each with its own reference image) through the stream engine (`StreamEngine.step`, all
avatars batched), chunk by chunk, with held-out speech-and-pause audio and the behaviour prompt
of each chunk, for `--minutes` of video. Metrics (flowact.train.metrics): lip sync (correlation
of the audio envelope with the mouth opening measured in the frames), identity drift (distance
to the reference per chunk, first vs last 10% of the stream), seam ratio (change across chunk
boundaries / change inside chunks). Rows:

    ground truth            the procedural renderer's own video for the same audio (upper bound)
    distilled 3-NFE         the shipped checkpoint as `make demo` runs it (refinement on, long-term 3)
    teacher 24-step         the self-forcing teacher, 24 Euler steps
    teacher 3-step          the same teacher at 3 steps without distillation
    no self-forcing 24-step the diffusion-forcing teacher (ground-truth memory only), 24 steps
    no self-forcing 3-NFE   ... distilled the same way (when that checkpoint exists)
    no refinement           distilled, refine_every = 0
    long-term 0 / 1         distilled with preset.with_(long_term_size=...) (3 is the distilled row)
    random weights          seeded random networks (what the project ran before training)

Prints a table and writes benchmarks/results/quality_<preset>.json and quality_<preset>.png.

    python -m flowact.benchmarks.quality --demo [--out DIR]

    python -m flowact.benchmarks.quality --preset cpu --precisions [--minutes 2]

The CPU precisions instead (`flowact serve --precision`): the same avatars through ONNX Runtime on
the float32 and int8 exports of the shipped checkpoint, in lockstep, each with the metrics above,
and int8's frames against float32's of the same inputs: PSNR over the free-running streams (and its
worst chunk), and PSNR of each chunk made from float32's own state (the error one chunk adds, before
the two streams' memory banks drift apart); writes quality_<preset>_int8.json.

The demo figure instead: lip sync of what `flowact demo` / `flowact generate` stream, the shipped
reference.png and speech.wav (real espeak-ng speech, a cartoon face, neither seen in training),
for the shipped tiny and cpu checkpoints and for cpu with seeded random weights, in process
(StreamEngine, seed 0, as `flowact generate`); writes quality_demo.json (a few minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from flowact.benchmarks.kit import RESULTS, reference_inputs
from flowact.engine import StreamEngine
from flowact.presets import SAMPLES_PER_CHUNK, Preset, get_preset
from flowact.runtime import Runners, RuntimeKind, build_runners
from flowact.stats import psnr_db
from flowact.train.data import (DEMO_IDENTITY, Motion, audio_envelope, behaviour_motion, chunk_states, frame_states,
                                random_identity, render, speech_timeline)
from flowact.train.metrics import StreamMeter, drift

REPO = Path(__file__).resolve().parent.parent
EVAL_SEED0 = 900_000  # held out: training clips use seeds 1000..


@dataclass
class Avatar:
    reference: np.ndarray  # (H, W, 3) uint8
    audio: np.ndarray  # (chunks * 7680,) float32
    states: list[str]  # behaviour prompt per chunk
    identity: object


def eval_avatars(preset: Preset, n: int, chunks: int, speech: str) -> list[Avatar]:
    out = []
    for i in range(n):
        rng = np.random.default_rng(EVAL_SEED0 + i)
        idn = DEMO_IDENTITY if i == 0 else random_identity(rng)
        audio, silent = speech_timeline(rng, chunks * SAMPLES_PER_CHUNK / 16_000, speech)
        ref = render(idn, Motion.still(1, mouth=float(rng.uniform(0, 0.5))), preset.height)[0]
        out.append(Avatar(ref, audio, chunk_states(audio, silent), idn))
    return out


def ground_truth_meter(size: int, index: int, a: Avatar) -> StreamMeter:
    rng = np.random.default_rng(EVAL_SEED0 + 10_000 + index)
    motion = behaviour_motion(rng, audio_envelope(a.audio), frame_states(a.states))
    m = StreamMeter(a.reference)
    for c in range(len(a.states)):  # render chunk by chunk: constant memory
        sl = slice(c * 12, (c + 1) * 12)
        m.add(render(a.identity, Motion(motion.dx[sl], motion.dy[sl], motion.mouth[sl], motion.eyes[sl]), size))
    return m


def ground_truth_meters(preset: Preset, avatars: list[Avatar]) -> list[StreamMeter]:
    """The renderer's own video of every avatar (one process per avatar)."""
    with ProcessPoolExecutor(len(avatars)) as pool:
        return list(pool.map(partial(ground_truth_meter, preset.height), range(len(avatars)), avatars))


def stream_meters(preset: Preset, runners: Runners, avatars: list[Avatar], seed: int, desc: str,
                  device: str = "cpu") -> tuple[list[StreamMeter], float]:
    engine = StreamEngine(preset, runners, device, torch.float32, capacity=len(avatars))
    states = [engine.start(a.reference, seed=seed + i, prompt=a.states[0]) for i, a in enumerate(avatars)]
    meters = [StreamMeter(a.reference) for a in avatars]
    chunks = len(avatars[0].states)
    t0 = time.perf_counter()
    for c in tqdm(range(chunks), desc=desc, unit="chunk", leave=False):
        audio = [a.audio[c * SAMPLES_PER_CHUNK:(c + 1) * SAMPLES_PER_CHUNK] for a in avatars]
        frames = engine.step(states, audio, [a.states[c] for a in avatars])
        for m, f in zip(meters, frames):
            m.add(f)
    return meters, time.perf_counter() - t0


def summarise(meters: list[StreamMeter], avatars: list[Avatar]) -> dict:
    curves = np.stack([m.drift_curve() for m in meters])  # (A, chunks)
    early, late, d = drift(curves.mean(axis=0))
    lips = [m.lip_sync(a.audio) for m, a in zip(meters, avatars)]
    return {"lip_sync": float(np.mean(lips)), "lip_sync_per_avatar": lips, "distance_early": early,
            "distance_late": late, "drift": d, "seam_ratio": float(np.mean([m.seam_ratio() for m in meters])),
            "curve": curves.mean(axis=0).tolist()}


def configurations(preset: Preset, root: Path) -> list[tuple[str, Path | None, dict]]:
    """(row name, checkpoint directory or None for random weights, preset changes)."""
    name = preset.name
    student, teacher, df, df_student = (root / name, root / f"{name}-teacher", root / f"{name}-df",
                                        root / f"{name}-df-distilled")
    rows = [("distilled 3-NFE", student, {}),
            ("teacher 24-step", teacher, {"nfe": 24}),
            ("teacher 3-step", teacher, {}),
            ("no self-forcing 24-step", df, {"nfe": 24}),
            ("no self-forcing 3-NFE", df_student, {}),
            ("no refinement", student, {"refine_every": 0}),
            ("long-term 0", student, {"long_term_size": 0}),
            ("long-term 1", student, {"long_term_size": 1}),
            ("random weights", None, {})]
    return [r for r in rows if r[1] is None or (r[1] / "preset.json").is_file()]


def plot(results: dict, path: Path, preset: Preset) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    names = list(rows)
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.6), gridspec_kw={"width_ratios": [2.2, 1, 1]})
    ax = axes[0]
    for n in names:
        curve = np.asarray(rows[n]["curve"])
        k = max(1, len(curve) // 60)
        smooth = np.convolve(curve, np.ones(k) / k, mode="valid")
        ax.plot(np.arange(len(smooth)) * 0.48 / 60, smooth, label=n, lw=1.3, ls="--" if n in ("ground truth", "random weights") else "-")
    ax.set_xlabel("stream time (min)")
    ax.set_ylabel("distance to reference (0..1)")
    ax.set_title("identity drift over the stream")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    for ax, key, title in ((axes[1], "lip_sync", "lip sync (corr. envelope vs mouth)"), (axes[2], "seam_ratio", "seam ratio (1 = no jump)")):
        ax.barh(names, [rows[n][key] for n in names], color=["0.6" if n in ("ground truth", "random weights") else "C0" for n in names])
        ax.invert_yaxis()
        ax.set_title(title)
        ax.grid(alpha=0.3, axis="x")
        ax.tick_params(axis="y", labelsize=7)
    fig.suptitle(f"quality, preset {preset.name}: {results['minutes']:.1f} min streams x {results['avatars']} held-out avatars")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def table(rows: dict) -> str:
    head = f"{'configuration':26s} {'lip sync':>8s} {'dist early':>10s} {'dist late':>9s} {'drift':>7s} {'seam':>6s}"
    lines = [head, "-" * len(head)]
    for n, r in rows.items():
        lines.append(f"{n:26s} {r['lip_sync']:8.3f} {r['distance_early']:10.4f} {r['distance_late']:9.4f} "
                     f"{r['drift']:+7.4f} {r['seam_ratio']:6.2f}")
    return "\n".join(lines)


def precision_rows(preset: Preset, root: Path, avatars: list[Avatar], seed: int, threads: int) -> dict:
    """Every CPU precision's row (ONNX Runtime on the exports below `root`), streamed in lockstep; the
    rows after float32 also get their frames' PSNR against float32's, twice: over the free-running
    streams (the memory bank feeds each stream's own latents back, so the two trajectories drift apart
    over minutes) and chunk by chunk from float32's own state (each chunk's error alone)."""
    from flowact.runtime.manifest import CPU_PRECISIONS, Precision

    engines = {p: StreamEngine(preset, build_runners(RuntimeKind.ONNX, preset, root / p.value, threads=threads),
                               capacity=2 * len(avatars)) for p in CPU_PRECISIONS}
    states = {p: [e.start(a.reference, seed=seed + i, prompt=a.states[0]) for i, a in enumerate(avatars)]
              for p, e in engines.items()}
    forced = {p: [e.start(a.reference) for a in avatars] for p, e in engines.items() if p != Precision.FP32}
    meters = {p: [StreamMeter(a.reference) for a in avatars] for p in engines}
    seconds = dict.fromkeys(engines, 0.0)
    mse = {p: [] for p in forced}  # per chunk, all avatars: free-running streams
    mse_forced = {p: [] for p in forced}  # per chunk, all avatars: one chunk from float32's state

    def frame_mse(frames: list[np.ndarray], reference: list[np.ndarray]) -> float:
        return float(np.mean([np.mean((f.astype(np.float64) - g) ** 2) for f, g in zip(frames, reference)]))

    for c in tqdm(range(len(avatars[0].states)), desc="precisions", unit="chunk", leave=False):
        audio = [a.audio[c * SAMPLES_PER_CHUNK:(c + 1) * SAMPLES_PER_CHUNK] for a in avatars]
        prompts = [a.states[c] for a in avatars]
        for p in forced:  # float32's state before this chunk
            for s, f in zip(forced[p], states[Precision.FP32]):
                s.load(f.arrays(), f.header())
        frames = {}
        for p, engine in engines.items():
            t = time.perf_counter()
            frames[p] = engine.step(states[p], audio, prompts)  # A x (12, H, W, 3) u8
            seconds[p] += time.perf_counter() - t
            for m, f in zip(meters[p], frames[p]):
                m.add(f)
        for p in forced:
            mse[p].append(frame_mse(frames[p], frames[Precision.FP32]))
            mse_forced[p].append(frame_mse(engines[p].step(forced[p], audio, prompts), frames[Precision.FP32]))
    rows = {}
    for p in engines:
        row = rows[f"onnx {p.value}"] = summarise(meters[p], avatars)
        row["seconds_per_chunk"] = seconds[p] / len(avatars[0].states)  # all avatars batched; not a speed benchmark
        if p in mse:
            row["psnr_vs_fp32_db"], row["psnr_vs_fp32_worst_chunk_db"] = psnr_db(np.mean(mse[p])), psnr_db(max(mse[p]))
            row["psnr_vs_fp32_per_chunk_db"] = [psnr_db(m) for m in mse[p]]
            row["one_chunk_psnr_vs_fp32_db"] = psnr_db(np.mean(mse_forced[p]))
            row["one_chunk_psnr_vs_fp32_worst_db"] = psnr_db(max(mse_forced[p]))
            row["one_chunk_psnr_vs_fp32_per_chunk_db"] = [psnr_db(m) for m in mse_forced[p]]
            row["lip_sync_minus_fp32"] = row["lip_sync"] - rows[f"onnx {Precision.FP32.value}"]["lip_sync"]
        print(f"onnx {p.value}: lip sync {row['lip_sync']:.3f}, drift {row['drift']:+.4f}, seam {row['seam_ratio']:.2f}"
              + (f", PSNR vs fp32 {row['psnr_vs_fp32_db']:.1f} dB over the streams (worst chunk "
                 f"{row['psnr_vs_fp32_worst_chunk_db']:.1f}), {row['one_chunk_psnr_vs_fp32_db']:.1f} dB chunk by chunk "
                 f"from fp32's state (worst {row['one_chunk_psnr_vs_fp32_worst_db']:.1f})" if p in mse else ""), flush=True)
    return rows


DEMO_ROWS = (  # (row, preset, the shipped checkpoint (else seeded random weights), int8 ONNX (else PyTorch fp32))
    ("tiny", "tiny", True, False), ("cpu", "cpu", True, False), ("cpu int8 (as make demo serves it)", "cpu", True, True),
    ("cpu random weights", "cpu", False, False))


def demo_lip_sync(out: Path, seed: int = 0, threads: int = 2) -> dict:
    """Lip sync of the shipped samples streamed like `flowact generate` (PyTorch, fp32), and like `make demo`
    serves them (the int8 ONNX exports, in process: the served frames equal these; quality_demo.json)."""
    from flowact.export.int8 import export_int8
    from flowact.media import split_chunks
    from flowact.networks import shipped_checkpoint
    from flowact.runtime.manifest import Precision
    from flowact.serving.repository import embedded_export_root
    from flowact.train.metrics import lip_sync

    rows = {}
    for name, preset_name, trained, int8 in DEMO_ROWS:
        preset = get_preset(preset_name)
        image, speech, _ = reference_inputs(preset)
        chunks, n_frames = split_chunks(speech)  # (K, 7680), frames that cover the speech
        ckpt = shipped_checkpoint(preset_name) if trained else None
        if int8:
            root = embedded_export_root(preset.name)
            export_int8(preset, root, checkpoint=ckpt)  # what `make demo` exports (idempotent)
            runners = build_runners(RuntimeKind.ONNX, preset, root / Precision.INT8.value, threads=threads)
        else:
            runners = build_runners(RuntimeKind.TORCH, preset, ckpt)
        engine = StreamEngine(preset, runners)
        state = engine.start(image, seed=seed)
        t = time.perf_counter()
        frames = np.concatenate([engine.step([state], [c])[0] for c in chunks])[:n_frames]  # (F, H, W, 3)
        rows[name] = {"preset": preset_name, "lip_sync": lip_sync(frames, speech), "frames": int(len(frames)),
                      "checkpoint": None if ckpt is None else f"checkpoints/{ckpt.name}",
                      "seconds": time.perf_counter() - t}
        print(f"{name}: lip sync {rows[name]['lip_sync']:.3f}", flush=True)
    result = {"what": "lip sync (flowact.train.metrics.lip_sync) of the shipped samples streamed in process as "
                      "`flowact generate` does (PyTorch fp32, seed 0), and as `make demo` serves them (int8 ONNX)",
              "image": "flowact/samples/reference.png", "audio": "flowact/samples/speech.wav",
              "command": "python -m flowact.benchmarks.quality --demo",
              "machine": platform.processor() or platform.machine(), "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality_demo.json").write_text(json.dumps(result, indent=1))
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo", action="store_true", help="only the lip sync of the shipped samples (quality_demo.json)")
    p.add_argument("--precisions", action="store_true",
                   help="ONNX Runtime fp32 vs int8 on the shipped checkpoint (quality_<preset>_int8.json)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--checkpoints", default=str(REPO / "checkpoints"), help="folder with <preset>, <preset>-teacher, ...")
    p.add_argument("--minutes", type=float, default=5.0, help="stream length")
    p.add_argument("--identities", type=int, default=4, help="avatars streamed in one batch (first: the demo identity)")
    p.add_argument("--speech", default="synth", choices=("synth", "espeak", "mixed"))
    p.add_argument("--only", default=None, help="comma-separated row names to run")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="torch device the networks run on (cpu, cuda)")
    p.add_argument("--seed", type=int, default=0, help="the streams' noise seeds")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.demo:
        demo_lip_sync(Path(args.out) if args.out else RESULTS, args.seed, args.threads)
        return 0
    preset = get_preset(args.preset)
    chunks = max(2, int(round(args.minutes * 60 / 0.48)))
    avatars = eval_avatars(preset, args.identities, chunks, args.speech)

    rows = {}
    t = time.perf_counter()
    out = Path(args.out) if args.out else RESULTS
    out.mkdir(parents=True, exist_ok=True)

    stem = f"quality_{preset.name}" + ("_int8" if args.precisions else "")

    def save() -> None:
        results = {"preset": preset.name, "minutes": chunks * 0.48 / 60, "chunks": chunks, "avatars": len(avatars),
                   "speech": args.speech, "seconds": time.perf_counter() - t,
                   "machine": platform.processor() or platform.machine(), "torch_threads": args.threads,
                   "device": args.device, "rows": rows}
        (out / f"{stem}.json").write_text(json.dumps(results, indent=1))
        plot(results, out / f"{stem}.png", preset)

    rows["ground truth"] = summarise(ground_truth_meters(preset, avatars), avatars)
    rows["ground truth"]["seconds_per_chunk"] = 0.0
    if args.precisions:
        from flowact.export.int8 import export_int8
        from flowact.networks import shipped_checkpoint
        from flowact.serving.repository import embedded_export_root

        root = embedded_export_root(preset.name)
        export_int8(preset, root, checkpoint=shipped_checkpoint(preset.name))  # fp32 first, both idempotent
        rows.update(precision_rows(preset, root, avatars, args.seed, args.threads))
        save()
        print(table(rows) + f"\nwrote {out / stem}.json and .png")
        return 0
    wanted = set(args.only.split(",")) if args.only else None
    for name, ckpt, changes in configurations(preset, Path(args.checkpoints)):
        if wanted and name not in wanted:
            continue
        runners = build_runners(RuntimeKind.TORCH, preset, ckpt, args.device, torch.float32)  # ckpt None: seeded random
        variant = preset.with_(**changes)
        meters, seconds = stream_meters(variant, runners, avatars, args.seed, name, args.device)
        rows[name] = summarise(meters, avatars)
        rows[name]["seconds_per_chunk"] = seconds / chunks  # all avatars batched; not a speed benchmark
        rows[name]["checkpoint"] = None if ckpt is None else str(ckpt.relative_to(REPO) if ckpt.is_relative_to(REPO) else ckpt)
        rows[name]["preset_changes"] = changes
        print(f"{name}: lip sync {rows[name]['lip_sync']:.3f}, drift {rows[name]['drift']:+.4f}, "
              f"seam {rows[name]['seam_ratio']:.2f} ({seconds:.0f} s)", flush=True)
        save()  # after every row: an interrupted run keeps the rows it finished

    print(table(rows))
    print(f"wrote {out / stem}.json and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
