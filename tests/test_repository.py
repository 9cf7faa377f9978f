"""Repository rendering for both targets, parsed back with Triton's own model_config protobuf."""

from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from flowact.serving.repository import Pipeline, RepositoryOptions, Target, render_repository
from flowact.specs import NETWORK_NAMES, network_specs


def parse(repo: Path) -> dict[str, mc.ModelConfig]:
    return {p.parent.name: text_format.Parse(p.read_text(), mc.ModelConfig()) for p in repo.glob("*/config.pbtxt")}


def fake_engines(tmp_path: Path, suffix: str) -> dict[str, Path]:
    files = {name: tmp_path / f"{name}{suffix}" for name in NETWORK_NAMES}
    for f in files.values():
        f.write_bytes(b"engine")
    return files


def test_trt_target_renders_tensorrt_plan_models(tmp_path, tiny):
    repo = render_repository(tiny, Target.TRT, tmp_path / "repo", fake_engines(tmp_path, ".plan"), RepositoryOptions(capacity=4))
    configs = parse(repo)
    specs = network_specs(tiny)
    for name in NETWORK_NAMES:
        cfg = configs[name]
        assert cfg.platform == "tensorrt_plan" and cfg.max_batch_size == specs[name].profile.max
        assert [i.name for i in cfg.input] == specs[name].input_names  # names come from the spec
        assert list(cfg.input[0].dims) == list(specs[name].inputs[0].dims_without_batch)
        assert (repo / name / "1" / "model.plan").read_bytes() == b"engine"
        assert cfg.model_warmup[0].inputs[specs[name].input_names[0]].zero_data
    assert configs["stream"].backend == "python" and configs["flowact"].platform == "ensemble"


def test_serial_pipeline_has_one_ensemble_step(tmp_path, tiny):
    repo = render_repository(tiny, Target.EMBEDDED, tmp_path / "repo", fake_engines(tmp_path, ".onnx"),
                             RepositoryOptions(pipeline=Pipeline.SERIAL))
    configs = parse(repo)
    assert [s.model_name for s in configs["flowact"].ensemble_scheduling.step] == ["stream"]
    assert "FRAMES" in [o.name for o in configs["stream"].output]
    assert configs["audio_encoder"].backend == "python"


def test_trt_capacity_beyond_engine_profile_is_refused(tmp_path, tiny):
    with pytest.raises(ValueError, match="exceeds the engines' batch profile max"):
        render_repository(tiny, Target.TRT, tmp_path / "repo", fake_engines(tmp_path, ".plan"), RepositoryOptions(capacity=64))
