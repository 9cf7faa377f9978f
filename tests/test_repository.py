"""Repository rendering for every target, parsed back with Triton's own model_config protobuf."""

import json
from pathlib import Path

import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from flowact.runtime.manifest import Manifest, Precision
from flowact.serving.repository import Pipeline, RepositoryOptions, Target, render_repository, target_device
from flowact.specs import NETWORK_NAMES, network_specs


def parse(repo: Path) -> dict[str, mc.ModelConfig]:
    return {p.parent.name: text_format.Parse(p.read_text(), mc.ModelConfig()) for p in repo.glob("*/config.pbtxt")}


def fake_engines(tmp_path: Path, suffix: str, preset) -> dict[str, Path]:
    """Engine files with placeholder bytes beside a real manifest (the renderer reads its precision)."""
    files = {name: tmp_path / f"{name}{suffix}" for name in NETWORK_NAMES}
    for f in files.values():
        f.write_bytes(b"engine")
    Manifest.open(tmp_path, preset, Precision.TRT_FP8 if suffix == ".plan" else Precision.FP32).save(tmp_path)
    return files


def params(cfg: mc.ModelConfig) -> dict[str, str]:
    return {k: v.string_value for k, v in cfg.parameters.items()}


def test_trt_target_renders_tensorrt_plan_models(tmp_path, tiny):
    """trt: the plans beside the state in the stream model; vae_decoder a tensorrt_plan model."""
    repo = render_repository(tiny, Target.TRT, tmp_path / "repo", fake_engines(tmp_path, ".plan", tiny),
                             RepositoryOptions(capacity=4, device="cuda:0"))
    configs = parse(repo)
    assert sorted(configs) == ["flowact", "stream", "vae_decoder"]
    spec, cfg = network_specs(tiny)["vae_decoder"], configs["vae_decoder"]
    assert cfg.platform == "tensorrt_plan" and cfg.max_batch_size == spec.profile.max
    assert [i.name for i in cfg.input] == spec.input_names  # names come from the spec
    assert list(cfg.input[0].dims) == list(spec.inputs[0].dims_without_batch)
    assert (repo / "vae_decoder" / "1" / "model.plan").read_bytes() == b"engine"
    assert cfg.model_warmup[0].inputs[spec.input_names[0]].zero_data
    stream = configs["stream"]
    assert stream.backend == "python" and configs["flowact"].platform == "ensemble"
    assert stream.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    for name in ("stream", "vae_decoder"):  # one instance on the named GPU, not one per visible GPU
        assert [(g.count, list(g.gpus)) for g in configs[name].instance_group] == [(1, [0])]
    assert params(stream)["runtime"] == "trt" and params(stream)["device"] == "cuda:0"
    assert "FORCE_CPU_ONLY_INPUT_TENSORS" not in params(stream)  # the client's inputs: host arrays
    plans = Path(params(stream)["source"])
    assert plans == repo / "stream" / "1" and all((plans / f"{n}.plan").exists() for n in NETWORK_NAMES)


@pytest.mark.parametrize("device, kind", [("cpu", mc.ModelInstanceGroup.KIND_CPU),
                                          ("cuda:0", mc.ModelInstanceGroup.KIND_GPU)])
def test_torch_target_keeps_networks_beside_the_state(tmp_path, tiny, device, kind):
    """torch: the stream model runs every network but the decoder itself, on its device."""
    repo = render_repository(tiny, Target.TORCH, tmp_path / "repo", opts=RepositoryOptions(device=device),
                             checkpoint=tmp_path)
    configs = parse(repo)
    assert sorted(configs) == ["flowact", "stream", "vae_decoder"]
    for name in ("stream", "vae_decoder"):
        assert configs[name].backend == "python" and configs[name].instance_group[0].kind == kind
        assert params(configs[name])["device"] == device and params(configs[name])["source"] == str(tmp_path)
    assert params(configs["stream"])["runtime"] == "torch" and params(configs["vae_decoder"])["runtime"] == "torch"
    # the decoder takes the stream model's CUDA latents as they are (DLPack), not copied to the host
    assert params(configs["vae_decoder"]).get("FORCE_CPU_ONLY_INPUT_TENSORS") == ("no" if device != "cpu" else None)
    assert [s.model_name for s in configs["flowact"].ensemble_scheduling.step] == ["stream", "vae_decoder"]


