"""The whole recipe for one preset: every stage in order with its settings, then shipping.

    python -m flowact.train.recipe --preset tiny [--device cpu] [--out runs/tiny] [--minutes-scale 1.0]
    python -m flowact.train.recipe --preset cpu --device cuda --workers 16 --stages vae,forcing,self_forcing,distill

Each stage is the same command one would type (see flowact/train/README.md); a stage whose
summary.json already reports its step count is skipped, and an interrupted stage resumes from
its state.pt. Every stage also stops (and writes its checkpoint) after its wall-time bound times
`--minutes-scale` (its learning-rate schedule then follows the time budget); a later run of the
recipe continues it. The tiny settings are the ones the shipped checkpoints were trained with on
this shared 2-core CPU (about 1.5 hours in all); the cpu settings are sized for one H100
(`--device cuda`), where the time bounds, not the step counts, end the stages.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from flowact.presets import get_preset

# stage name -> (module, extra arguments, steps, batch, minutes on this 2-core machine)
RECIPES: dict[str, list[tuple[str, str, list[str], int, int, float]]] = {
    "tiny": [
        ("vae", "vae", [], 4000, 6, 40),
        ("forcing", "forcing", [], 3000, 32, 30),
        ("self_forcing", "forcing", ["--self-forcing"], 600, 32, 12),
        ("forcing_control", "forcing", ["--control"], 600, 32, 6),
        ("distill", "distill", [], 1000, 16, 20),
        ("distill_no_sf", "distill", ["--teacher", "{out}/forcing_control/checkpoint", "--name", "distill_no_sf"],
         1000, 16, 20),
    ],
    # cpu preset: minutes on one H100 (on this 2-core CPU a VAE step costs ~2 s and a denoiser step
    # ~8 s, so it would take days here); step counts are upper bounds.
    "cpu": [
        ("vae", "vae", [], 6000, 16, 3.5),
        ("forcing", "forcing", [], 10000, 64, 7),
        ("self_forcing", "forcing", ["--self-forcing"], 3000, 64, 2.5),
        ("forcing_control", "forcing", ["--control"], 3000, 64, 2.5),
        ("distill", "distill", [], 3000, 32, 3),
        ("distill_no_sf", "distill", ["--teacher", "{out}/forcing_control/checkpoint", "--name", "distill_no_sf"],
         3000, 32, 3),
    ],
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", choices=sorted(RECIPES))
    p.add_argument("--out", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workers", type=int, default=None, help="processes rendering clips (default: all cores)")
    p.add_argument("--stages", default=None, help="comma-separated stages to run (default: all; e.g. skip the ablations)")
    p.add_argument("--minutes-scale", type=float, default=1.0, help="multiply every stage's wall-time bound")
    p.add_argument("--ship", default="checkpoints", help="ship into this folder at the end ('' to skip)")
    args = p.parse_args(argv)
    preset = get_preset(args.preset)
    out = Path(args.out or f"runs/{preset.name}")
    import importlib

    stages = RECIPES[preset.name]
    if args.stages:
        unknown = set(args.stages.split(",")) - {s[0] for s in stages}
        if unknown:
            p.error(f"unknown stages {sorted(unknown)}; {preset.name} has {[s[0] for s in stages]}")
        stages = [s for s in stages if s[0] in args.stages.split(",")]
    for name, module, extra, steps, batch, minutes in stages:
        summary = out / name / "summary.json"
        if summary.is_file() and json.loads(summary.read_text())["steps"] >= steps:
            print(f"{name}: done ({summary})")
            continue
        cmd = ["--preset", preset.name, "--out", str(out), "--device", args.device, "--threads", str(args.threads),
               "--steps", str(steps), "--batch", str(batch), "--minutes", str(minutes * args.minutes_scale)]
        if args.workers:
            cmd += ["--workers", str(args.workers)]
        cmd += [a.format(out=out) for a in extra]
        if (out / name / "state.pt").is_file():
            cmd.append("--resume")
        print(f"{name}: python -m flowact.train.{module} {' '.join(cmd)}", flush=True)
        importlib.import_module(f"flowact.train.{module}").main(cmd)
    if args.ship:
        from flowact.train import ship
        ship.main(["--preset", preset.name, "--out", str(out), "--dest", args.ship])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
