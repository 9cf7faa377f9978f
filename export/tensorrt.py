"""TensorRT engines from the fp8 export: builder (TensorRT 10 Python API) and runtime adapter.

`build_trt(preset, out)` turns ROOT/fp8/*.onnx into ROOT/trt-fp8/<network>.plan: each graph's
high-precision part is converted to FP16 (or BF16) with norm statistics, timestep embedding and the
log-mel front end kept in float32 (the FP8 Q/DQ stay), the CPU-side parser check runs, then a
strongly typed network is built with one optimisation profile from the spec's batch range and a
timing cache shared by all networks on that GPU. `<network>.build_info.json` beside each plan
records precision, GPU name and compute capability, TensorRT version, ONNX hash and preset.

The plans run through flowact.runtime.tensorrt (`TrtRunner`, `load_trt_runners`), which does not
import this builder.

TensorRT is imported lazily: without it every entry point raises `TensorRTUnavailable` with
a clear message; nothing else in flowact needs it.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Callable

import onnx
import torch

from flowact.export import graph
from flowact.export.fp8 import export_fp8
from flowact.runtime.manifest import Manifest, Precision, digest
from flowact.export.onnx import WeightSource
from flowact.export.trt_check import check_tensorrt_compat, errors
from flowact.networks import Networks
from flowact.presets import Preset
from flowact.runtime.tensorrt import TensorRTBuildError, TensorRTUnavailable, import_tensorrt
from flowact.specs import NETWORK_NAMES, NetworkSpec, network_specs

HIGH_PRECISION = ("float16", "bfloat16")


def gpu_info() -> dict:
    if not torch.cuda.is_available():
        raise TensorRTUnavailable("no CUDA GPU visible: TensorRT engines are built on the GPU they will run on")
    i = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(i)
    return {"name": torch.cuda.get_device_name(i), "compute_capability": f"{major}.{minor}"}


def tensorrt_onnx(source: str | Path, dtype: str = "float16") -> onnx.ModelProto:
    """The graph TensorRT builds: float32 compute converted to `dtype` (graphs already in half precision
    are left as they are); FP8 Q/DQ untouched."""
    model = graph.load_model(source)
    has_half = any(t in (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
                   for t in graph.tensor_types(graph.infer_shapes(model)).values())
    return model if has_half else graph.to_half(model, dtype)


def build_engine(onnx_path: str | Path, spec: NetworkSpec, plan_path: str | Path, timing_cache: str | Path,
                 opt_level: int = 3, workspace_bytes: int | None = None) -> dict:
    """Parse and build one strongly typed engine with the spec's batch profile. Returns build facts."""
    trt = import_tensorrt()
    onnx_path, plan_path, timing_cache = Path(onnx_path), Path(plan_path), Path(timing_cache)
    found = errors(check_tensorrt_compat(graph.load_model(onnx_path, weights=False), spec))
    if found:
        raise TensorRTBuildError(f"{onnx_path} would be rejected by TensorRT:\n" + "\n".join(map(str, found)))
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        msgs = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise TensorRTBuildError(f"TensorRT's ONNX parser rejected {onnx_path}:\n" + "\n".join(msgs))
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    if names != spec.input_names:
        raise TensorRTBuildError(f"{onnx_path}: network inputs {names} differ from the spec's {spec.input_names}")

    config = builder.create_builder_config()
    config.builder_optimization_level = opt_level
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    p = spec.profile
    profile = builder.create_optimization_profile()
    for t in spec.inputs:
        profile.set_shape(t.name, t.shape(p.min), t.shape(p.opt), t.shape(p.max))
    config.add_optimization_profile(profile)

    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TensorRTBuildError(f"TensorRT failed to build {spec.name} from {onnx_path} (see the log above)")
    tmp = plan_path.with_name(plan_path.name + ".tmp")
    tmp.write_bytes(bytes(serialized))
    os.replace(tmp, plan_path)
    tmp = timing_cache.with_name(timing_cache.name + ".tmp")
    tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
    os.replace(tmp, timing_cache)
    return {"build_seconds": round(time.perf_counter() - t0, 1), "tensorrt": trt.__version__,
            "opt_level": opt_level, "profile": {"min": p.min, "opt": p.opt, "max": p.max}}


def build_trt(preset: Preset, out: str | Path, checkpoint: str | Path | None = None, seed: int = 0,
              high_precision: str = "float16", opt_level: int = 3, say: Callable[[str], None] = print,
              nets: Networks | None = None, source: WeightSource | None = None) -> dict[str, Path]:
    """ROOT/trt-fp8/<network>.plan (+ .onnx it was built from, + .build_info.json); current plans kept."""
    if high_precision not in HIGH_PRECISION:
        raise ValueError(f"high precision must be one of {HIGH_PRECISION}, got {high_precision!r}")
    trt = import_tensorrt()
    gpu = gpu_info()
    source = source or WeightSource(preset, checkpoint, seed, nets)
    fp8_files = export_fp8(preset, out, seed=seed, say=say, source=source)
    fp8_manifest = Manifest.load(Path(out) / Precision.FP8.value)
    directory = Path(out) / Precision.TRT_FP8.value
    directory.mkdir(parents=True, exist_ok=True)
    manifest = Manifest.open(directory, preset, Precision.TRT_FP8)
    cache = directory / f"timing-{gpu['name'].replace(' ', '_')}-sm{gpu['compute_capability']}.cache"
    for name, spec in network_specs(preset).items():
        src = fp8_manifest.networks[name]
        key = digest("trt", src["sha256"], trt.__version__, gpu, high_precision, opt_level,
                     [spec.profile.min, spec.profile.opt, spec.profile.max], graph.sha256_file(__file__))
        plan = directory / f"{name}.plan"
        if manifest.up_to_date(name, key, directory, graph.sha256_file):
            say(f"{name}: {plan} is up to date, skipping")
            continue
        onnx_path = directory / f"{name}.onnx"
        graph.save_model(tensorrt_onnx(fp8_files[name], high_precision), onnx_path)
        say(f"{name}: building TensorRT engine ({src['precision']} + {high_precision}) ...")
        facts = build_engine(onnx_path, spec, plan, cache, opt_level)
        info = {"network": name, "preset": preset.name, "precision": f"{src['precision']}+{high_precision}",
                "gpu": gpu["name"], "compute_capability": gpu["compute_capability"],
                "onnx": onnx_path.name, "onnx_sha256": graph.model_hash(onnx_path), "source_onnx_sha256": src["sha256"],
                "host": platform.node(), **facts}
        (directory / f"{name}.build_info.json").write_text(json.dumps(info, indent=2) + "\n")
        manifest.record(name, plan.name, graph.sha256_file(plan), key, spec, info["precision"], build_info=info)
        manifest.save(directory)
        say(f"{name}: built {plan} in {facts['build_seconds']} s")
    manifest.save(directory)
    return {name: manifest.path(directory, name) for name in NETWORK_NAMES}
