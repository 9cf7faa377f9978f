"""The whole recipe for one preset: every stage in order with its settings, then shipping.

    python -m flowact.train.recipe --preset tiny [--device cpu] [--out runs/tiny] [--minutes-scale 1.0]

Each stage is the same command one would type (see flowact/train/README.md); a stage whose
summary.json already reports its step count is skipped, and an interrupted stage resumes from
its state.pt. `--minutes-scale` bounds every stage's wall time (per-stage minutes x scale), for
the CPU budget of the cpu preset; on a GPU pass a large value.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from flowact.presets import get_preset

# stage name -> (module, extra arguments, steps, batch, minutes on this 2-core machine)
RECIPES: dict[str, list[tuple[str, str, list[str], int, int, float]]] = {
    "tiny": [
        ("vae", "vae", [], 2000, 6, 20),
        ("forcing", "forcing", [], 2500, 32, 25),
        ("self_forcing", "forcing", ["--self-forcing"], 600, 32, 12),
        ("forcing_control", "forcing", ["--control"], 600, 32, 6),
        ("distill", "distill", [], 1200, 16, 20),
        ("distill_no_sf", "distill", ["--teacher", "{out}/forcing_control/checkpoint", "--name", "distill_no_sf"],
         1200, 16, 20),
    ],
    "cpu": [
        ("vae", "vae", [], 3000, 6, 8),
        ("forcing", "forcing", [], 4000, 16, 10),
        ("self_forcing", "forcing", ["--self-forcing"], 1000, 16, 3),
        ("distill", "distill", ["--teacher-steps", "12"], 1000, 8, 4),
    ],
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", choices=sorted(RECIPES))
    p.add_argument("--out", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--minutes-scale", type=float, default=1.0, help="multiply every stage's wall-time bound")
    p.add_argument("--ship", default="checkpoints", help="ship into this folder at the end ('' to skip)")
    args = p.parse_args(argv)
    preset = get_preset(args.preset)
    out = Path(args.out or f"runs/{preset.name}")
    import importlib

    for name, module, extra, steps, batch, minutes in RECIPES[preset.name]:
        summary = out / name / "summary.json"
        if summary.is_file() and json.loads(summary.read_text())["steps"] >= steps:
            print(f"{name}: done ({summary})")
            continue
        cmd = ["--preset", preset.name, "--out", str(out), "--device", args.device, "--threads", str(args.threads),
               "--steps", str(steps), "--batch", str(batch), "--minutes", str(minutes * args.minutes_scale)]
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
