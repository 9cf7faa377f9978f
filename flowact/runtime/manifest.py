"""The manifest of an export directory: what was built, from what, and how to tell it is current.

The exporters (flowact.export) write it; the runtimes (flowact.runtime.onnx, .tensorrt) read it to
find each network's file, so it lives here, below both.

Layout of an export root (`flowact export ... --out ROOT`):
    ROOT/fp32/      <network>.onnx + manifest.json   (`flowact export onnx`)
    ROOT/fp8/       <network>.onnx + manifest.json   (`flowact export fp8`: FP8 Q/DQ transformers,
                                                       FP16 VAE, float32 text encoder)
    ROOT/int8/      <network>.onnx + manifest.json   (`flowact export int8`: int8 where the spec says, for CPUs)
    ROOT/trt-fp8/   <network>.plan + <network>.build_info.json + manifest.json (`flowact export trt`)

Each network's entry records the file's sha256 and a `key`: a hash of everything the file was made
from (preset, weights, source code, options). A step skips a network whose file still has its
recorded hash and whose key is unchanged, and says so.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

from flowact.presets import Preset

if TYPE_CHECKING:  # torch-free at import: the CLI's argument parser reads Precision
    from flowact.specs import NetworkSpec, TensorSpec

MANIFEST = "manifest.json"
SCHEMA = 1


class Precision(str, Enum):
    """What a directory holds. Per-network precisions are recorded in each entry."""

    FP32 = "fp32"  # float32 ONNX, the reference export
    FP8 = "fp8"  # FP8 (e4m3) Q/DQ transformers, FP16 VAE, float32 text encoder
    INT8 = "int8"  # int8 for CPU serving, per network as its spec's `int8` says (flowact export int8)
    TRT_FP8 = "trt-fp8"  # TensorRT plans built from the fp8 directory (FP8 + FP16, strongly typed)


# What ONNX Runtime on the CPU serves (the embedded target), and each preset's default where it is
# not float32: int8 where it measured within the quality bar on the preset's trained checkpoint
# (benchmarks/results/quality_<preset>_int8.json: lip sync within 0.02 of fp32, drift and seams not
# worse, each chunk >= 35 dB from fp32's) and faster (flowact bench serve --modes capacity,precision).
# tiny stays fp32: its int8 export is tested (tests/test_int8.py), never measured for speed or quality.
CPU_PRECISIONS = (Precision.FP32, Precision.INT8)
CPU_DEFAULT_PRECISION: dict[str, Precision] = {"cpu": Precision.INT8}


CPU_PRECISION_HELP = (f"the networks' precision in ONNX Runtime, {' or '.join(p.value for p in CPU_PRECISIONS)} (default: "
                      + ", ".join(f"{k} {v.value}" for k, v in CPU_DEFAULT_PRECISION.items()) + ", else fp32)")


def cpu_precision(preset_name: str, precision: Precision | str | None = None) -> Precision:
    """`precision` checked, or the preset's default."""
    chosen = Precision(precision) if precision else CPU_DEFAULT_PRECISION.get(preset_name, Precision.FP32)
    if chosen not in CPU_PRECISIONS:
        raise ValueError(f"precision {chosen.value}: ONNX Runtime on the CPU serves "
                         f"{', '.join(p.value for p in CPU_PRECISIONS)}")
    return chosen


def preset_fields(preset: Preset) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(preset)))


def digest(*parts) -> str:
    """A stable hash of JSON-able parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def tensor_entry(t: TensorSpec) -> dict:
    return {"name": t.name, "dtype": t.dtype.name, "dims": list(t.dims)}


@dataclass
class Manifest:
    preset: str
    precision: str
    preset_fields: dict
    networks: dict[str, dict] = field(default_factory=dict)
    schema: int = SCHEMA

    @classmethod
    def load(cls, directory: str | Path) -> "Manifest":
        path = Path(directory) / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{directory} has no {MANIFEST}: not a flowact export directory "
                                    "(run `flowact export onnx|fp8|trt` first)")
        data = json.loads(path.read_text())
        return cls(**data)

    @classmethod
    def open(cls, directory: str | Path, preset: Preset, precision: Precision) -> "Manifest":
        """The directory's manifest, or a fresh one if there is none or it is for another preset."""
        try:
            m = cls.load(directory)
        except (FileNotFoundError, TypeError, json.JSONDecodeError):
            return cls(preset.name, precision.value, preset_fields(preset))
        if m.preset_fields != preset_fields(preset) or m.precision != precision.value or m.schema != SCHEMA:
            return cls(preset.name, precision.value, preset_fields(preset))
        return m

    def save(self, directory: str | Path) -> None:
        path = Path(directory) / MANIFEST
        tmp = path.with_name(MANIFEST + ".tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")
        os.replace(tmp, path)

    def check_preset(self, preset: Preset, directory) -> None:
        if self.preset_fields != preset_fields(preset):
            diff = sorted(k for k, v in preset_fields(preset).items() if self.preset_fields.get(k) != v)
            raise ValueError(f"{directory} was exported for preset {self.preset!r}, not {preset.name!r} "
                             f"(fields differ: {', '.join(diff)})")

    def up_to_date(self, name: str, key: str, directory: str | Path, file_hash) -> bool:
        """True if `name`'s file exists, still has its recorded hash, and was made from `key`."""
        entry = self.networks.get(name)
        if not entry or entry.get("key") != key:
            return False
        path = Path(directory) / entry["file"]
        return path.is_file() and file_hash(path) == entry["sha256"]

    def record(self, name: str, file: str, sha256: str, key: str, spec: NetworkSpec, precision: str, **extra) -> None:
        self.networks[name] = {
            "file": file, "sha256": sha256, "key": key, "precision": precision,
            "inputs": [tensor_entry(t) for t in spec.inputs], "outputs": [tensor_entry(t) for t in spec.outputs],
            "batch": dataclasses.asdict(spec.profile), **extra,
        }

    def path(self, directory: str | Path, name: str) -> Path:
        if name not in self.networks:
            raise KeyError(f"{directory}: network {name!r} is not in the manifest (have {', '.join(self.networks)})")
        return Path(directory) / self.networks[name]["file"]


def resolve(directory: str | Path, precision: Precision | str | None = None) -> Path:
    """An export directory: `directory` itself if it holds a manifest, else `directory/precision`."""
    directory = Path(directory)
    if (directory / MANIFEST).is_file() and precision is None:
        return directory
    sub = directory / Precision(precision or Precision.FP32).value
    if (sub / MANIFEST).is_file():
        return sub
    if (directory / MANIFEST).is_file():
        m = Manifest.load(directory)
        if precision is None or m.precision == Precision(precision).value:
            return directory
    raise FileNotFoundError(f"no {MANIFEST} in {directory} or {sub}: export first "
                            f"(`flowact export {'onnx' if sub.name == 'fp32' else sub.name} --out ...`)")
