"""`flowact bench perf-data`: input data for NVIDIA's perf_analyzer against the `flowact` ensemble.

    flowact bench perf-data --preset tiny --out perf-tiny.json [--sequences 2] [--chunks N]

perf_analyzer's `--input-data FILE.json` format is `{"data": [[step0, step1, ...], ...]}`: one list
per sequence (a "stream" of requests); perf_analyzer sends the steps of one list in order on one
sequence id, START with the first, END with the last. What this writes, from the serving contract
(flowact.contract) and the preset:

- every step: AUDIO, 7,680 float32 samples of the shipped speech (flowact/samples/speech.wav),
  chunk after chunk; the last chunk zero-padded (random or zero audio makes NaN-free but
  meaningless video, and random strings for PROMPT / BEHAVIOUR would be refused);
- step 0 only: REF_IMAGE, the shipped reference image at the preset's size (the stream model
  refuses REF_IMAGE without START, so it must not appear in later steps);
- nothing else: SEED, PROMPT, BEHAVIOUR, RESUME and WANT_SNAPSHOT are optional and left out.

Sequence k starts k chunks into the speech (wrapping), so concurrent sequences send different
audio. Shapes are without the batch dimension (the ensemble has max_batch_size > 0).
The perf_analyzer command that uses it is in benchmarks/README.md ("perf_analyzer").
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from flowact.contract import AUDIO, REF_IMAGE


def perf_data(preset_name: str, sequences: int = 2, chunks: int | None = None) -> dict:
    """perf_analyzer input data: {"data": [sequence, ...]}, each sequence a list of steps."""
    from flowact.benchmarks.kit import reference_inputs
    from flowact.media import split_chunks
    from flowact.presets import SAMPLES_PER_CHUNK, get_preset

    if sequences < 1:
        raise ValueError("sequences must be >= 1")
    preset = get_preset(preset_name)
    image, speech, _ = reference_inputs(preset)  # (H, W, 3) uint8, (S,) float32
    speech, _ = split_chunks(speech)  # (N, 7680) float32, the last chunk zero-padded
    n = chunks or len(speech)
    if n < 1:
        raise ValueError("chunks must be >= 1")
    ref = {"content": image.reshape(-1).tolist(), "shape": list(image.shape)}
    data = []
    for k in range(sequences):
        steps = []
        for i in range(n):
            audio = speech[(k + i) % len(speech)].astype(np.float32)
            step = {AUDIO: {"content": [float(x) for x in audio], "shape": [SAMPLES_PER_CHUNK]}}
            if i == 0:
                step[REF_IMAGE] = ref
            steps.append(step)
        data.append(steps)
    return {"data": data}


def write_perf_data(preset_name: str, out: Path, sequences: int = 2, chunks: int | None = None) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(perf_data(preset_name, sequences, chunks), separators=(",", ":")))
    return out


def add_parser(bsub) -> None:
    p = bsub.add_parser("perf-data", help="input data (JSON) for NVIDIA perf_analyzer against the flowact ensemble",
                        description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu")
    p.add_argument("--out", type=Path, required=True, help="the JSON file to write (perf_analyzer --input-data)")
    p.add_argument("--sequences", type=int, default=2, help="sequences (data streams), each starting elsewhere in the speech")
    p.add_argument("--chunks", type=int, default=None,
                   help="requests per sequence (default: the whole shipped speech, 22 chunks)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    path = write_perf_data(args.preset, args.out, args.sequences, args.chunks)
    data = json.loads(path.read_text())["data"]
    print(f"wrote {path}: {len(data)} sequence(s) of {len(data[0])} requests for preset {args.preset} "
          f"(REF_IMAGE on step 0 only; AUDIO from the shipped speech)")
    return 0
