"""A partial memory through its valid slots only (the torch runners) against the whole bank with its mask.

    python -m flowact.benchmarks.memory_slots                      # FLOPs for every preset, time on the cpu preset
    python -m flowact.benchmarks.memory_slots --publish            # also benchmarks/results/memory_slots.json

A new stream's memory bank fills over its first chunks (slots: 0 = reference, 1-3 = long-term,
4-6 = short-term): chunk 1 attends to slot 0 only, chunk 2 to 0 + 4-6, then one more long-term slot
per chunk until the bank is full at chunk 5. Memory refinement attends to slots 0-3. The mask path
computes every slot and hides the empty ones; the slots path computes only the valid ones.

- FLOPs per preset (flowact.benchmarks.flops.count_flops on the meta device: no weights, no time):
  the memory pass, one NFE and the chunk's DiT work (memory pass + NFEs) for each of those views.
- Time on this machine for one preset (--timed, default cpu; seeded random weights): START + the
  first chunk decoded (what the time to first frame pays) and chunks 2-5, the two paths interleaved
  --repeat times in one run and compared as a ratio (the machine is shared).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import time

import numpy as np
import torch

from flowact.benchmarks.flops import count_flops
from flowact.benchmarks.kit import RESULTS
from flowact.engine import StreamEngine, valid_slots
from flowact.networks import build_networks
from flowact.presets import LATENT_CHANNELS, LATENT_FRAMES_PER_CHUNK, PRESETS, SAMPLES_PER_CHUNK, get_preset
from flowact.runtime import RuntimeKind, build_runners
from flowact.state import MemoryBank



def views(preset) -> dict[str, tuple[int, ...]]:
    """The valid slots of a new stream's chunks while its bank fills, and of a refinement, from a real
    MemoryBank (one-pixel latents: only its validity matters)."""
    bank = MemoryBank(torch.zeros(1, 1, 1), preset.long_term_size)
    out = {}
    while not bank.full():
        out[f"chunk {len(out) + 1}"] = valid_slots(bank.valid)
        bank.push(torch.zeros(LATENT_FRAMES_PER_CHUNK, 1, 1, 1))
    out["refinement"] = valid_slots(bank.without_short_term())
    return out


def flops(preset) -> dict:
    """TFLOP of the memory pass, one NFE and the chunk per view, slots vs the masked whole bank (batch 1)."""
    d = build_networks(preset, device="meta").denoiser
    p, fm = preset, preset.memory_frames
    lat = (LATENT_CHANNELS, p.latent_height, p.latent_width)
    x = torch.empty(1, LATENT_FRAMES_PER_CHUNK, *lat, device="meta")
    t = torch.empty(1, LATENT_FRAMES_PER_CHUNK, device="meta")
    audio = torch.empty(1, 12, p.audio.d_model, device="meta")
    prompt = torch.empty(1, p.prompt_tokens, p.text_dim, device="meta")
    refine_nfe = max(1, math.ceil(p.nfe * p.refine_t))
    out = {}
    for name, slots in views(preset).items():
        nfe = refine_nfe if name == "refinement" else p.nfe
        row = {"valid_slots": list(slots), "nfe": nfe}
        for path, frames, valid in (("slots", len(slots), None), ("mask", fm, torch.empty(1, fm, dtype=torch.bool, device="meta"))):
            memory = torch.empty(1, frames, *lat, device="meta")
            positions = torch.tensor(slots, device="meta") if path == "slots" else None
            with torch.inference_mode(), count_flops(d) as mem:
                kv = d.memory_kv(memory, valid, positions)
            with torch.inference_mode(), count_flops(d) as step:
                d.forward_stream(x, t, audio, prompt, kv, valid)
            row[path] = {"memory_pass_tflop": mem.total / 1e12, "nfe_tflop": step.total / 1e12,
                         "chunk_tflop": (mem.total + nfe * step.total) / 1e12}
        row["chunk_ratio"] = row["slots"]["chunk_tflop"] / row["mask"]["chunk_tflop"]
        out[name] = row
    return out


def timed(preset, repeat: int) -> dict:
    """Wall time of START + first chunk (decoded) and of chunks 2-5, slots vs mask, interleaved."""
    slots = build_runners(RuntimeKind.TORCH, preset)
    engines = {"slots": StreamEngine(preset, slots),
               "mask": StreamEngine(preset, dataclasses.replace(slots, memory_subsets=False))}
    image = np.random.default_rng(0).integers(0, 256, (preset.height, preset.width, 3), dtype=np.uint8)
    audio = np.random.default_rng(1).normal(0, 0.1, (5, SAMPLES_PER_CHUNK)).astype(np.float32)
    first = {k: [] for k in engines}
    later = {k: [] for k in engines}
    for rep in range(repeat + 1):  # the first round warms both paths up and is not kept
        for name, engine in engines.items():
            t0 = time.perf_counter()
            state = engine.start(image, seed=rep)
            engine.step([state], [audio[0]])
            t1 = time.perf_counter()
            for chunk in audio[1:]:
                engine.step([state], [chunk])
            engine.end(state)
            if rep:
                first[name].append((t1 - t0) * 1e3)
                later[name].append((time.perf_counter() - t1) * 1e3 / (len(audio) - 1))
    med = {k: {"start_first_chunk_ms": statistics.median(first[k]), "chunks_2_5_ms": statistics.median(later[k])}
           for k in engines}
    return {"preset": preset.name, "repeat": repeat, "torch_threads": torch.get_num_threads(), **med,
            "start_first_chunk_ratio": med["slots"]["start_first_chunk_ms"] / med["mask"]["start_first_chunk_ms"],
            "chunks_2_5_ratio": med["slots"]["chunks_2_5_ms"] / med["mask"]["chunks_2_5_ms"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default=",".join(PRESETS), help="presets whose FLOPs to count")
    ap.add_argument("--timed", default="cpu", help="the preset to time on this machine ('' to skip)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--publish", action="store_true", help="write benchmarks/results/memory_slots.json")
    args = ap.parse_args(argv)
    result = {"benchmark": "memory_slots", "flops": {}, "time": None}
    for name in args.presets.split(","):
        result["flops"][name] = rows = flops(get_preset(name))
        print(f"{name}: DiT TFLOP per stream-chunk, valid slots / whole bank with mask")
        for view, r in rows.items():
            print(f"  {view:11s} slots {','.join(map(str, r['valid_slots'])):15s} memory pass {r['slots']['memory_pass_tflop']:9.4g} / "
                  f"{r['mask']['memory_pass_tflop']:9.4g}  NFE {r['slots']['nfe_tflop']:9.4g} / {r['mask']['nfe_tflop']:9.4g}  "
                  f"chunk {r['slots']['chunk_tflop']:9.4g} / {r['mask']['chunk_tflop']:9.4g} ({r['chunk_ratio']:.2f}x)")
    if args.timed:
        result["time"] = t = timed(get_preset(args.timed), args.repeat)
        print(f"{t['preset']} on this CPU ({t['torch_threads']} threads, median of {t['repeat']}): START + first chunk "
              f"{t['slots']['start_first_chunk_ms']:.0f} ms with valid slots vs {t['mask']['start_first_chunk_ms']:.0f} ms "
              f"with the mask ({t['start_first_chunk_ratio']:.2f}x); chunks 2-5 {t['slots']['chunks_2_5_ms']:.0f} vs "
              f"{t['mask']['chunks_2_5_ms']:.0f} ms ({t['chunks_2_5_ratio']:.2f}x)")
    if args.publish:
        out = RESULTS / "memory_slots.json"
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