def test_serial_pipeline_has_one_ensemble_step(tmp_path, tiny):
    repo = render_repository(tiny, Target.EMBEDDED, tmp_path / "repo", fake_engines(tmp_path, ".onnx", tiny),
                             RepositoryOptions(pipeline=Pipeline.SERIAL))
    configs = parse(repo)
    assert [s.model_name for s in configs["flowact"].ensemble_scheduling.step] == ["stream"]
    assert "FRAMES" in [o.name for o in configs["stream"].output]
    assert sorted(configs) == ["flowact", "stream", "vae_decoder"]  # the other networks run inside `stream`
    assert params(configs["stream"])["runtime"] == "onnx" and Path(params(configs["stream"])["source"]) == tmp_path


def test_trt_capacity_beyond_engine_profile_is_refused(tmp_path, tiny):
    with pytest.raises(ValueError, match="exceeds the engines' batch profile max"):
        render_repository(tiny, Target.TRT, tmp_path / "repo", fake_engines(tmp_path, ".plan", tiny), RepositoryOptions(capacity=64))


def test_target_device_defaults_and_refusals(tmp_path, tiny):
    """trt state and plans live on a CUDA device; embedded on the CPU; torch where it is told (default: CUDA if visible)."""
    assert target_device(Target.TRT, None) == "cuda:0" and target_device(Target.TRT, "cuda:1") == "cuda:1"
    assert target_device(Target.EMBEDDED, None) == "cpu"
    assert target_device(Target.TORCH, None) == ("cuda:0" if torch.cuda.is_available() else "cpu")
    for target, device, message in ((Target.TRT, "cpu", "target trt needs a CUDA device"),
                                    (Target.EMBEDDED, "cuda:0", "target embedded runs ONNX Runtime on the CPU"),
                                    (Target.TORCH, "gpu0", "expected cpu, cuda or cuda:N")):
        with pytest.raises(ValueError, match=message):
            target_device(target, device)
    # A trt repository rendered without a device puts the stream model and its state on the GPU.
    repo = render_repository(tiny, Target.TRT, tmp_path / "repo", fake_engines(tmp_path, ".plan", tiny), RepositoryOptions(capacity=4))
    stream = parse(repo)["stream"]
    assert stream.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU and params(stream)["device"] == "cuda:0"


def test_export_cli_refuses_trt_on_the_cpu_before_building(tmp_path, capsys):
    from flowact.cli import main

    assert main(["export", "repository", "--preset", "tiny", "--target", "trt", "--device", "cpu",
                 "--out", str(tmp_path / "repo"), "--engines", str(tmp_path / "engines")]) == 2
    assert "target trt needs a CUDA device" in capsys.readouterr().out
    assert not (tmp_path / "engines").exists() and not (tmp_path / "repo").exists()


def test_gpu_repository_sizes_tritons_cuda_memory_pool(tmp_path):
    """GPU tensors pass between the python stubs and the server through Triton's CUDA pool: sized for two
    batches of `capacity` streams' latents and frames in flight, passed to tritonserver by the launcher."""
    from flowact.presets import get_preset
    from flowact.serving.server import TritonServer

    r1 = get_preset("r1-480p")
    gpu = render_repository(r1, Target.TORCH, tmp_path / "gpu", opts=RepositoryOptions(capacity=4, device="cuda:1"))
    assert all(list(c.instance_group[0].gpus) == [1] for n, c in parse(gpu).items() if n != "flowact")
    per_stream = 4 * 16 * 60 * 104 * 4 + 12 * 480 * 832 * 3  # LATENTS fp32 + FRAMES uint8
    pool = json.loads((gpu / "repository.json").read_text())["cuda_memory_pool"]
    assert pool["gpu"] == 1 and pool["bytes"] >= 2 * 4 * per_stream + (64 << 20) > 2 * (64 << 20)
    assert pool["bytes"] % (1 << 20) == 0 and pool["bytes"] < 2 * 4 * per_stream + (65 << 20)
    assert f"--cuda-memory-pool-byte-size=1:{pool['bytes']}" in TritonServer(gpu).command()
    cpu = render_repository(r1, Target.TORCH, tmp_path / "cpu", opts=RepositoryOptions(device="cpu"))
    assert "cuda_memory_pool" not in json.loads((cpu / "repository.json").read_text())
    assert not any(a.startswith("--cuda-memory-pool") for a in TritonServer(cpu).command())
