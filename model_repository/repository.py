"""Render a complete Triton model repository from the network specs.

    <out>/
      stream/                 python backend, sequence batching (oldest), holds every stream's state
      vae_decoder/            the ensemble's second step: decoding chunk n overlaps denoising n+1
      flowact/                the ensemble clients call: stream -> vae_decoder
      repository.json         what was rendered, from what

In every target the stream model runs the audio encoder, VAE encoder, memory pass, denoiser and
text encoder itself, next to a pool of per-stream state on its device, and vae_decoder is a
separate model (the ensemble's second step):
    embedded  ONNX Runtime on the CPU, from the export directory; vae_decoder a python model
              running its ONNX file (measured here: colocating beats calling network models
              through BLS; benchmarks/results/cpu_{bls,colocated}_vs_inprocess.json).
    torch     PyTorch on the stream model's device (CUDA bf16, or CPU fp32: the same code path);
              vae_decoder a python model running PyTorch on the same device (GPU tensors pass
              through DLPack).
    trt       TensorRT plans, which the stream model loads from its own directory; vae_decoder a
              tensorrt_plan model.

Every config.pbtxt is built as Triton's own ModelConfig protobuf and printed in text format; no
tensor name is written here that the specs do not define.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from flowact.contract import (ARTIFACTS_DIR, AUDIO, BEHAVIOUR, CANDIDATE_HEADROOM, CHUNK_INDEX, DEFAULT_CAPACITY,
                              DEFAULT_IDLE_TTL_S, END, ENSEMBLE_MODEL, FRAMES, PROMPT, REF_IMAGE, RESUME, SEED,
                              SNAPSHOT, START, STREAM_MODEL, TRITON_IDLE_FACTOR, TRITON_IDLE_MARGIN_S, WANT_SNAPSHOT,
                              WIRE_DTYPES)
from flowact.presets import SAMPLES_PER_CHUNK, Preset, get_preset
from flowact.runtime import RuntimeKind
from flowact.runtime.manifest import Manifest, Precision, cpu_precision
from flowact.snapshot import max_snapshot_bytes
from flowact.specs import LATENTS, TensorSpec, network_specs

HERE = Path(__file__).parent


class Target(str, Enum):
    EMBEDDED = "embedded"  # ONNX Runtime on the CPU inside the stream model (the bundled server)
    TORCH = "torch"  # PyTorch inside the stream model, beside the state (GPUs without TensorRT; CPU)
    TRT = "trt"  # TensorRT plans inside the stream model; vae_decoder a tensorrt_plan model


# What runs the networks per target: in the stream model, and in vae_decoder where it is a python model.
RUNTIME = {Target.EMBEDDED: RuntimeKind.ONNX, Target.TORCH: RuntimeKind.TORCH, Target.TRT: RuntimeKind.TRT}


class Pipeline(str, Enum):
    OVERLAP = "overlap"  # ensemble: stream -> vae_decoder, decoding chunk n overlaps denoising n+1
    SERIAL = "serial"  # the stream model decodes before answering (the benchmark's baseline)


@dataclass(frozen=True)
class RepositoryOptions:
    capacity: int = DEFAULT_CAPACITY  # streams admitted at once
    idle_ttl_s: float = DEFAULT_IDLE_TTL_S  # a stream with no request for this long is freed
    pipeline: Pipeline = Pipeline.OVERLAP
    engine_threads: int = 2  # intra-op threads of the stream model and of vae_decoder (ONNX Runtime, or torch on the CPU)
    queue_delay_us: int = 2000  # how long the stream batcher waits to gather streams into one batch
    device: str | None = None  # where the stream model's state and networks live; None: target_device's default


def tensor_config(spec: TensorSpec, cls, optional: bool = False):
    t = cls(name=spec.name, data_type=getattr(mc, spec.triton_dtype), dims=list(spec.dims_without_batch))
    if optional:
        t.optional = True
    return t


def target_device(target: Target, device: str | None) -> str:
    """The stream model's device for a target. embedded: the CPU (ONNX Runtime's CPU provider). trt: a
    CUDA device (TensorRT plans run nowhere else; default cuda:0). torch: the device given; by default
    cuda:0 where CUDA is visible (the pod's init container renders on the GPU it serves on), else the CPU."""
    target = Target(target)
    if target == Target.EMBEDDED:
        if device not in (None, "cpu"):
            raise ValueError(f"target embedded runs ONNX Runtime on the CPU; device {device!r} is for targets torch and trt")
        return "cpu"
    if device is None:
        if target == Target.TRT:
            return "cuda:0"
        import torch

        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if not (device == "cpu" or re.fullmatch(r"cuda(:\d+)?", device)):
        raise ValueError(f"device {device!r}: expected cpu, cuda or cuda:N")
    if target == Target.TRT and not device.startswith("cuda"):
        raise ValueError(f"target trt needs a CUDA device (TensorRT plans run only on the GPU), not {device!r}")
    return device


# Batches whose GPU tensors are in Triton's CUDA memory pool at once: the stream model's latents of
# chunk n+1 while vae_decoder's frames of chunk n are still being copied out.
POOL_BATCHES_IN_FLIGHT = 2
POOL_HEADROOM_BYTES = 64 << 20  # Triton's default pool size, kept on top


def cuda_memory_pool_bytes(preset: Preset, opts: RepositoryOptions) -> int:
    """Triton's CUDA memory pool on the stream model's GPU (--cuda-memory-pool-byte-size). The python
    backend passes GPU tensors between the stubs and the server through that pool; when a batch does
    not fit, Triton falls back to pinned memory and the python stub fails to load the GPU buffer
    (triton-inference-server/server#8177: empty outputs). The default 64 MiB holds one r1-480p batch
    of 4 streams' frames (57.5 MB) but not two in flight: size it from capacity and the tensors."""
    decoder = network_specs(preset)["vae_decoder"]
    per_stream = sum(int(np.prod(t.dims_without_batch)) * t.dtype.itemsize for t in (*decoder.inputs, *decoder.outputs))
    total = POOL_BATCHES_IN_FLIGHT * opts.capacity * per_stream + POOL_HEADROOM_BYTES
    return -(-total // (1 << 20)) << 20  # whole MiB


def add_instance(cfg: mc.ModelConfig, opts: RepositoryOptions) -> None:
    """One instance on the repository's device. On a GPU it names that GPU: a KIND_GPU group without
    `gpus` makes one instance per visible GPU, each of which would hold its own pool and weights."""
    if opts.device.startswith("cuda"):
        cfg.instance_group.add(count=1, kind=mc.ModelInstanceGroup.KIND_GPU, gpus=[gpu_index(opts.device)])
    else:
        cfg.instance_group.add(count=1, kind=mc.ModelInstanceGroup.KIND_CPU)


def gpu_index(device: str) -> int:
    return int(device.partition(":")[2] or 0)  # "cuda" is cuda:0


def decoder_config(preset: Preset, target: Target, opts: RepositoryOptions, source: Path | None) -> mc.ModelConfig:
    """The vae_decoder model, stateless: python running ONNX (embedded) or torch (torch), or a tensorrt_plan
    (trt). `source`: the ONNX file (embedded) or the checkpoint directory (torch; None: seeded random)."""
    spec = network_specs(preset)["vae_decoder"]
    cfg = mc.ModelConfig(name=spec.name, max_batch_size=max(opts.capacity, spec.profile.max) if target != Target.TRT
                         else spec.profile.max)
    cfg.input.extend(tensor_config(t, mc.ModelInput) for t in spec.inputs)
    cfg.output.extend(tensor_config(t, mc.ModelOutput) for t in spec.outputs)
    cfg.dynamic_batching.max_queue_delay_microseconds = 0
    warmup = cfg.model_warmup.add(name="zeros", batch_size=1, count=2)  # first real chunk runs warm
    for t in spec.inputs:
        warmup.inputs[t.name].data_type = getattr(mc, t.triton_dtype)
        warmup.inputs[t.name].dims.extend(t.dims_without_batch)
        warmup.inputs[t.name].zero_data = True
    if target != Target.TRT:
        cfg.backend = "python"
        add_instance(cfg, opts)
        for key, value in (("network", spec.name), ("preset", preset.name), ("runtime", RUNTIME[target].value),
                           ("source", "" if source is None else str(source)), ("device", opts.device),
                           ("threads", str(opts.engine_threads))):
            cfg.parameters[key].string_value = value
        if opts.device.startswith("cuda"):  # GPU inputs stay on the GPU (DLPack)
            cfg.parameters["FORCE_CPU_ONLY_INPUT_TENSORS"].string_value = "no"
    else:
        cfg.platform = "tensorrt_plan"
        cfg.default_model_filename = "model.plan"
        add_instance(cfg, opts)  # a trt device is always CUDA (target_device)
    return cfg


def wire_tensor(cls, name: str, dims: list[int], **kw):
    """A client-facing tensor typed from the contract's WIRE_DTYPES (a config names BYTES `TYPE_STRING`)."""
    wire = WIRE_DTYPES[name]
    return cls(name=name, data_type=getattr(mc, "TYPE_STRING" if wire == "BYTES" else f"TYPE_{wire}"), dims=dims, **kw)


def stream_inputs(preset: Preset, device_kind: str = "cpu") -> list[mc.ModelInput]:
    image = network_specs(preset)["vae_encoder"].inputs[0]
    dims = {
        # AUDIO is required in every request, but marked optional so that the stream model answers a
        # request without it ("AUDIO: required ..."): Triton 2.51's ensemble would report "unexpected deadlock".
        AUDIO: [SAMPLES_PER_CHUNK],
        REF_IMAGE: list(image.dims_without_batch),
        SEED: [1],
        PROMPT: [1],
        BEHAVIOUR: [1],
        # Fixed size (every SNAPSHOT of the preset is padded to it): Triton refuses any other size
        # before the request reaches the stream model's shared memory.
        RESUME: [max_snapshot_bytes(preset, device_kind)],
        WANT_SNAPSHOT: [1],
    }
    return [wire_tensor(mc.ModelInput, name, d, optional=True) for name, d in dims.items()]


def stream_outputs() -> list[mc.ModelOutput]:
    """The stream model's outputs besides the chunk itself (both mapped through the ensemble)."""
    return [wire_tensor(mc.ModelOutput, CHUNK_INDEX, [1]),
            wire_tensor(mc.ModelOutput, SNAPSHOT, [-1])]  # empty unless WANT_SNAPSHOT


def triton_idle_s(idle_ttl_s: float) -> float:
    """Triton's sequence idle timeout: above the model's own TTL, so the model evicts a stream first (and
    names the eviction to its next request) before Triton forgets the sequence."""
    return max(idle_ttl_s * TRITON_IDLE_FACTOR, idle_ttl_s + TRITON_IDLE_MARGIN_S)


def state_device_kind(opts: RepositoryOptions) -> str:
    """Where the stream model keeps its state ("cpu" or "cuda"): it sizes the snapshots it accepts."""
    return opts.device.split(":")[0]


def stream_config(preset: Preset, opts: RepositoryOptions, target: Target = Target.EMBEDDED,
                  source: Path | None = None) -> mc.ModelConfig:
    """`source`: the checkpoint directory (torch; None: seeded random) or the plan directory (trt)."""
    specs = network_specs(preset)
    out = specs["vae_decoder"].outputs[0] if opts.pipeline == Pipeline.SERIAL else specs["vae_decoder"].inputs[0]
    cfg = mc.ModelConfig(name=STREAM_MODEL, backend="python", max_batch_size=opts.capacity)
    cfg.input.extend(stream_inputs(preset, state_device_kind(opts)))
    cfg.output.extend([tensor_config(out, mc.ModelOutput), *stream_outputs()])
    add_instance(cfg, opts)  # one process holds every stream
    seq = cfg.sequence_batching
    seq.max_sequence_idle_microseconds = int(triton_idle_s(opts.idle_ttl_s) * 1e6)
    # Triton backlogs STARTs beyond max_candidate_sequences, and a sequence keeps its slot until END
    # or Triton's idle timeout, also when the model refused its START. The headroom lets that many
    # refused STARTs without END stand at once while every further START still reaches the model.
    seq.oldest.max_candidate_sequences = opts.capacity + CANDIDATE_HEADROOM
    seq.oldest.max_queue_delay_microseconds = opts.queue_delay_us
    for name, kind in ((START, mc.ModelSequenceBatching.Control.CONTROL_SEQUENCE_START),
                       (END, mc.ModelSequenceBatching.Control.CONTROL_SEQUENCE_END)):
        control = seq.control_input.add(name=name)
        control.control.add(kind=kind, int32_false_true=[0, 1])
    for key, value in (("preset", preset.name), ("capacity", str(opts.capacity)),
                       ("idle_ttl_s", str(opts.idle_ttl_s)), ("output", out.name),
                       ("runtime", RUNTIME[target].value), ("device", opts.device),
                       ("source", "" if source is None else str(source)), ("threads", str(opts.engine_threads))):
        cfg.parameters[key].string_value = value
    return cfg  # inputs stay host tensors (as_numpy): they come from the client; only LATENTS out go by DLPack


def ensemble_config(preset: Preset, opts: RepositoryOptions, target: Target = Target.EMBEDDED) -> mc.ModelConfig:
    frames = network_specs(preset)["vae_decoder"].outputs[0]
    cfg = mc.ModelConfig(name=ENSEMBLE_MODEL, platform="ensemble", max_batch_size=opts.capacity)
    inputs = stream_inputs(preset, state_device_kind(opts))
    cfg.input.extend(inputs)
    cfg.output.extend([tensor_config(frames, mc.ModelOutput), *stream_outputs()])
    step = cfg.ensemble_scheduling.step.add(model_name=STREAM_MODEL, model_version=-1)
    for name in (i.name for i in inputs):
        step.input_map[name] = name
    for name in (CHUNK_INDEX, SNAPSHOT):
        step.output_map[name] = name
    if opts.pipeline == Pipeline.SERIAL:
        step.output_map[FRAMES] = FRAMES
    else:
        step.output_map[LATENTS] = "chunk_latents"
        decode = cfg.ensemble_scheduling.step.add(model_name="vae_decoder", model_version=-1)
        decode.input_map[LATENTS] = "chunk_latents"
        decode.output_map[FRAMES] = FRAMES
    return cfg


def write_model(root: Path, cfg: mc.ModelConfig, model_py: Path | None = None) -> Path:
    model_dir = root / cfg.name
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    (model_dir / "config.pbtxt").write_text(text_format.MessageToString(cfg))
    if model_py is not None:
        shutil.copy2(model_py, model_dir / "1" / "model.py")
    return model_dir


def render_repository(preset: Preset, target: Target, out: Path, network_files: dict[str, Path] | None = None,
                      opts: RepositoryOptions = RepositoryOptions(), checkpoint: str | Path | None = None) -> Path:
    """Write every model of the repository.

    `network_files`: network name -> ONNX file (embedded: vae_decoder reads its file in place, the
    stream model the export directory beside it) or TensorRT plan (trt: vae_decoder's is copied in as
    model.plan, every plan and the manifest into the stream model's directory). target torch reads
    `checkpoint` (None: seeded random weights)."""
    target, out = Target(target), Path(out)
    opts = dataclasses.replace(opts, device=target_device(target, opts.device))
    specs = network_specs(preset)
    files = {k: Path(v).resolve() for k, v in (network_files or {}).items()}
    network_max = min(spec.profile.max for spec in specs.values())
    if target == Target.TRT and opts.capacity > network_max:
        raise ValueError(f"capacity {opts.capacity} exceeds the engines' batch profile max {network_max} "
                         f"for preset {preset.name}: lower --capacity or rebuild with a larger profile")
    checkpoint = None if checkpoint is None else Path(checkpoint).resolve()
    out.mkdir(parents=True, exist_ok=True)
    decoder_py = HERE / "vae_decoder" / "1" / "model.py"
    stream_source = None
    if target == Target.EMBEDDED:  # ONNX Runtime reads the export directory's files (and their external data)
        write_model(out, decoder_config(preset, target, opts, files["vae_decoder"]), decoder_py)
        stream_source = files["vae_decoder"].parent  # the export directory: its manifest names every file
    elif target == Target.TORCH:
        write_model(out, decoder_config(preset, target, opts, checkpoint), decoder_py)
        stream_source = checkpoint
    else:
        model_dir = write_model(out, decoder_config(preset, target, opts, None))
        shutil.copy2(files["vae_decoder"], model_dir / "1" / "model.plan")
        stream_source = out / STREAM_MODEL / "1"
        stream_source.mkdir(parents=True, exist_ok=True)
        for name in specs:  # the stream model loads them with flowact.runtime.tensorrt (a manifest beside them)
            shutil.copy2(files[name], stream_source / files[name].name)
        shutil.copy2(files["vae_decoder"].parent / "manifest.json", stream_source / "manifest.json")
    write_model(out, stream_config(preset, opts, target, stream_source), HERE / "stream" / "1" / "model.py")
    write_model(out, ensemble_config(preset, opts, target))
    meta = {"preset": preset.name, "target": target.value, "pipeline": Pipeline(opts.pipeline).value,
            "capacity": opts.capacity, "idle_ttl_s": opts.idle_ttl_s, "device": opts.device,
            "networks": {k: str(v) for k, v in files.items()},
            "precision": Manifest.load(files["vae_decoder"].parent).precision if files else None,  # torch: the checkpoint's
            "checkpoint": None if checkpoint is None else str(checkpoint)}
    if opts.device.startswith("cuda"):  # read by flowact.serving.server when it starts tritonserver
        meta["cuda_memory_pool"] = {"gpu": gpu_index(opts.device),
                                    "bytes": cuda_memory_pool_bytes(preset, opts)}
    (out / "repository.json").write_text(json.dumps(meta, indent=2))
    return out


def target_precision(target: Target, preset_name: str, precision: str | None) -> str:
    """What the target's networks run in: the embedded target's CPU precision (`precision` or the preset's);
    the others take none (ValueError naming why)."""
    if Target(target) == Target.EMBEDDED:
        return cpu_precision(preset_name, precision).value
    if precision:
        raise ValueError(f"--precision is the embedded target's (--target {Target(target).value} runs "
                         f"{'the checkpoint' if Target(target) == Target.TORCH else 'FP8 plans'})")
    return "checkpoint" if Target(target) == Target.TORCH else Precision.TRT_FP8.value


def embedded_export_root(preset_name: str) -> Path:
    """Where the embedded target's ONNX exports live (fp32/ and int8/ below it): `flowact serve`, `flowact
    demo` and the benchmarks all read and write here."""
    return Path(ARTIFACTS_DIR) / preset_name / "onnx"


def build_embedded_repository(preset_name: str, out: Path, checkpoint: str | Path | None = None,
                              opts: RepositoryOptions = RepositoryOptions(), onnx_dir: Path | None = None,
                              seed: int = 0, precision: Precision | str | None = None) -> Path:
    """ONNX export (idempotent; int8: quantized from it) + repository rendering for the embedded server.
    `precision` None: the preset's default (runtime.manifest.cpu_precision)."""
    from flowact.export.int8 import export_int8
    from flowact.export.onnx import export_onnx

    preset = get_preset(preset_name)
    export = export_int8 if cpu_precision(preset.name, precision) == Precision.INT8 else export_onnx
    onnx_dir = onnx_dir or embedded_export_root(preset.name)
    files = export(preset, onnx_dir, checkpoint=checkpoint, seed=seed)
    return render_repository(preset, Target.EMBEDDED, out, files, opts)
